"""Kafka topic names: part of the contract with producers and channel senders."""

from __future__ import annotations

EVENTS = "omnicue.events"
EVENTS_DLQ = "omnicue.events.dlq"
DECISIONS = "omnicue.decisions"
ACTION_CHANNELS = ("push", "email", "sms", "kakao")
ACTIONS = {channel: f"omnicue.actions.{channel}" for channel in ACTION_CHANNELS}
# Applied rules files (compacted, one partition, one key): live configuration.
RULES = "omnicue.rules"
RULES_KEY = b"rules"
# Internal: events and timer firings keyed by the resolved customer key, so one
# worker owns each customer's state and sees its inputs in order.
CUSTOMER_INPUTS = "omnicue.customer-inputs"

PUBLIC_TOPICS = (EVENTS, EVENTS_DLQ, DECISIONS, *ACTIONS.values())
