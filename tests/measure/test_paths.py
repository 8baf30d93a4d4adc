from __future__ import annotations

from measure.attribution import TouchIndex, attribute
from measure.paths import top_paths
from tests.measure.builders import DAY, T0, conversion, touch


def test_top_paths_by_count_then_by_path() -> None:
    touches = [
        touch("push", T0 - 2 * DAY, "c1"),
        touch("email", T0 - DAY, "c1"),
        touch("push", T0 - 2 * DAY, "c2"),
        touch("email", T0 - DAY, "c2"),
        touch("sms", T0 - DAY, "c3"),
    ]
    index = TouchIndex(touches)
    attributed = attribute(
        [
            conversion(T0, customer_id="c1", channel="store"),
            conversion(T0, customer_id="c2", channel="store"),
            conversion(T0, customer_id="c3", channel="web"),
            conversion(T0, customer_id="c4"),  # no touch: no path
        ],
        index,
        7 * DAY,
    )
    paths = top_paths(attributed)
    assert [(p.path, p.conversions) for p in paths] == [
        (["push", "email", "order@store"], 2),
        (["sms", "order@web"], 1),
    ]
    assert len(top_paths(attributed, top=1)) == 1
