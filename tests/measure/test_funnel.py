from __future__ import annotations

import pytest

from measure.attribution import TouchIndex, attribute
from measure.funnel import by_channel, by_rule, funnel
from schemas.report import Funnel
from tests.measure.builders import DAY, T0, conversion, touch


def test_funnel_per_channel_counts_stages_last_touch_conversions_cost_and_roas() -> None:
    touches = [
        touch("email", T0 - 2 * DAY, delivered=True, opened=True, clicked=True),
        touch("push", T0 - DAY, delivered=True),
        touch("email", T0 - DAY, customer_id="c2", delivered=True, unsubscribed=True),
        touch("sms", T0 - DAY, customer_id="c3"),
    ]
    index = TouchIndex(touches)
    attributed = attribute(
        [conversion(T0, 40.0, "c1"), conversion(T0, 10.0, "c2"), conversion(T0, 5.0, "c9")],
        index,
        7 * DAY,
    )
    result = funnel(touches, attributed, by_channel, {"sms": 20.0, "email": 0.5})
    assert result["email"] == Funnel(
        sent=2, delivered=2, opened=1, clicked=1, converted=1, revenue=10.0,
        revenue_per_message=5.0, unsubscribed=1, unsubscribe_rate=0.5, cost=1.0, roas=10.0,
    )  # fmt: skip
    # c1's last touch was the push.
    assert (result["push"].converted, result["push"].revenue, result["push"].roas) == (1, 40, None)
    assert result["sms"].cost == 20.0 and result["sms"].roas == pytest.approx(0.0)


def test_funnel_per_rule() -> None:
    touches = [
        touch("email", T0 - DAY, rule_id="welcome"),
        touch("push", T0 - DAY, customer_id="c2"),
    ]
    index = TouchIndex(touches)
    result = funnel(touches, attribute([conversion(T0)], index, 7 * DAY), by_rule)
    assert {k: (v.sent, v.converted) for k, v in result.items()} == {
        "cart_abandonment": (1, 0),
        "welcome": (1, 1),
    }
