"""Partitioned replay (`omnicue replay --workers N`, `--partition i/N`, `replay merge`):
actions, decisions and the summary's counts are the same for every N, and the same
as one replayer of the whole log writes."""

from __future__ import annotations

import gzip
import random
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import zstandard
from typer.testing import CliRunner

from omnicue.cli import app
from omnicue.partitioned import IdentityGroups, PartitionSpec, run_partitioned
from omnicue.replay import ReplayInputError, ReplaySummary, format_for, run_replay
from omnicue.report import run_report
from omnicue.settings import Settings
from tests.factories import T0, event_dict
from triggers.partitioner import partition_for

REES46_HEADER = (
    "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session"
)


def generated_log(seed: int = 14, customers: int = 40) -> list[bytes]:
    """A time-ordered contract JSONL log with what partitioning could break: anonymous
    visitors who identify later (their carts and consents must reach the customer's
    partition), one who never does, a device shared by two customers, an alias of
    two known customers, late events, redeliveries and invalid lines."""
    rng = random.Random(seed)
    at = T0
    lines: list[dict[str, Any] | bytes] = []

    def add(type_: str, props: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        nonlocal at
        at += timedelta(seconds=rng.randrange(1, 600))
        data = event_dict(type_, props, at=kw.pop("at", at), **kw)
        lines.append(data)
        return data

    for n in range(customers):
        customer = f"c-{n}"
        anonymous = f"a-{n}"
        cart = f"cart-{n}"
        if n % 3 == 0:
            # Anonymous first: consent, views and a cart, then the link.
            anon: dict[str, Any] = {"customer_id": None, "anonymous_id": anonymous}
            add("consent.updated", {"channel": "email", "category": "marketing",
                                    "granted": True}, **anon)  # fmt: skip
            add("product.viewed", {"product_id": f"p-{n}", "price": 12.5}, **anon)
            add("cart.item_added", {"cart_id": cart, "product_id": f"p-{n}", "quantity": 1,
                                    "price": 12.5}, **anon)  # fmt: skip
            add("identify", {"traits": {"email": f"{customer}@example.com"}},
                customer_id=customer, anonymous_id=anonymous)  # fmt: skip
        else:
            add("identify", {"traits": {"email": f"{customer}@example.com"}}, customer_id=customer)
            add("consent.updated", {"channel": "email", "category": "marketing",
                                    "granted": True}, customer_id=customer)  # fmt: skip
            add("cart.item_added", {"cart_id": cart, "product_id": f"p-{n}", "quantity": 1,
                                    "price": 30.0}, customer_id=customer)  # fmt: skip
        if n % 4 == 0:
            add("order.completed", {"order_id": f"o-{n}", "cart_id": cart, "value": 30.0,
                                    "currency": "USD"}, customer_id=customer)  # fmt: skip
        if n % 5 == 0:
            # Late, by up to two hours: a cart reminder due at once, or soon.
            add("cart.item_added", {"cart_id": f"late-{n}", "product_id": "p-late",
                                    "quantity": 1, "price": 5.0}, customer_id=customer,
                at=at - timedelta(minutes=rng.randrange(1, 120)))  # fmt: skip
        if n % 7 == 0:
            lines.append(lines[-1])  # a redelivery
        if n % 11 == 0:
            lines.append(b'{"not": "an event"')
    # A device shared by two customers; a visitor who never identifies.
    add("cart.item_added", {"cart_id": "shared", "product_id": "p", "quantity": 1},
        customer_id=None, anonymous_id="kiosk")  # fmt: skip
    add("identify", {"traits": {}}, customer_id="c-1", anonymous_id="kiosk")
    add("identify", {"traits": {}}, customer_id="c-2", anonymous_id="kiosk")
    add("product.viewed", {"product_id": "p"}, customer_id=None, anonymous_id="kiosk")
    add("product.viewed", {"product_id": "p"}, customer_id=None, anonymous_id="drifter")
    # c-4 becomes c-5; the same email on two customers is a conflict, not a merge.
    add("alias", {"previous_id": "c-4"}, customer_id="c-5")
    add("identify", {"traits": {"email": "c-7@example.com"}}, customer_id="c-8")
    add("product.viewed", {"product_id": "p"}, customer_id="c-4")
    return [line if isinstance(line, bytes) else orjson.dumps(line) for line in lines]


def write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def rees46_log(path: Path, rows: int = 600, seed: int = 3) -> Path:
    rng = random.Random(seed)
    at = T0
    out = [REES46_HEADER]
    for n in range(rows):
        at += timedelta(seconds=rng.randrange(0, 90))
        user = 500 + rng.randrange(60)
        kind = rng.choices(["view", "cart", "remove_from_cart", "purchase"], [70, 20, 4, 6])[0]
        price = "" if n == 17 else f"{rng.randrange(1, 500)}.99"
        if n == 23:
            price = "not-a-price"
        out.append(
            f"{at:%Y-%m-%d %H:%M:%S} UTC,{kind},{100 + rng.randrange(30)},2053,"
            f"electronics.audio,acme,{price},{user},s-{user}-{n // 50}"
        )
    path.write_text("\n".join(out) + "\n")
    return path


def outputs(tmp: Path, name: str) -> tuple[bytes, bytes]:
    return (
        (tmp / f"{name}.actions.jsonl").read_bytes(),
        (tmp / f"{name}.decisions.jsonl").read_bytes(),
    )


def counts(summary: ReplaySummary) -> str:
    """The summary without its first line (wall time and rate)."""
    return summary.render().split("\n", 1)[1].replace(str(summary.actions_path), "A").replace(
        str(summary.decisions_path), "D"
    )


def run_both(
    source: Path, tmp: Path, settings: Settings, workers: tuple[int, ...] = (1, 2, 3), **kw: Any
) -> None:
    fmt = format_for(source)
    single = run_replay(
        source, tmp / "single.actions.jsonl", tmp / "single.decisions.jsonl", None, None, fmt,
        False, settings, **kw,
    )  # fmt: skip
    expected = outputs(tmp, "single")
    assert expected[0].count(b"\n") > 5, "the log should make actions"
    for n in workers:
        summary = run_partitioned(
            source, tmp / f"n{n}.actions.jsonl", tmp / f"n{n}.decisions.jsonl", None, None,
            fmt, False, settings, workers=n, **kw,
        )  # fmt: skip
        assert outputs(tmp, f"n{n}") == expected, f"--workers {n}"
        assert counts(summary) == counts(single), f"--workers {n}"


@pytest.mark.parametrize("lateness", [0.0, 300.0])
def test_jsonl_with_identity_links_is_the_same_for_1_2_and_3_workers(
    tmp_path: Path, lateness: float
) -> None:
    source = write(tmp_path / "events.jsonl", generated_log())
    run_both(source, tmp_path, Settings(allowed_lateness=lateness, partitions=8))


def test_rees46_with_synthetic_contacts_is_the_same_for_1_2_and_3_workers(
    tmp_path: Path,
) -> None:
    source = rees46_log(tmp_path / "events.csv")
    run_both(source, tmp_path, Settings(partitions=5), synthetic_contacts=True)


def test_rees46_quirks_read_as_the_single_process_reader_reads_them(tmp_path: Path) -> None:
    """Workers split a row's bytes; csv's reading is the reference: a BOM, CRLF line
    ends, blank lines, quoted fields (one spanning two lines), a bad byte."""
    lines = rees46_log(tmp_path / "plain.csv", rows=300).read_bytes().split(b"\n")
    lines[5] = lines[5].replace(b"electronics.audio", b'"electronics,audio"')
    lines[9] = lines[9].replace(b"acme", b'"ac\nme"')
    lines[12] = lines[12].replace(b"acme", b"ac\xffme")
    lines[20:20] = [b"", b"   "]
    source = tmp_path / "quirks.csv"
    source.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines))
    run_both(source, tmp_path, Settings(partitions=4), workers=(1, 2), synthetic_contacts=True)


