"""The Faust app factory: settings in, a wired pipeline out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import faust
from faust.types import TableT

from omnicue.metrics import WorkerMetrics
from omnicue.settings import Settings
from schemas import topics as names
from streams.consumer import PromptFetchConsumer
from streams.outbox import RecordSender
from streams.producer import IdempotentProducer
from streams.progress import Progress, consumer_progress
from streams.stores import StateCacheTableManager
from streams.topics import Topics, declare_topics
from triggers.engine import EnginePolicy
from triggers.identity import IdentityPolicy
from triggers.ruleset import RuleSet
from triggers.schedule import TimerSchedule

# faust's producer linger on Apache Kafka (seconds); faust's default is 0.
PRODUCER_LINGER_S = 0.005


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Pipeline:
    """Everything the agents, timers and views of one worker share."""

    settings: Settings
    app: faust.App
    topics: Topics
    customers: TableT[bytes, bytes]
    identities: TableT[bytes, bytes]
    rules: RuleSet
    policy: EnginePolicy
    metrics: WorkerMetrics
    sender: RecordSender
    progress: Progress
    identity_policy: IdentityPolicy
    schedule: TimerSchedule = field(default_factory=TimerSchedule)
    clock: Callable[[], datetime] = utc_now


def faust_app(settings: Settings) -> faust.App:
    dev = settings.dev_broker
    session_timeout = settings.broker_session_timeout or (6.0 if dev else 10.0)
    app = faust.App(
        settings.app_id,
        broker=settings.broker,
        store=settings.store,
        datadir=str(settings.data_dir),
        autodiscover=False,
        web_host=settings.web_host,
        web_port=settings.web_port,
        canonical_url=settings.canonical_url,
        web_enabled=True,
        topic_partitions=settings.partitions,
        # Idempotent/transactional producers fail on the dev broker, and faust's
        # exactly_once still duplicates (#517): at-least-once plus deterministic
        # action ids and idempotent senders instead.
        processing_guarantee="at_least_once",
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        # The dev broker reports wrong end offsets for multi-record batches, and
        # tables then recover stale values; one record per batch avoids it.
        producer_max_batch_size=1 if dev else 16384,
        # On Apache Kafka faust's producer lingers 5 ms, as Kafka's own clients do by
        # default since 4.0: the changelog writes of a batch (and the bare agent's sends)
        # then go in fewer, fuller produce requests. Measured (bench.pipeline, 3
        # alternated pairs): +2-10% events per worker core for the pipeline, +13-23% for
        # the bare agent. On the dev broker a batch holds one record, so it would only wait.
        producer_linger=0.0 if dev else PRODUCER_LINGER_S,
        # The session timeout is how long a dead worker's partitions wait for a new
        # owner: faust's 60 s would hold a crashed worker's customers for a minute.
        # Kafka's classic 10 s; 6 s on the dev broker, whose first group join takes
        # about half of it. Heartbeats at a third of it, as Kafka recommends.
        broker_session_timeout=session_timeout,
        broker_heartbeat_interval=min(1.0 if dev else 3.0, session_timeout / 3),
        broker_rebalance_timeout=10.0 if dev else 60.0,
        # Static membership on Apache Kafka: a restarted worker rejoins as the member it
        # was and gets its partitions back at once, where a new member would wait for
        # the dead one's session to expire (measured in bench.recovery). A worker that
        # stops for good also leaves only when its session expires.
        consumer_group_instance_id=None if dev else settings.group_instance_id,
        table_standby_replicas=0 if dev else 1,
        stream_wait_empty=False,
        # Local state is a cache: partitions ahead of their changelog are discarded
        # and restored instead of stopping the worker with ConsistencyError.
        TableManager=StateCacheTableManager,
    )
    # Fetches wait at most 100 ms on both brokers (streams/consumer.py says why).
    app.transport.Consumer = PromptFetchConsumer  # type: ignore[misc]
    if not dev:
        app.transport.Producer = IdempotentProducer  # type: ignore[misc]
    return app


def create_app(
    settings: Settings,
    rules: RuleSet,
    *,
    clock: Callable[[], datetime] = utc_now,
    metrics: WorkerMetrics | None = None,
) -> Pipeline:
    # Imported here: each module registers one kind of Faust object on the app.
    from streams.customers import register_customer_agent
    from streams.ingest import register_ingest_agent
    from streams.rules_watch import register_rules_watcher
    from streams.tables import declare_customer_table, declare_identity_table
    from streams.timers import register_timers
    from streams.views import register_views

    app = faust_app(settings)
    topics = declare_topics(app, settings.partitions)
    pipeline = Pipeline(
        settings=settings,
        app=app,
        topics=topics,
        customers=declare_customer_table(app, settings.partitions),
        identities=declare_identity_table(app, settings.partitions),
        rules=rules,
        policy=settings.engine_policy(),
        metrics=metrics or WorkerMetrics(),
        sender=RecordSender(settings),
        progress=consumer_progress(
            app, names.EVENTS, names.CUSTOMER_INPUTS, timedelta(seconds=settings.allowed_lateness)
        ),
        identity_policy=settings.identity_policy(),
        clock=clock,
    )
    # A child of the app added before it starts: started before the agents run and
    # stopped after they have.
    app.add_dependency(pipeline.sender)
    register_ingest_agent(pipeline)
    register_customer_agent(pipeline)
    register_timers(pipeline)
    register_views(pipeline)
    register_rules_watcher(pipeline)
    return pipeline
