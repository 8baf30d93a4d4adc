"""One frozen settings object, read from `OMNICUE_*` environment variables.

It is built once by the CLI and passed explicitly to everything that needs it;
nothing reads the environment on its own.
"""

from __future__ import annotations

import hashlib
import socket
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.events import Channel
from triggers.identity import DEFAULT_BLOCKED, IdentityPolicy

if TYPE_CHECKING:
    from triggers.engine import EnginePolicy


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OMNICUE_", frozen=True, extra="ignore")

    broker: str = Field("kafka://127.0.0.1:9092", description="Kafka bootstrap URL(s)")
    redis_url: str = "redis://127.0.0.1:6379/0"
    partitions: int = Field(8, ge=1, description="Partitions of every Omnicue topic")
    rules: Path | None = Field(None, description="Rules file; None uses the packaged rules")
    consent_policy: Literal["opt_in", "opt_out"] = "opt_in"
    default_timezone: str = "Asia/Seoul"
    dev_broker: bool = Field(False, description="True on the Tansu dev broker")

    app_id: str = "omnicue"
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    # The URL other workers use to reach this one (forwarding customer lookups to
    # their owner); default: http://<web host, or this hostname when 0.0.0.0>:<port>.
    advertised_url: str | None = None
    # Apache Kafka only: this worker's static member id in its consumer group, so that a
    # restarted worker takes its partitions back at once instead of waiting for its dead
    # member's session to expire (the dev broker runs without it).
    worker_id: str | None = Field(
        None,
        description="This worker's id in its consumer group: unique per worker, the same "
        "across its restarts. Default: the host, and a hash of the data dir and URL",
    )
    data_dir: Path = Path(".omnicue")
    store: str = Field("rocksdb://", description="Faust table store: rocksdb:// or memory://")
    batch_size: int = Field(500, ge=1, description="Max events per processing batch")
    batch_within: float = Field(0.05, gt=0, description="Seconds to wait to fill a batch")
    timer_interval: float = Field(0.25, gt=0, description="Seconds between timer checks")
    broker_session_timeout: float | None = Field(
        None,
        gt=0,
        description="Seconds before the group drops a worker that stopped heartbeating "
        "(a SIGKILL, a lost host): its partitions wait that long for a new owner. "
        "Default 10 on Apache Kafka, 6 on the dev broker",
    )
    allowed_lateness: float = Field(
        0.0,
        ge=0,
        description="Seconds producers may be out of order: a worker that is behind "
        "evaluates a step due at d once it has applied an input that occurred after "
        "d + this (see streams/progress.py)",
    )
    # Identity (triggers/identity.py). The salt keys the email and phone hashes: set a
    # secret one per deployment, and never change it (the index would match nothing).
    identity_salt: SecretStr = Field(
        SecretStr(""), description="Salt of the email and phone hashes in identity keys"
    )
    identity_blocked: str = Field(
        "",
        description="Comma-separated values never used for matching, beside the built-in "
        "placeholders (unknown, null, 0, test@example.com, ...)",
    )
    identity_idle_days: float = Field(
        30.0, gt=0, description="An anonymous profile idle this long is dropped, not merged"
    )
    identity_max_anonymous_ids: int = Field(
        100, ge=1, description="Anonymous ids a customer keeps linked (the oldest dropped)"
    )
    # `channel: best` (triggers/state.py, engagement_rates): a message's weight halves
    # with every half-life of its age.
    engagement_half_life_days: float = Field(
        30.0, gt=0, description="Half-life, in days, of a message's weight in engagement"
    )
    # Attribution (measure/): the live records and `omnicue report` default to these,
    # so that the two agree.
    attribution_lookback_days: float = Field(
        7.0, gt=0, description="Touches this long before a conversion count for it"
    )
    attribution_half_life_days: float = Field(
        7.0, gt=0, description="Half-life of the time_decay attribution model"
    )
    sender_claim_ttl: int = Field(7 * 86_400, description="Seconds a sent action id is remembered")
    sender_metrics_port: int = Field(6067, description="Port of a sender's /metrics (0: off)")
    sender_transport: Literal["console", "webhook", "smtp"] = "console"
    sender_url: str | None = Field(
        None, description="Webhook URL (`{channel}` is replaced), or smtp://host:port"
    )
    sender_rate: float | None = Field(
        None, gt=0, description="Sends per second per channel, shared by its senders (N/s)"
    )
    sender_timeout: float = Field(10.0, gt=0, description="Seconds per provider call")
    # Longer than a provider call, so a live sender's lease never lapses mid-call; short,
    # so a crashed sender's actions go out again soon.
    sender_lease_ttl: float = Field(30.0, gt=0, description="Seconds a sending lease lasts")
    # 128: measured (bench.webhook_send) 1.8x the sends/s of 64, where one process
    # stops being bound by its awaits and becomes bound by its CPU.
    sender_max_in_flight: int = Field(128, ge=1, description="Concurrent sends per process")
    webhook_secret: SecretStr | None = Field(None, description="HMAC key of webhook bodies")
    sender_status_callback_url: str | None = Field(
        None,
        description="Twilio StatusCallback for webhook-sent SMS, e.g. "
        "https://ingest.example.com/v1/feedback/twilio (the ids are added to its query)",
    )
    # Delivery feedback at the ingest (omnicue/feedback.py); unset: that endpoint is off.
    feedback_sendgrid_public_key: str | None = Field(
        None, description="SendGrid's Signed Event Webhook verification key (base64 or PEM)"
    )
    feedback_twilio_auth_token: SecretStr | None = Field(
        None, description="Twilio auth token, the key of X-Twilio-Signature"
    )
    feedback_public_url: str | None = Field(
        None,
        description="The ingest's URL as providers call it (behind a proxy): Twilio signs "
        "the URL it called",
    )
    # Messages (senders/render.py, senders/advertising.py, senders/smtp.py).
    sender_templates: Path | None = Field(
        None, description="Templates directory overriding the packaged ones (ko/, en/)"
    )
    sender_default_locale: Literal["ko", "en"] = Field(
        "en", description="Template language for a locale without templates"
    )
    sender_ad_label_policy: Literal["korea", "always", "never"] = Field(
        "korea",
        description="Which marketing sms/kakao/email get the (광고) label and opt-out "
        "(정보통신망법 제50조): korea (Korean locale or timezone), always, never",
    )
    sender_brand: str = Field("Omnicue", description="The sender's name, as ads must give it")
    sender_opt_out_phone: str | None = Field(
        None, description="Free opt-out number (080-...) in SMS and Kakao ads"
    )
    sender_unsubscribe_url: str | None = Field(
        None,
        description="Unsubscribe URL (`{action_id}`, `{customer_id}`, `{channel}` replaced): "
        "List-Unsubscribe, and the opt-out link of email ads",
    )
    sender_email_from: str = Field(
        "Omnicue <noreply@omnicue.localhost>",
        description="From of emails; its domain ends every Message-ID",
    )
    sender_smtp_starttls: bool = Field(False, description="Upgrade smtp:// with STARTTLS")
    sender_smtp_username: str | None = None
    sender_smtp_password: SecretStr | None = None
    sender_smtp_ca_file: Path | None = Field(
        None, description="CA bundle to verify the SMTP server with (a private relay)"
    )
    log_level: str = "info"

    ingest_host: str = Field("127.0.0.1", description="Address `omnicue ingest` listens on")
    ingest_port: int = Field(8088, ge=0, le=65535, description="Port of `omnicue ingest`")
    # Kept as written (`wk-web=web,wk-app=app`), so the settings still dump to the
    # environment and back; checked here, read as a mapping through `write_keys`.
    ingest_write_keys: str = Field(
        "",
        description="HTTP ingest write keys: comma-separated key=channel pairs, the "
        "channel of the messages sent with that key",
    )

    @field_validator("default_timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown IANA timezone {value!r}") from exc
        return value

    @field_validator("sender_rate", mode="before")
    @classmethod
    def _per_second(cls, value: Any) -> Any:
        # `50/s`, as `--rate` takes it; empty (compose's `${OMNICUE_SENDER_RATE:-}`): none.
        if isinstance(value, str) and not value.strip():
            return None
        if isinstance(value, str) and value.strip().endswith("/s"):
            return value.strip()[:-2]
        return value

    @model_validator(mode="after")
    def _lease_outlasts_a_call(self) -> Settings:
        if self.sender_lease_ttl <= self.sender_timeout:
            raise ValueError("sender_lease_ttl must be longer than sender_timeout")
        return self

    @field_validator("feedback_sendgrid_public_key")
    @classmethod
    def _sendgrid_key(cls, value: str | None) -> str | None:
        if value:
            from omnicue.feedback import load_sendgrid_key

            load_sendgrid_key(value)
        return value or None

    @field_validator("ingest_write_keys")
    @classmethod
    def _key_channel_pairs(cls, value: str) -> str:
        parse_write_keys(value)
        return value

    def identity_policy(self) -> IdentityPolicy:
        extra = {v.strip().lower() for v in self.identity_blocked.split(",") if v.strip()}
        return IdentityPolicy(
            salt=self.identity_salt.get_secret_value(),
            blocked=DEFAULT_BLOCKED | extra,
            idle_window=timedelta(days=self.identity_idle_days),
            max_anonymous_ids=self.identity_max_anonymous_ids,
        )

    def attribution_half_life(self) -> timedelta:
        return timedelta(days=self.attribution_half_life_days)

    def engine_policy(self) -> EnginePolicy:
        """The engine's policy from these settings: the worker's, replay's."""
        from triggers.engine import EnginePolicy

        return EnginePolicy(
            consent_policy=self.consent_policy,
            default_timezone=self.default_timezone,
            engagement_half_life=timedelta(days=self.engagement_half_life_days),
            touch_lookback=timedelta(days=self.attribution_lookback_days),
        )

    @property
    def write_keys(self) -> dict[str, Channel]:
        """`ingest_write_keys` as write key -> channel."""
        return parse_write_keys(self.ingest_write_keys)

    @property
    def canonical_url(self) -> str:
        if self.advertised_url:
            return self.advertised_url
        host = socket.gethostname() if self.web_host in ("0.0.0.0", "::") else self.web_host
        return f"http://{host}:{self.web_port}"

    @property
    def group_instance_id(self) -> str:
        """`worker_id`, or one derived from what no two workers share: the host, and
        (on one host) the data dir (each worker's own rocksdb) and the URL (its port)."""
        if self.worker_id:
            return self.worker_id
        own = f"{self.data_dir.resolve()}|{self.canonical_url}"
        digest = hashlib.sha1(own.encode(), usedforsecurity=False).hexdigest()[:12]
        return f"{self.app_id}-{socket.gethostname()}-{digest}"

    @property
    def bootstrap_servers(self) -> list[str]:
        """`kafka://h1:9092;h2:9092` as kafka-python/aiokafka host:port strings."""
        servers = []
        for part in self.broker.replace(",", ";").split(";"):
            part = part.strip()
            if "://" in part:
                part = part.split("://", 1)[1]
            if part:
                servers.append(part)
        return servers


def parse_write_keys(value: str) -> dict[str, Channel]:
    """`wk-web=web,wk-app=app` as {"wk-web": "web", "wk-app": "app"}; ValueError names
    the pair that is wrong."""
    channels = get_args(Channel)
    keys: dict[str, Channel] = {}
    for pair in value.split(","):
        if not pair.strip():
            continue
        key, sep, channel = (part.strip() for part in pair.partition("="))
        if not sep or not key or not channel:
            raise ValueError(
                f"{pair.strip()!r} is not a key=channel pair (expected e.g. wk-web=web,wk-app=app)"
            )
        if channel not in channels:
            raise ValueError(
                f"write key {key!r}: unknown channel {channel!r}; known: {', '.join(channels)}"
            )
        if key in keys:
            raise ValueError(f"write key {key!r} is listed twice")
        keys[key] = cast(Channel, channel)
    return keys