def test_segment_messages_are_the_same_for_1_2_and_3_workers(tmp_path: Path) -> None:
    from omnicue.segment import to_segment

    messages = [
        orjson.dumps(to_segment(orjson.loads(line))) if line.startswith(b'{"event_id"') else line
        for line in generated_log(seed=5)
    ]
    source = write(tmp_path / "segment.jsonl", messages)
    settings = Settings(partitions=8)
    single = run_replay(
        source, tmp_path / "single.actions.jsonl", tmp_path / "single.decisions.jsonl", None,
        None, "segment", False, settings,
    )  # fmt: skip
    assert single.stats.merges > 0
    for n in (1, 2, 3):
        summary = run_partitioned(
            source, tmp_path / f"n{n}.actions.jsonl", tmp_path / f"n{n}.decisions.jsonl", None,
            None, "segment", False, settings, workers=n,
        )  # fmt: skip
        assert outputs(tmp_path, f"n{n}") == outputs(tmp_path, "single"), f"--workers {n}"
        assert counts(summary) == counts(single)


def test_gzip_and_zstd_inputs_replay_as_the_plain_file(tmp_path: Path) -> None:
    plain = rees46_log(tmp_path / "events.csv")
    data = plain.read_bytes()
    gz = tmp_path / "events.csv.gz"
    gz.write_bytes(gzip.compress(data))
    zst = tmp_path / "events.csv.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(data))
    settings = Settings()
    run_both(plain, tmp_path, settings, workers=(2,), synthetic_contacts=True)
    expected = outputs(tmp_path, "single")
    for source in (gz, zst):
        assert format_for(source) == "rees46"
        run_replay(
            source, tmp_path / "c.actions.jsonl", tmp_path / "c.decisions.jsonl", None, None,
            "rees46", False, settings, synthetic_contacts=True,
        )  # fmt: skip
        assert outputs(tmp_path, "c") == expected
        code = run_report(
            source, tmp_path / "c.actions.jsonl", tmp_path / "c.decisions.jsonl", None,
            json_path=tmp_path / "c.report.json", fmt="rees46",
        )  # fmt: skip
        assert code == 0
        run_partitioned(
            source, tmp_path / "c.actions.jsonl", tmp_path / "c.decisions.jsonl", None, None,
            "rees46", False, settings, workers=2, synthetic_contacts=True,
        )  # fmt: skip
        assert outputs(tmp_path, "c") == expected


