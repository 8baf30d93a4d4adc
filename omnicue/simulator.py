"""Realistic cross-channel customer journeys, for demos, load and end-to-end tests.

`generate_journey` is pure (randomness comes from the caller's `random.Random`),
so a seed reproduces the same journeys; `run_simulator` only paces them in real
time and publishes them. Each event is sent when its `occurred_at` arrives, so
timestamps match what a real producer would report and the worker's clock-based
rules (cart abandonment delays) see realistic gaps.
"""

from __future__ import annotations

import heapq
import json
import random
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal

from omnicue.settings import Settings
from schemas.events import ActionChannel
from schemas.topics import EVENTS

if TYPE_CHECKING:
    from omnicue.ingest_client import IngestClient

# What a site's or an app's Segment library would send, with `--ingest`.
INGEST_CHANNELS = frozenset({"web", "app"})

Platform = Literal["ios", "android"]


@dataclass(frozen=True)
class Region:
    timezone: str
    locale: str
    phone_prefix: str
    weight: float


# Mostly a Korean shop with some overseas customers, so timezone-aware rules
# (quiet hours, send windows) see more than one offset.
REGIONS = (
    Region("Asia/Seoul", "ko-KR", "+82 10", 0.70),
    Region("America/New_York", "en-US", "+1 212", 0.14),
    Region("Asia/Tokyo", "ja-JP", "+81 90", 0.09),
    Region("Europe/London", "en-GB", "+44 7700", 0.07),
)

EMAIL_DOMAINS = ("example.com", "example.co.kr", "example.net")


@dataclass(frozen=True)
class Product:
    product_id: str
    category: str
    price: int  # KRW: no minor unit


CATALOG = (
    Product("sku-tee-basic", "fashion", 19_900),
    Product("sku-denim-slim", "fashion", 59_000),
    Product("sku-trench-coat", "fashion", 189_000),
    Product("sku-sneaker-run", "shoes", 129_000),
    Product("sku-loafer", "shoes", 89_000),
    Product("sku-cushion-spf", "beauty", 32_000),
    Product("sku-serum-vitc", "beauty", 45_000),
    Product("sku-lip-tint", "beauty", 14_500),
    Product("sku-earbuds", "electronics", 179_000),
    Product("sku-powerbank", "electronics", 39_900),
    Product("sku-smartwatch", "electronics", 349_000),
    Product("sku-kettle", "home", 49_000),
    Product("sku-duvet", "home", 119_000),
    Product("sku-mug-set", "home", 24_000),
    Product("sku-coffee-beans", "food", 18_500),
    Product("sku-kimchi-3kg", "food", 27_900),
    Product("sku-protein-bar", "food", 12_900),
)

STORES = ("store-gangnam", "store-hongdae", "store-myeongdong", "store-busan-seomyeon")

# Share of customers that sign up with each contact point or use the app.
P_EMAIL = 0.85
P_PHONE = 0.6
P_APP_USER = 0.5
# Marketing consent at sign-up, per channel: (granted, explicitly refused); the
# remainder never answer, which under opt-in counts as no consent.
CONSENT_ODDS: dict[ActionChannel, tuple[float, float]] = {
    "email": (0.6, 0.25),
    "push": (0.55, 0.3),
    "sms": (0.3, 0.4),
    "kakao": (0.45, 0.3),
}
# Journey outcomes once a cart exists.
P_BROWSE_ONLY = 0.2
# Of first visits on the web: browsing anonymously before signing up.
P_ANONYMOUS_FIRST = 0.5
P_PURCHASE = 0.35
P_CHECKOUT_ABANDONED = 0.1
P_EMPTIED = 0.15
# The rest of carts are simply abandoned.
P_STORE_VISIT = 0.15
P_STORE_PURCHASE = 0.5
P_CONSENT_CHANGE = 0.04

# Seconds between two events of a journey: journeys last a few seconds.
GAP = (0.2, 1.2)


