"""Kafka topic names: part of the contract with producers and channel senders."""

from __future__ import annotations

EVENTS = "omnicue.events"
EVENTS_DLQ = "omnicue.events.dlq"
DECISIONS = "omnicue.decisions"
# One attribution record per conversion (`schemas.conversions`), keyed by customer.
CONVERSIONS = "omnicue.conversions"
ACTION_CHANNELS = ("push", "email", "sms", "kakao")
ACTIONS = {channel: f"omnicue.actions.{channel}" for channel in ACTION_CHANNELS}
# A channel's senders hand an action that failed retryably here (with its next attempt's
# time) and read it back, so a retrying action never holds up the channel's others.
SENDER_RETRIES = {channel: f"omnicue.actions.{channel}.retry" for channel in ACTION_CHANNELS}
# Applied rules files (compacted, one partition, one key): live configuration.
RULES = "omnicue.rules"
RULES_KEY = b"rules"
# Internal: events and timer firings keyed by the resolved customer key, so one
# worker owns each customer's state and sees its inputs in order.
CUSTOMER_INPUTS = "omnicue.customer-inputs"

PUBLIC_TOPICS = (
    EVENTS,
    EVENTS_DLQ,
    DECISIONS,
    CONVERSIONS,
    *ACTIONS.values(),
    *SENDER_RETRIES.values(),
)