def test_partitions_replayed_alone_merge_into_the_whole_replay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMNICUE_PARTITIONS", "4")
    monkeypatch.setenv("OMNICUE_ALLOWED_LATENESS", "0")
    source = write(tmp_path / "events.jsonl", generated_log())
    runner = CliRunner()
    whole = runner.invoke(
        app,
        ["replay", str(source), "--out", str(tmp_path / "whole.actions.jsonl"),
         "--decisions", str(tmp_path / "whole.decisions.jsonl"), "--workers", "2", "--progress"],
    )  # fmt: skip
    assert whole.exit_code == 0, whole.output
    assert "2 workers" in whole.output
    assert "ETA" in whole.output  # the --progress bar, over both workers
    for i in range(4):
        part = runner.invoke(
            app,
            ["replay", str(source), "--partition", f"{i}/4", "--out", str(tmp_path / f"p{i}")],
        )  # fmt: skip
        assert part.exit_code == 0, part.output
        for output in (tmp_path / f"p{i}").glob("*.*s"):
            # Each partition's lines are in the whole log's order already: the merge
            # streams (a k-way merge), it never sorts.
            keys = [orjson.loads(line.split(b"\t", 1)[0]) for line in output.open("rb")]
            assert keys == sorted(keys), output
    incomplete = runner.invoke(
        app, ["replay", "merge", str(tmp_path / "p0"), "--out", str(tmp_path / "x.jsonl")]
    )
    assert incomplete.exit_code == 2
    assert "missing [1, 2, 3]" in incomplete.output
    merged = runner.invoke(
        app,
        ["replay", "merge", *(str(tmp_path / f"p{i}") for i in range(4)),
         "--out", str(tmp_path / "merged.actions.jsonl"),
         "--decisions", str(tmp_path / "merged.decisions.jsonl")],
    )  # fmt: skip
    assert merged.exit_code == 0, merged.output
    assert outputs(tmp_path, "merged") == outputs(tmp_path, "whole")
    assert "actions:" in merged.output


def test_an_anonymous_id_linked_later_routes_to_its_customers_partition() -> None:
    groups = IdentityGroups()
    link = {"type": "identify", "customer_id": "c-9", "anonymous_id": "a-1",
            "properties": {"traits": {"email": "kim@example.com"}}}  # fmt: skip
    groups.add(link)
    groups.add({"type": "alias", "customer_id": "c-10", "properties": {"previous_id": "c-9"}})
    # Blocked placeholders join nothing.
    groups.add({"type": "identify", "customer_id": "c-11", "anonymous_id": "unknown"})
    anonymous = {"type": "cart.item_added", "anonymous_id": "a-1"}
    assert groups.route_key(anonymous) == groups.route_key({"customer_id": "c-9"}) == "c-10"
    assert groups.route_key({"anonymous_id": "a-2"}) == "anon:a-2"
    assert groups.route_key({"customer_id": "c-11"}) == "c-11"
    assert groups.route_key({"anonymous_id": "unknown"}) == "anon:unknown"
    assert partition_for(b"c-10", 8) == partition_for(groups.route_key(anonymous).encode(), 8)


def test_a_file_that_is_not_rees46_fails_before_any_worker_starts(tmp_path: Path) -> None:
    source = tmp_path / "other.csv"
    source.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ReplayInputError, match="not a REES46 CSV"):
        run_partitioned(
            source, tmp_path / "a.jsonl", None, None, None, "rees46", False, Settings(),
            workers=2,
        )  # fmt: skip


def test_partition_spec() -> None:
    assert PartitionSpec.parse("3/8") == PartitionSpec(frozenset({3}), 8)
    for bad in ("8/8", "-1/8", "3", "a/b", "0/0"):
        with pytest.raises(ValueError, match="i/N"):
            PartitionSpec.parse(bad)