@dataclass(frozen=True)
class Customer:
    """A customer's profile; `first_visit` decides whether a journey signs them up."""

    customer_id: str
    email: str | None
    phone: str | None
    timezone: str
    locale: str
    browser_id: str
    push_token: str | None = None
    platform: Platform | None = None
    consents: tuple[tuple[ActionChannel, bool], ...] = ()
    first_visit: bool = True

    @property
    def app_user(self) -> bool:
        return self.push_token is not None


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _hex(rng: random.Random, digits: int) -> str:
    return f"{rng.getrandbits(digits * 4):0{digits}x}"


def make_customer(rng: random.Random, index: int) -> Customer:
    region = rng.choices(REGIONS, weights=[r.weight for r in REGIONS])[0]
    email = None
    phone = None
    if rng.random() < P_EMAIL:
        email = f"user{index:05d}.{_hex(rng, 4)}@{rng.choice(EMAIL_DOMAINS)}"
    if rng.random() < P_PHONE or email is None:
        phone = f"{region.phone_prefix}-{rng.randrange(1000, 10_000)}-{rng.randrange(10_000):04d}"
    push_token = None
    platform: Platform | None = None
    if rng.random() < P_APP_USER:
        platform = rng.choice(("ios", "android"))
        push_token = f"{platform}-{_hex(rng, 32)}"
    reachable: dict[ActionChannel, bool] = {
        "email": email is not None,
        "push": push_token is not None,
        "sms": phone is not None,
        # KakaoTalk reaches Korean numbers only.
        "kakao": phone is not None and region.timezone == "Asia/Seoul",
    }
    consents: list[tuple[ActionChannel, bool]] = []
    for channel, (granted, refused) in CONSENT_ODDS.items():
        if not reachable[channel]:
            continue
        roll = rng.random()
        if roll < granted:
            consents.append((channel, True))
        elif roll < granted + refused:
            consents.append((channel, False))
    return Customer(
        customer_id=f"cust-{index:06d}",
        email=email,
        phone=phone,
        timezone=region.timezone,
        locale=region.locale,
        browser_id=f"web-{_hex(rng, 16)}",
        push_token=push_token,
        platform=platform,
        consents=tuple(consents),
    )


@dataclass
class _Journey:
    rng: random.Random
    customer: Customer
    at: datetime
    events: list[dict[str, Any]] = field(default_factory=list)
    # Before sign-up on the web: the cookie only, no customer id yet.
    anonymous: bool = False

    def add(self, type_: str, channel: str, properties: dict[str, Any]) -> dict[str, Any]:
        if self.events:
            self.at += timedelta(seconds=self.rng.uniform(*GAP))
        event: dict[str, Any] = {
            "event_id": _uuid(self.rng),
            "type": type_,
            "occurred_at": self.at.isoformat(timespec="milliseconds"),
            "channel": channel,
            "customer_id": self.customer.customer_id,
            "properties": properties,
        }
        if channel == "web":
            # The browser cookie: real web trackers send it alongside the login id.
            event["anonymous_id"] = self.customer.browser_id
            if self.anonymous:
                del event["customer_id"]
        self.events.append(event)
        return event


