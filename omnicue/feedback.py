"""Delivery feedback from providers as contract events (`message.*`): the generic JSON
form of `POST /v1/feedback`, the SendGrid Event Webhook and Twilio's SMS status
callback, each with its own authentication. Pure: parsing, signature checks and the
status mapping; `omnicue.ingest` serves them and publishes the events.

An event is routed by the customer key, which the action id alone does not give. So
whatever the provider echoes back carries both: the generic form names `customer_id`
(a webhook provider got the whole action, `customer_id` in it); SendGrid echoes the
custom args `omnicue_action_id` and `omnicue_customer_id` that the SMTP transport sets
(`X-SMTPAPI` unique args) or a webhook adapter passes on (`feedback.custom_args` in the
webhook body); Twilio calls the status callback URL with `action_id` and
`customer_id` in its query (`feedback.status_callback` in the webhook body). No lookup,
so no store to keep and no race with the sender's own records.

Every event's id derives from (action id, status), `fb-<status>-<action_id>` (the
senders' own `message.sent` / `message.failed` ids too): a provider's retried callback,
or a second open of the same email, is a duplicate the engine drops.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, get_args
from urllib.parse import urlencode, urlsplit, urlunsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from schemas.events import Channel

Status = Literal[
    "sent", "delivered", "opened", "clicked", "bounced", "complained", "unsubscribed", "failed"
]
STATUSES: frozenset[str] = frozenset(get_args(Status))
# What the generic form takes: `sent` is the senders' own to say.
GENERIC_STATUSES: frozenset[str] = STATUSES - {"sent"}
CHANNELS: frozenset[str] = frozenset(get_args(Channel))
# The custom args (SendGrid) and query parameters (Twilio) that carry the ids back.
ACTION_ARG = "omnicue_action_id"
CUSTOMER_ARG = "omnicue_customer_id"
CALLBACK_ACTION = "action_id"
CALLBACK_CUSTOMER = "customer_id"
SENDGRID_SIGNATURE = "X-Twilio-Email-Event-Webhook-Signature"
SENDGRID_TIMESTAMP = "X-Twilio-Email-Event-Webhook-Timestamp"
TWILIO_SIGNATURE = "X-Twilio-Signature"
_REASON_LIMIT = 256


class FeedbackError(ValueError):
    """One feedback item cannot be an event; says which field and why."""


def feedback_event_id(action_id: str, status: str) -> str:
    """Deterministic, so every copy of the same fact is one event to the engine."""
    return f"fb-{status}-{action_id}"


def feedback_event(
    action_id: str,
    customer_id: str,
    status: str,
    occurred_at: datetime | str,
    channel: str,
    reason: str | None = None,
) -> dict[str, Any]:
    """The contract event (a dict, still to be validated) for one item of feedback."""
    if status not in STATUSES:
        raise FeedbackError(
            f"status: {status!r} is not one of {', '.join(sorted(STATUSES))}"
        )
    properties: dict[str, Any] = {"action_id": action_id}
    if reason:
        properties["reason"] = reason[:_REASON_LIMIT]
    at = occurred_at.isoformat() if isinstance(occurred_at, datetime) else occurred_at
    return {
        "event_id": feedback_event_id(action_id, status),
        "type": f"message.{status}",
        "occurred_at": at,
        "channel": channel,
        "customer_id": customer_id,
        "properties": properties,
    }


def _text(item: Mapping[str, Any], name: str, required: bool = True) -> str | None:
    value = item.get(name)
    if value is None or value == "":
        if required:
            raise FeedbackError(f"{name}: Field required")
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise FeedbackError(f"{name}: must be a string")
    return value


# ------------------------------------------------------------------ the generic form


def generic_event(item: Any, default_channel: Channel) -> dict[str, Any]:
    """`{"action_id", "customer_id", "status", "occurred_at", "reason"?, "channel"?}`."""
    if not isinstance(item, dict):
        raise FeedbackError("a feedback item must be a JSON object")
    known = {"action_id", "customer_id", "status", "occurred_at", "reason", "channel"}
    extra = sorted(set(item) - known)
    if extra:
        raise FeedbackError(f"{extra[0]}: Extra inputs are not permitted")
    action_id = _text(item, "action_id")
    customer_id = _text(item, "customer_id")
    status = _text(item, "status")
    occurred_at = _text(item, "occurred_at")
    channel = _text(item, "channel", required=False) or default_channel
    assert action_id and customer_id and status and occurred_at
    if status not in GENERIC_STATUSES:
        raise FeedbackError(
            f"status: {status!r} is not one of {', '.join(sorted(GENERIC_STATUSES))}"
        )
    return feedback_event(
        action_id, customer_id, status, occurred_at, channel, _text(item, "reason", False)
    )


# ------------------------------------------------------------------------- SendGrid


def load_sendgrid_key(text: str) -> ec.EllipticCurvePublicKey:
    """The verification key from SendGrid's Mail Settings: base64 DER (as SendGrid
    shows it) or PEM. Raises ValueError for anything else."""
    stripped = text.strip()
    try:
        if stripped.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(stripped.encode())
        else:
            der = base64.b64decode(stripped, validate=True)
            key = serialization.load_der_public_key(der)
    except (ValueError, binascii.Error, TypeError) as exc:
        raise ValueError(f"not a SendGrid verification key (base64 DER or PEM): {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("the SendGrid verification key must be an ECDSA (elliptic curve) key")
    return key


def verify_sendgrid(
    key: ec.EllipticCurvePublicKey, body: bytes, signature: str | None, timestamp: str | None
) -> bool:
    """SendGrid's Signed Event Webhook: an ECDSA (SHA-256) signature, base64 DER, over
    the timestamp header's value followed by the exact body bytes."""
    if not signature or not timestamp:
        return False
    try:
        raw = base64.b64decode(signature, validate=True)
        key.verify(raw, timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


# SendGrid event -> our status; the ones absent (processed, deferred: still trying,
# group_resubscribe, account events) are no feedback and are skipped.
SENDGRID_STATUSES: dict[str, Status] = {
    "delivered": "delivered",
    "open": "opened",
    "click": "clicked",
    "dropped": "failed",
    "spamreport": "complained",
    "spam_report": "complained",
    "unsubscribe": "unsubscribed",
    "group_unsubscribe": "unsubscribed",
}


@dataclass(frozen=True)
class Mapped:
    """What became of a provider's item: an event, or skipped with why."""

    event: dict[str, Any] | None
    skipped: str | None = None


def _arg(item: Mapping[str, Any], name: str) -> Any:
    # v3 puts custom (unique) args at the top level of each event; older payloads and
    # some relays nest them.
    if name in item:
        return item[name]
    for nested in ("unique_args", "custom_args"):
        args = item.get(nested)
        if isinstance(args, dict) and name in args:
            return args[name]
    return None


def sendgrid_event(item: Any) -> Mapped:
    """One event of the Event Webhook's JSON array."""
    if not isinstance(item, dict):
        raise FeedbackError("a SendGrid event must be a JSON object")
    kind = item.get("event")
    if kind == "bounce":
        # `type` tells a hard bounce from a block (a reputation or content refusal of
        # this message: the address may be fine).
        status: Status = "failed" if item.get("type") == "blocked" else "bounced"
    elif isinstance(kind, str) and kind in SENDGRID_STATUSES:
        status = SENDGRID_STATUSES[kind]
    else:
        return Mapped(None, f"event {kind!r} is not delivery feedback")
    action_id, customer_id = _arg(item, ACTION_ARG), _arg(item, CUSTOMER_ARG)
    if not isinstance(action_id, str) or not action_id:
        # Mail this SendGrid account sent for someone else than Omnicue.
        return Mapped(None, f"no {ACTION_ARG} custom arg")
    if not isinstance(customer_id, str) or not customer_id:
        raise FeedbackError(f"{CUSTOMER_ARG}: custom arg required beside {ACTION_ARG}")
    timestamp = item.get("timestamp")
    if not isinstance(timestamp, int | float) or isinstance(timestamp, bool):
        raise FeedbackError("timestamp: a Unix time is required")
    occurred_at = datetime.fromtimestamp(timestamp, UTC)
    reason = item.get("reason") or item.get("response") or item.get("type")
    if kind == "bounce" and item.get("type") == "blocked":
        reason = f"blocked: {reason}" if reason and reason != "blocked" else "blocked"
    return Mapped(feedback_event(
        action_id, customer_id, status, occurred_at, "email",
        reason if isinstance(reason, str) else None,
    ))  # fmt: skip


# --------------------------------------------------------------------------- Twilio


def twilio_signature(auth_token: str, url: str, params: Iterable[tuple[str, str]]) -> str:
    """`X-Twilio-Signature`: base64 of the HMAC-SHA1, keyed by the auth token, of the
    full URL Twilio called followed by every POST parameter's name and value, sorted by
    name (no separators)."""
    data = url + "".join(name + value for name, value in sorted(params))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def verify_twilio(
    auth_token: str, url: str, params: Iterable[tuple[str, str]], signature: str | None
) -> bool:
    if not signature:
        return False
    return hmac.compare_digest(twilio_signature(auth_token, url, params), signature)


def status_callback_url(base: str, action_id: str, customer_id: str) -> str:
    """The StatusCallback a Twilio message is sent with: `base` with the ids in its query."""
    parts = urlsplit(base)
    ids = urlencode({CALLBACK_ACTION: action_id, CALLBACK_CUSTOMER: customer_id})
    query = f"{parts.query}&{ids}" if parts.query else ids
    return urlunsplit(parts._replace(query=query))


# Error codes of an undelivered message that mean the number cannot receive SMS: a
# hard bounce. The others (carrier trouble, filtering, a full handset) are failures.
TWILIO_HARD = frozenset({
    "30003",  # unreachable destination handset
    "30005",  # unknown destination handset
    "30006",  # landline or unreachable carrier
})  # fmt: skip
# MessageStatus values that are no feedback (still on the way, or not yet sent).
TWILIO_PENDING = frozenset({"accepted", "scheduled", "queued", "sending", "receiving", "received"})


def twilio_event(
    params: Mapping[str, str], query: Mapping[str, str], received_at: datetime
) -> Mapped:
    """One status callback: the form's `MessageStatus` (and `ErrorCode`), the ids from
    the callback URL's query. Twilio sends no event time: the time it arrived stands in."""
    status_text = params.get("MessageStatus") or params.get("SmsStatus")
    if not status_text:
        raise FeedbackError("MessageStatus: Field required")
    action_id = query.get(CALLBACK_ACTION)
    customer_id = query.get(CALLBACK_CUSTOMER)
    if not action_id or not customer_id:
        raise FeedbackError(
            f"the status callback URL needs ?{CALLBACK_ACTION}=...&{CALLBACK_CUSTOMER}=..."
        )
    error = params.get("ErrorCode") or None
    status: Status
    reason: str | None = None
    if status_text == "delivered":
        status = "delivered"
    elif status_text == "sent":
        # Handed to the carrier: the same `fb-sent-` event the sender published.
        status = "sent"
    elif status_text == "read":
        status = "opened"
    elif status_text in ("undelivered", "failed", "canceled"):
        status = "bounced" if error in TWILIO_HARD else "failed"
        reason = f"twilio_{status_text}" + (f"_{error}" if error else "")
    elif status_text in TWILIO_PENDING:
        return Mapped(None, f"MessageStatus {status_text!r} is no feedback yet")
    else:
        return Mapped(None, f"MessageStatus {status_text!r} is not delivery feedback")
    return Mapped(feedback_event(action_id, customer_id, status, received_at, "sms", reason))


__all__ = [
    "ACTION_ARG",
    "CALLBACK_ACTION",
    "CALLBACK_CUSTOMER",
    "CUSTOMER_ARG",
    "GENERIC_STATUSES",
    "SENDGRID_SIGNATURE",
    "SENDGRID_TIMESTAMP",
    "STATUSES",
    "TWILIO_SIGNATURE",
    "FeedbackError",
    "Mapped",
    "feedback_event",
    "feedback_event_id",
    "generic_event",
    "load_sendgrid_key",
    "sendgrid_event",
    "status_callback_url",
    "twilio_event",
    "twilio_signature",
    "verify_sendgrid",
    "verify_twilio",
]
