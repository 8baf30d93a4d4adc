"""Prometheus metrics (base units, `_total` counters, bounded labels only).

Labels never carry customer ids: rule ids, channels, event types and outcomes
are bounded by the rules file and the contracts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# The text format Prometheus scrapes. Without the charset parameter: aiohttp (under
# faust's web server) takes the charset separately and rejects it in the type.
CONTENT_TYPE = "text/plain; version=0.0.4"

# Latency from "should happen" to "happened": 10 ms to 10 minutes.
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600)


class WorkerMetrics:
    """The collectors of one worker process, on their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events_consumed = Counter(
            "omnicue_events_consumed", "Valid events consumed, by type", ["type"], registry=r
        )
        self.events_invalid = Counter(
            "omnicue_events_invalid",
            "Events sent to the dead-letter topic, by reason",
            ["reason"],
            registry=r,
        )
        self.actions = Counter(
            "omnicue_actions", "Actions emitted, by rule and channel", ["rule", "channel"],
            registry=r,
        )
        self.decisions = Counter(
            "omnicue_decisions", "Decisions made, by outcome and reason", ["outcome", "reason"],
            registry=r,
        )
        self.identity_messages = Counter(
            "omnicue_identity_messages",
            "Identity messages sent between keys (link requests, merges, forwards, "
            "claims; triggers/linking.py), by kind",
            ["kind"],
            registry=r,
        )
        self.event_to_action_latency = Histogram(
            "omnicue_event_to_action_latency_seconds",
            "Processing latency: seconds from the later of the input's arrival and the "
            "step's effective due time (after deferrals) to the action's emission",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.action_deferral = Histogram(
            "omnicue_action_deferral_seconds",
            "Seconds an action's step was deferred (quiet hours, frequency caps) past "
            "its own due time",
            buckets=(0, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400, 3 * 86400),
            registry=r,
        )
        self.step_errors = Counter(
            "omnicue_step_errors",
            "Journey step evaluations that raised (each retries later, with backoff), "
            "by rule",
            ["rule"],
            registry=r,
        )
        self.timer_errors = Counter(
            "omnicue_timer_errors",
            "Customers whose due steps failed outside any one step (a timer input "
            "dead-lettered, or the evaluation after a batch); retried a minute later",
            registry=r,
        )
        self.rules_invalid = Counter(
            "omnicue_rules_invalid",
            "Applied rules records that did not parse or validate (the worker kept its "
            "previous rules)",
            registry=r,
        )
        self.timer_lateness = Histogram(
            "omnicue_timer_lateness_seconds",
            "Seconds between a timer's due time and its processing",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.timers_pending = Gauge(
            "omnicue_timers_pending", "Customers with a pending journey step", registry=r
        )
        self.customers_in_state = Gauge(
            "omnicue_customers_in_state", "Customers held in this worker's state", registry=r
        )
        self.batch_events = Histogram(
            "omnicue_batch_events",
            "Inputs per processing batch",
            buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2500),
            registry=r,
        )
        # Campaign performance (issue 13, live): what the attribution records say.
        self.conversions = Counter(
            "omnicue_conversions",
            "Conversions (orders) credited to touches, by the touch's rule and channel and "
            "the attribution model (a conversion's credits under one model sum to 1)",
            ["rule", "channel", "model"],
            registry=r,
        )
        self.attributed_revenue = Counter(
            "omnicue_attributed_revenue",
            "Order value credited to touches (credit x value), by the touch's rule and "
            "channel and the attribution model",
            ["rule", "channel", "model"],
            registry=r,
        )
        self.orders = Counter(
            "omnicue_orders",
            "Conversions (order.completed) applied, by whether a touch was in their "
            "lookback (attributed true|false)",
            ["attributed"],
            registry=r,
        )
        self.holdout_entries = Counter(
            "omnicue_holdout_entries",
            "Journey starts of rules with a holdout (and `_global`), by rule and group "
            "(treatment|control)",
            ["rule", "group"],
            registry=r,
        )
        self.holdout_conversions = Counter(
            "omnicue_holdout_conversions",
            "Conversions within a rule's conversion window after the customer's last "
            "entry, by rule (and `_global`) and group (treatment|control)",
            ["rule", "group"],
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class SenderMetrics:
    """The collectors of one sender process (one channel), on their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.actions = Counter(
            "omnicue_sender_actions",
            "Actions handled by a sender, by channel and outcome (sent|duplicate|expired|failed)",
            ["channel", "outcome"],
            registry=r,
        )
        self.failed = Counter(
            "omnicue_sender_failed",
            "Actions failed for good, by channel and reason (expired, http_<status>, ...)",
            ["channel", "reason"],
            registry=r,
        )
        self.retries = Counter(
            "omnicue_sender_retries",
            "Actions handed to the retry topic after a retryable failure",
            ["channel"],
            registry=r,
        )
        self.rate_limited = Counter(
            "omnicue_sender_rate_limited",
            "HTTP 429 replies from the provider (each halves the shared rate, at most "
            "once a second)",
            ["channel"],
            registry=r,
        )
        self.rate_limit = Gauge(
            "omnicue_sender_rate_limit",
            "The channel's current shared send rate (per second; after AIMD cuts)",
            ["channel"],
            registry=r,
        )
        self.in_flight = Gauge(
            "omnicue_sender_in_flight",
            "Actions this process has read and not yet finished (sending, waiting for a "
            "lease, a token or a retry's time)",
            ["channel"],
            registry=r,
        )
        self.send_latency = Histogram(
            "omnicue_sender_send_latency_seconds",
            "Seconds from the action's creation to the provider's acceptance",
            ["channel"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["CONTENT_TYPE", "SenderMetrics", "WorkerMetrics"]