def generate_journey(rng: random.Random, customer: Customer, now: datetime) -> list[dict[str, Any]]:
    """One visit of `customer` starting at `now`: contract-valid event dicts in time order.

    A first visit signs the customer up (identify, consents, device registration);
    then product views, usually a cart, and one outcome: purchase, abandonment or an
    emptied cart, sometimes followed by a store visit.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    j = _Journey(rng, customer, now.astimezone(UTC))
    c = customer
    device = "app" if c.app_user and rng.random() < 0.7 else "web"

    if c.first_visit:
        if device == "web" and rng.random() < P_ANONYMOUS_FIRST:
            # Browses anonymously, then signs up: the identify carries both ids, which
            # links the cookie's profile to the customer (README, "Identity").
            j.anonymous = True
            for product in rng.sample(CATALOG, rng.randint(1, 3)):
                j.add("product.viewed", device, _viewed(product))
            j.anonymous = False
        traits: dict[str, Any] = {"timezone": c.timezone, "locale": c.locale}
        if c.email is not None:
            traits["email"] = c.email
        if c.phone is not None:
            traits["phone"] = c.phone
        j.add("identify", device, {"traits": traits})
        for channel, granted in c.consents:
            props = {"channel": channel, "category": "marketing", "granted": granted}
            j.add("consent.updated", device, props)
        if c.push_token is not None and c.platform is not None:
            j.add(
                "device.registered",
                "app",
                {"push_token": c.push_token, "platform": c.platform},
            )
    elif c.consents and rng.random() < P_CONSENT_CHANGE:
        # Returning customers sometimes change their mind in the preference center.
        channel, granted = rng.choice(c.consents)
        props = {"channel": channel, "category": "marketing", "granted": not granted}
        j.add("consent.updated", device, props)

    viewed = rng.sample(CATALOG, rng.randint(1, 5))
    for product in viewed:
        j.add("product.viewed", device, _viewed(product))

    if rng.random() >= P_BROWSE_ONLY:
        _cart(j, device, viewed)
    if rng.random() < P_STORE_VISIT:
        _store_visit(j)
    return j.events


def _viewed(product: Product) -> dict[str, Any]:
    return {"product_id": product.product_id, "price": product.price, "category": product.category}


def _cart(j: _Journey, device: str, viewed: list[Product]) -> None:
    rng = j.rng
    cart_id = f"cart-{_hex(rng, 12)}"
    # Mostly what was just viewed, sometimes a recommendation from elsewhere.
    candidates = list(viewed) + rng.sample(CATALOG, 2)
    picked: list[Product] = []
    for product in candidates:
        if product not in picked:
            picked.append(product)
    items = [(p, rng.choices((1, 2, 3), weights=(8, 2, 1))[0]) for p in picked[: rng.randint(1, 3)]]
    for product, quantity in items:
        j.add(
            "cart.item_added",
            device,
            {
                "cart_id": cart_id,
                "product_id": product.product_id,
                "quantity": quantity,
                "price": product.price,
            },
        )

    roll = rng.random()
    if roll < P_PURCHASE:
        j.add("checkout.started", device, {"cart_id": cart_id})
        j.add("order.completed", device, _order(rng, items, cart_id))
    elif roll < P_PURCHASE + P_CHECKOUT_ABANDONED:
        j.add("checkout.started", device, {"cart_id": cart_id})
    elif roll < P_PURCHASE + P_CHECKOUT_ABANDONED + P_EMPTIED:
        for product, quantity in items:
            j.add(
                "cart.item_removed",
                device,
                {"cart_id": cart_id, "product_id": product.product_id, "quantity": quantity},
            )
    # Otherwise abandoned: the cart just sits there, which is what the rules are for.


def _order(
    rng: random.Random, items: list[tuple[Product, int]], cart_id: str | None
) -> dict[str, Any]:
    order: dict[str, Any] = {
        "order_id": f"ord-{_hex(rng, 12)}",
        "value": sum(p.price * q for p, q in items),
        "currency": "KRW",
        "items": [{"product_id": p.product_id, "quantity": q, "price": p.price} for p, q in items],
    }
    if cart_id is not None:
        order["cart_id"] = cart_id
    return order


def _store_visit(j: _Journey) -> None:
    rng = j.rng
    store_id = rng.choice(STORES)
    # Offline visits come minutes later in reality; seconds keep the demo lively.
    j.add("store.visited", "store", {"store_id": store_id})
    if rng.random() < P_STORE_PURCHASE:
        items = [(p, 1) for p in rng.sample(CATALOG, rng.randint(1, 2))]
        order = _order(rng, items, None)
        order["store_id"] = store_id
        j.add("order.completed", "pos", order)


class JourneyPlanner:
    """Picks customers from a pool of `customers` and plans their next visit.

    Remembers who already signed up, and never lets two visits of one customer
    overlap: a customer picked again mid-visit comes back once that visit is over,
    so each customer's events stay in time order.
    """

    def __init__(self, rng: random.Random, customers: int) -> None:
        if customers < 1:
            raise ValueError("customers must be >= 1")
        self._rng = rng
        self._customers = customers
        self._pool: dict[int, Customer] = {}
        self._busy_until: dict[int, datetime] = {}

    def next_journey(self, now: datetime) -> list[dict[str, Any]]:
        rng = self._rng
        index = rng.randrange(self._customers)
        customer = self._pool.get(index) or make_customer(rng, index)
        start = now
        busy_until = self._busy_until.get(index)
        if busy_until is not None and busy_until >= now:
            start = busy_until + timedelta(seconds=rng.uniform(*GAP))
        events = generate_journey(rng, customer, start)
        self._busy_until[index] = datetime.fromisoformat(events[-1]["occurred_at"])
        self._pool[index] = replace(customer, first_visit=False)
        return events


# -- broken events ------------------------------------------------------------------

BrokenKind = Literal[
    "missing_field", "naive_timestamp", "unknown_type", "bad_value", "not_json", "not_utf8"
]
BROKEN_KINDS: tuple[BrokenKind, ...] = BrokenKind.__args__  # type: ignore[attr-defined]

# When the caller gives no clock: broken events stay deterministic for a seed.
_EPOCH = datetime(2025, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class BrokenEvent:
    kind: BrokenKind
    key: bytes | None
    value: bytes


def invalid_event(rng: random.Random, now: datetime | None = None) -> BrokenEvent:
    """An event a buggy producer might send; the contract rejects every one of them."""
    at = (now or _EPOCH).astimezone(UTC)
    customer_id = f"cust-{rng.randrange(1_000_000):06d}"
    base: dict[str, Any] = {
        "event_id": _uuid(rng),
        "type": "cart.item_added",
        "occurred_at": at.isoformat(timespec="milliseconds"),
        "channel": rng.choice(("web", "app")),
        "customer_id": customer_id,
        "properties": {
            "cart_id": f"cart-{_hex(rng, 12)}",
            "product_id": rng.choice(CATALOG).product_id,
            "quantity": 1,
            "price": rng.choice(CATALOG).price,
        },
    }
    key: bytes | None = customer_id.encode()
    kind = rng.choice(BROKEN_KINDS)
    if kind == "missing_field":
        victim = rng.choice(("event_id", "occurred_at", "price", "cart_id", "ids"))
        if victim == "ids":
            del base["customer_id"]
            key = None
        elif victim in ("price", "cart_id"):
            del base["properties"][victim]
        else:
            del base[victim]
    elif kind == "naive_timestamp":
        # Local wall-clock time without an offset: ambiguous, so the contract refuses it.
        base["occurred_at"] = at.replace(tzinfo=None).strftime(
            rng.choice(("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S.%f"))
        )
    elif kind == "unknown_type":
        base["type"] = rng.choice(("cart.abandoned", "page_view", "Order Completed", "addToCart"))
    elif kind == "bad_value":
        fix = rng.choice(("quantity", "price", "channel", "extra"))
        if fix == "quantity":
            base["properties"]["quantity"] = rng.choice((0, -1, "two"))
        elif fix == "price":
            base["properties"]["price"] = rng.choice((-1000, "39,900원"))
        elif fix == "channel":
            base["channel"] = "tiktok"
        else:
            base["user_agent"] = "Mozilla/5.0"  # unknown envelope field
    elif kind == "not_json":
        text = json.dumps(base)
        broken = rng.choice(
            (
                text[: rng.randrange(1, len(text) - 1)],  # truncated write
                text.replace('"', "'"),  # a Python repr instead of JSON
                f"customer_id={customer_id}&type=cart.item_added",  # form-encoded
            )
        )
        return BrokenEvent(kind, key, broken.encode())
    else:
        # Bytes that are not UTF-8 at all, e.g. a binary serializer on the wrong topic.
        return BrokenEvent(kind, key, b"\xac\xed\x00\x05" + rng.randbytes(12))
    return BrokenEvent(kind, key, json.dumps(base, ensure_ascii=False).encode())


# -- the publishing loop ------------------------------------------------------------


@dataclass
class SimulatorStats:
    journeys: int = 0
    events: int = 0
    invalid: int = 0
    # Sends the broker did not acknowledge (e.g. it went away mid-run).
    failed: int = 0

    def count_failure(self, _exc: BaseException) -> None:
        self.failed += 1


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT/SIGTERM end the loop cleanly (flush included) instead of killing it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_simulator(
    settings: Settings,
    *,
    rate: float = 5.0,
    customers: int = 1000,
    invalid_ratio: float = 0.02,
    duration: float | None = None,
    seed: int | None = None,
    stop: threading.Event | None = None,
    ingest: IngestClient | None = None,
) -> SimulatorStats:
    """Start `rate` journeys per second until `duration`, a signal, or `stop` is set.

    Valid events go through `EventProducer` (validated, keyed by customer), or, with
    `ingest`, the web and app ones as Segment messages through `omnicue ingest`, as a
    site's or an app's Segment library would send them; broken ones through a raw
    producer straight to the events topic, so they exercise the worker's dead-letter
    path.
    """
    if rate <= 0:
        raise ValueError("rate must be > 0")
    if not 0 <= invalid_ratio < 1:
        raise ValueError("invalid_ratio must be in [0, 1)")

    from kafka import KafkaProducer

    from omnicue.producer import EventProducer

    stop = stop or threading.Event()
    master = random.Random(seed)
    # Separate streams: which journeys are generated must not depend on timing
    # (how many invalid events happened to be drawn in between).
    planner = JourneyPlanner(random.Random(master.getrandbits(64)), customers)
    invalid_rng = random.Random(master.getrandbits(64))
    # Per valid event, so that invalid ones make up `invalid_ratio` of everything sent.
    p_invalid = invalid_ratio / (1 - invalid_ratio)

    stats = SimulatorStats()
    queue: list[tuple[float, int, dict[str, Any]]] = []
    seq = 0

    raw = KafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"{settings.app_id}-simulator-raw",
    )
    started = time.monotonic()
    last_report = started
    via = f", web and app through {ingest.url}" if ingest is not None else ""
    print(
        f"simulator started: {rate:g} journeys/s, {customers} customers, "
        f"{invalid_ratio:.1%} invalid, broker {settings.broker}{via}",
        flush=True,
    )
    try:
        with EventProducer(settings) as producer, _stop_on_signals(stop):
            while not stop.is_set():
                mono = time.monotonic()
                elapsed = mono - started
                if duration is not None and elapsed >= duration:
                    break
                # Start every journey owed by now (the first one immediately).
                while stats.journeys < int(elapsed * rate) + 1:
                    wall = datetime.now(UTC)
                    for event in planner.next_journey(wall):
                        offset = datetime.fromisoformat(event["occurred_at"]) - wall
                        heapq.heappush(queue, (mono + offset.total_seconds(), seq, event))
                        seq += 1
                    stats.journeys += 1
                # Send whatever is due: events go out when they "happen".
                via_ingest: list[dict[str, Any]] = []
                while queue and queue[0][0] <= time.monotonic():
                    _, _, event = heapq.heappop(queue)
                    if ingest is not None and event["channel"] in INGEST_CHANNELS:
                        via_ingest.append(event)
                    else:
                        producer.send(event).add_errback(stats.count_failure)
                    stats.events += 1
                    if invalid_rng.random() < p_invalid:
                        broken = invalid_event(invalid_rng, datetime.now(UTC))
                        raw.send(EVENTS, key=broken.key, value=broken.value).add_errback(
                            stats.count_failure
                        )
                        stats.invalid += 1
                if via_ingest and ingest is not None:
                    sent = ingest.send(via_ingest)
                    stats.failed += sent.failed
                    for error in sent.errors[:3]:
                        print(f"simulator: ingest: {error}", file=sys.stderr, flush=True)
                now = time.monotonic()
                if now - last_report >= 10:
                    last_report = now
                    _report(stats, now - started)
                next_start = started + (stats.journeys / rate)
                wake = min(next_start, queue[0][0] if queue else next_start, now + 0.5)
                stop.wait(max(0.0, wake - time.monotonic()))
            producer.flush()
    finally:
        raw.flush()
        raw.close()
    _report(stats, time.monotonic() - started, final=True)
    return stats


def _report(stats: SimulatorStats, elapsed: float, final: bool = False) -> None:
    what = "simulator stopped" if final else "simulator"
    print(
        f"{what}: {stats.journeys} journeys, {stats.events} events, "
        f"{stats.invalid} invalid, {stats.failed} not delivered in {elapsed:.0f}s",
        file=sys.stdout,
        flush=True,
    )
