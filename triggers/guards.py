"""Contact-pressure guards: quiet hours, frequency caps, holdouts and variants.

All deterministic: local time comes from the customer's timezone and `now`, and
group membership from a stable hash, so live workers and replays agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from schemas.events import ActionChannel
from schemas.rules import Cap, Caps, QuietHours, Variant
from triggers.state import SentRecord


@lru_cache(maxsize=512)
def zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def quiet_until(window: QuietHours, now: datetime, timezone: str) -> datetime | None:
    """The end of the quiet window `now` falls in (UTC), or None outside quiet hours."""
    local = now.astimezone(zone(timezone))
    t = local.time().replace(tzinfo=None)
    if window.start == window.end:
        return None
    if window.start < window.end:
        inside = window.start <= t < window.end
    else:  # the window wraps midnight, like 21:00-08:00
        inside = t >= window.start or t < window.end
    if not inside:
        return None
    end = datetime.combine(local.date(), window.end, tzinfo=local.tzinfo)
    if end <= local:
        end = datetime.combine(local.date() + timedelta(days=1), window.end, tzinfo=local.tzinfo)
    return end.astimezone(now.tzinfo)


def stable_fraction(namespace: str, customer_id: str) -> float:
    """A number in [0, 1) fixed by (namespace, customer): the same on every worker and run."""
    digest = hashlib.sha256(f"{namespace}\x1f{customer_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_holdout(fraction: float, namespace: str, customer_id: str) -> bool:
    return fraction > 0 and stable_fraction(f"holdout:{namespace}", customer_id) < fraction


def pick_variant(rule_id: str, variants: dict[str, Variant], customer_id: str) -> str | None:
    if not variants:
        return None
    names = sorted(variants)
    total = sum(variants[n].weight for n in names)
    point = stable_fraction(f"variant:{rule_id}", customer_id) * total
    for name in names:
        point -= variants[name].weight
        if point < 0:
            return name
    return names[-1]


def _free_at(times: list[datetime], cap: Cap, now: datetime) -> datetime | None:
    """None if one more is allowed now, else when the rolling window lets one more in."""
    recent = sorted(t for t in times if t > now - cap.window)
    if len(recent) < cap.limit:
        return None
    if cap.limit == 0:
        return datetime.max.replace(tzinfo=now.tzinfo)
    # The window must drop enough of the oldest to get below the limit.
    return recent[len(recent) - cap.limit] + cap.window


def cap_free_at(
    log: Iterable[SentRecord],
    channel: ActionChannel,
    rule_id: str,
    caps: Caps,
    rule_cap: Cap | None,
    now: datetime,
) -> datetime | None:
    """None if sending on `channel` now stays within every cap; else when it would."""
    records = list(log)
    limits = [
        ([r.at for r in records], caps.total),
        ([r.at for r in records if r.channel == channel],
         caps.channels.get(channel, caps.per_channel)),
    ]
    if rule_cap is not None:
        limits.append(([r.at for r in records if r.rule_id == rule_id], rule_cap))
    blocked = [t for times, cap in limits if (t := _free_at(times, cap, now)) is not None]
    return max(blocked) if blocked else None


def longest_window(caps: Caps, rule_caps: Iterable[Cap | None]) -> timedelta:
    windows = [caps.total.window, caps.per_channel.window]
    windows += [c.window for c in caps.channels.values()]
    windows += [c.window for c in rule_caps if c is not None]
    return max(windows)
