"""Static checks of the Prometheus config, alert rules, runbook and Grafana provisioning.

Every metric name used by an alert or a dashboard panel must be one the workers and
senders expose. If `promtool` is on PATH the config and rules are also checked by it,
the alerts are unit-tested on synthetic series, and the dashboard queries are parsed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
PROMETHEUS_FILE = PROMETHEUS_DIR / "prometheus.yml"
ALERTS_FILE = PROMETHEUS_DIR / "alerts.yml"
RUNBOOK_FILE = ROOT / "docs" / "runbook.md"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD_FILE = GRAFANA_DIR / "dashboards" / "omnicue-overview.json"
CAMPAIGN_DASHBOARD_FILE = GRAFANA_DIR / "dashboards" / "omnicue-campaigns.json"
COMPOSE_FILE = ROOT / "docker-compose.yml"

DATASOURCE_UID = "omnicue-prometheus"
RUNBOOK_URL = "https://github.com/omnicue/omnicue/blob/main/docs/runbook.md#"
SENDERS = ("sender-push", "sender-email", "sender-sms", "sender-kakao")

COUNTERS = {
    "omnicue_events_consumed_total",
    "omnicue_events_invalid_total",
    "omnicue_actions_total",
    "omnicue_decisions_total",
    "omnicue_sender_actions_total",
    "omnicue_sender_failed_total",
    "omnicue_sender_retries_total",
    "omnicue_sender_rate_limited_total",
    "omnicue_step_errors_total",
    "omnicue_timer_errors_total",
    "omnicue_rules_invalid_total",
}
# Campaign performance (live attribution and holdout lift): the campaign dashboard's.
CAMPAIGN_COUNTERS = {
    "omnicue_conversions_total",
    "omnicue_attributed_revenue_total",
    "omnicue_orders_total",
    "omnicue_holdout_entries_total",
    "omnicue_holdout_conversions_total",
}
HISTOGRAMS = {
    "omnicue_event_to_action_latency_seconds",
    "omnicue_timer_lateness_seconds",
    "omnicue_batch_events",
    "omnicue_action_deferral_seconds",
    "omnicue_sender_send_latency_seconds",
}
GAUGES = {
    "omnicue_timers_pending",
    "omnicue_customers_in_state",
    "omnicue_sender_rate_limit",
    "omnicue_sender_in_flight",
}
# Names a query may select: histograms only through their exposed series.
KNOWN_METRICS = (
    COUNTERS
    | CAMPAIGN_COUNTERS
    | GAUGES
    | {f"{name}{suffix}" for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
    | {"up"}
)

REQUIRED_ALERTS = {
    "OmnicueWorkerDown": "critical",
    "OmnicueNoEventsConsumed": "warning",
    "OmnicueDeadLetterRateHigh": "warning",
    "OmnicueTimerLateness": "critical",
    "OmnicueEventToActionLatencyHigh": "warning",
    "OmnicueSuppressionSpike": "info",
    "OmnicueStepErrors": "warning",
    "OmnicueRulesInvalid": "warning",
    "OmnicueTreatmentBelowControl": "warning",
}

# --------------------------------------------------------------------------- PromQL

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
# An identifier that is not part of a longer one, a number or a $variable, and is not
# a function call.
_IDENTIFIER = re.compile(r"(?<![\w:$.])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan", "atan2", "start", "end",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression (a light lexer, not a parser)."""
    text = _STRING.sub("", expr)
    text = _MATCHERS.sub("", text)
    text = _RANGES.sub("", text)
    text = _GROUPING.sub(" ", text)
    return {name for name in _IDENTIFIER.findall(text) if name.lower() not in _KEYWORDS}


def test_metric_names_lexer() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (instance, le) (rate(omnicue_timer_lateness_seconds_"
        'bucket{job="omnicue-worker", le!="1e3"}[$__rate_interval] offset 5m))) > 1e3 '
        "and on() (sum(up) > 0) or vector(0) unless absent(omnicue_timers_pending)"
    )
    assert metric_names(expr) == {
        "omnicue_timer_lateness_seconds_bucket",
        "up",
        "omnicue_timers_pending",
    }
    assert metric_names("sum without (type) (rate(x_total[5m])) / ignoring(a) y") == {
        "x_total",
        "y",
    }


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def prometheus_config() -> dict[str, Any]:
    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    assert isinstance(config, dict)
    return config


@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS_FILE.read_text())
    rules = [rule for group in data["groups"] for rule in group["rules"]]
    assert rules
    return rules


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD_FILE.read_text())
    assert isinstance(data, dict)
    return data


def github_anchors(markdown: str) -> set[str]:
    """Heading anchors as GitHub renders them (code fences skipped)."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    in_fence = False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
            continue
        match = re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
        if in_fence or not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    anchors.update(re.findall(r'<a\s+(?:id|name)="([^"]+)"', markdown))
    return anchors


def compose_services() -> set[str]:
    return set(yaml.safe_load(COMPOSE_FILE.read_text())["services"])


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not on PATH (Debian package `prometheus` ships it)")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=120, check=False
    )


# --------------------------------------------------------------------------- Prometheus


def test_prometheus_loads_alert_rules(prometheus_config: dict[str, Any]) -> None:
    assert prometheus_config["rule_files"] == ["alerts.yml"]
    assert (PROMETHEUS_DIR / "alerts.yml").is_file()


def _dns_jobs(config: dict[str, Any]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """DNS name -> (scrape job, dns_sd entry)."""
    found = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for name in sd["names"]:
                found[name] = (job, sd)
    return found


def _interval(job: dict[str, Any], config: dict[str, Any]) -> str:
    return str(job.get("scrape_interval", config.get("global", {}).get("scrape_interval")))


def test_workers_scraped_through_dns(prometheus_config: dict[str, Any]) -> None:
    job, sd = _dns_jobs(prometheus_config)["worker"]
    assert sd.get("type") == "A"
    assert sd.get("port") == 6066
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert _interval(job, prometheus_config) == "5s"


@pytest.mark.parametrize("sender", SENDERS)
def test_senders_scraped_through_dns(prometheus_config: dict[str, Any], sender: str) -> None:
    job, sd = _dns_jobs(prometheus_config)[sender]
    assert sd.get("type") == "A"
    assert sd.get("port") == 6067
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_dns_names_are_compose_services(prometheus_config: dict[str, Any]) -> None:
    assert set(_dns_jobs(prometheus_config)) <= compose_services()


def test_promtool_check_config() -> None:
    result = run_promtool("check", "config", str(PROMETHEUS_FILE))
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- alerts


def test_required_alerts_and_severities(alert_rules: list[dict[str, Any]]) -> None:
    severities = {rule["alert"]: rule["labels"]["severity"] for rule in alert_rules}
    for name, severity in REQUIRED_ALERTS.items():
        assert severities.get(name) == severity, name


def test_alerts_are_well_formed(alert_rules: list[dict[str, Any]]) -> None:
    anchors = github_anchors(RUNBOOK_FILE.read_text())
    names = [rule.get("alert") for rule in alert_rules]
    assert all(names), "recording rules do not belong in alerts.yml"
    assert len(names) == len(set(names)), "duplicate alert names"
    for rule in alert_rules:
        name = rule["alert"]
        assert re.fullmatch(r"Omnicue(?:[A-Z][a-z0-9]*)+", name), f"{name} is not CamelCase"
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        annotations = rule["annotations"]
        assert annotations.get("summary", "").strip(), name
        assert annotations.get("description", "").strip(), name
        url = annotations.get("runbook_url", "")
        assert url.startswith(RUNBOOK_URL), f"{name}: {url}"
        anchor = url[len(RUNBOOK_URL) :]
        assert anchor in anchors, f"{name}: no #{anchor} section in docs/runbook.md"


def test_alert_durations(alert_rules: list[dict[str, Any]]) -> None:
    durations = {rule["alert"]: rule.get("for") for rule in alert_rules}
    assert durations["OmnicueWorkerDown"] == "1m"
    assert durations["OmnicueNoEventsConsumed"] == "10m"
    assert durations["OmnicueTimerLateness"] == "5m"
    assert durations["OmnicueTreatmentBelowControl"] == "1h"


def test_alert_metrics_are_exposed(alert_rules: list[dict[str, Any]]) -> None:
    for rule in alert_rules:
        names = metric_names(rule["expr"])
        assert names, f"{rule['alert']}: no metric in expr"
        unknown = names - KNOWN_METRICS
        assert not unknown, f"{rule['alert']}: unknown metrics {sorted(unknown)}"


def test_every_runbook_alert_section_has_an_alert(alert_rules: list[dict[str, Any]]) -> None:
    headings = re.findall(r"^## (Omnicue\w+)\s*$", RUNBOOK_FILE.read_text(), re.MULTILINE)
    assert set(headings) == {rule["alert"] for rule in alert_rules}


def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", str(ALERTS_FILE))
    assert result.returncode == 0, result.stdout + result.stderr


def _alert_unit_tests() -> list[dict[str, Any]]:
    """promtool unit tests: synthetic series in, expected firing alerts (labels) out."""
    worker = 'up{job="omnicue-worker", instance="w1:6066"}'
    return [
        {
            # One step of rule "cart" fails at 3m; the alert clears once 10m have passed.
            "interval": "1m",
            "input_series": [
                {"series": 'omnicue_step_errors_total{rule="cart"}', "values": "0 0 0 1x20"},
            ],
            "alert_rule_test": [
                {"alertname": "OmnicueStepErrors", "eval_time": "2m", "exp_alerts": []},
                {
                    "alertname": "OmnicueStepErrors",
                    "eval_time": "5m",
                    "exp_alerts": [{"exp_labels": {"severity": "warning", "rule": "cart"}}],
                },
                {"alertname": "OmnicueStepErrors", "eval_time": "20m", "exp_alerts": []},
            ],
        },
        {
            "interval": "1m",
            "input_series": [{"series": "omnicue_timer_errors_total", "values": "0 0 1x10"}],
            "alert_rule_test": [
                {
                    "alertname": "OmnicueStepErrors",
                    "eval_time": "4m",
                    "exp_alerts": [{"exp_labels": {"severity": "warning", "rule": "(any)"}}],
                },
            ],
        },
        {
            "interval": "1m",
            "input_series": [{"series": "omnicue_rules_invalid_total", "values": "0 0 1x10"}],
            "alert_rule_test": [
                {"alertname": "OmnicueRulesInvalid", "eval_time": "1m", "exp_alerts": []},
                {
                    "alertname": "OmnicueRulesInvalid",
                    "eval_time": "4m",
                    "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
                },
            ],
        },
        {
            "interval": "1m",
            "input_series": [
                {"series": worker, "values": "1 1 0 0 0 0 0"},
                {"series": 'up{job="omnicue-worker", instance="w2:6066"}', "values": "1x6"},
            ],
            "alert_rule_test": [
                {"alertname": "OmnicueWorkerDown", "eval_time": "2m", "exp_alerts": []},
                {
                    "alertname": "OmnicueWorkerDown",
                    "eval_time": "4m",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "critical",
                                "job": "omnicue-worker",
                                "instance": "w1:6066",
                            }
                        }
                    ],
                },
                {"alertname": "OmnicueNoWorkers", "eval_time": "4m", "exp_alerts": []},
            ],
        },
        {
            "interval": "1m",
            "input_series": [{"series": worker, "values": "0x6"}],
            "alert_rule_test": [
                {
                    "alertname": "OmnicueNoWorkers",
                    "eval_time": "4m",
                    "exp_alerts": [{"exp_labels": {"severity": "critical"}}],
                },
            ],
        },
        {
            # Events stop after 5m; the 5m rate is 0 from 10m on, so it fires at 20m.
            "interval": "1m",
            "input_series": [
                {"series": worker, "values": "1x30"},
                {
                    "series": 'omnicue_events_consumed_total{type="page_view"}',
                    "values": "0+60x5 300x25",
                },
            ],
            "alert_rule_test": [
                {"alertname": "OmnicueNoEventsConsumed", "eval_time": "15m", "exp_alerts": []},
                {
                    "alertname": "OmnicueNoEventsConsumed",
                    "eval_time": "21m",
                    "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
                },
            ],
        },
        {
            # Workers up but the counter has no series at all yet.
            "interval": "1m",
            "input_series": [{"series": worker, "values": "1x15"}],
            "alert_rule_test": [
                {
                    "alertname": "OmnicueNoEventsConsumed",
                    "eval_time": "12m",
                    "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
                },
            ],
        },
        {
            # 10 invalid per 100 valid (9%) fires; events flow, so NoEventsConsumed does not.
            "interval": "1m",
            "input_series": [
                {"series": worker, "values": "1x20"},
                {
                    "series": 'omnicue_events_consumed_total{type="purchase"}',
                    "values": "0+100x20",
                },
                {
                    "series": 'omnicue_events_invalid_total{reason="schema"}',
                    "values": "0+10x20",
                },
            ],
            "alert_rule_test": [
                {
                    "alertname": "OmnicueDeadLetterRateHigh",
                    "eval_time": "10m",
                    "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
                },
                {"alertname": "OmnicueNoEventsConsumed", "eval_time": "20m", "exp_alerts": []},
            ],
        },
        {
            # 2 invalid per 100 valid stays quiet.
            "interval": "1m",
            "input_series": [
                {
                    "series": 'omnicue_events_consumed_total{type="purchase"}',
                    "values": "0+100x20",
                },
                {"series": 'omnicue_events_invalid_total{reason="json"}', "values": "0+2x20"},
            ],
            "alert_rule_test": [
                {"alertname": "OmnicueDeadLetterRateHigh", "eval_time": "15m", "exp_alerts": []},
            ],
        },
        {
            # Only broken events, and no valid one ever: dead letters, not "no events".
            "interval": "1m",
            "input_series": [
                {"series": worker, "values": "1x20"},
                {"series": 'omnicue_events_invalid_total{reason="json"}', "values": "0+50x20"},
            ],
            "alert_rule_test": [
                {
                    "alertname": "OmnicueDeadLetterRateHigh",
                    "eval_time": "10m",
                    "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
                },
                {"alertname": "OmnicueNoEventsConsumed", "eval_time": "20m", "exp_alerts": []},
            ],
        },
        {
            # Timers: 90% land between 5s and 10s late, so p99 is about 9.9s.
            "interval": "1m",
            "input_series": [
                *(
                    {
                        "series": "omnicue_timer_lateness_seconds_bucket"
                        f'{{instance="w1:6066", le="{le}"}}',
                        "values": f"0+{per_minute}x20",
                    }
                    for le, per_minute in (("1", 100), ("5", 100), ("10", 1000), ("+Inf", 1000))
                ),
                *(
                    {
                        "series": f'omnicue_event_to_action_latency_seconds_bucket{{le="{le}"}}',
                        "values": f"0+{per_minute}x20",
                    }
                    for le, per_minute in (("1", 10), ("10", 10), ("30", 100), ("+Inf", 100))
                ),
            ],
            "alert_rule_test": [
                {"alertname": "OmnicueTimerLateness", "eval_time": "3m", "exp_alerts": []},
                {
                    "alertname": "OmnicueTimerLateness",
                    "eval_time": "10m",
                    "exp_alerts": [{"exp_labels": {"severity": "critical", "instance": "w1:6066"}}],
                },
                {
                    "alertname": "OmnicueEventToActionLatencyHigh",
                    "eval_time": "15m",
                    "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
                },
            ],
        },
        {
            # 75% of decisions suppressed.
            "interval": "1m",
            "input_series": [
                {
                    "series": 'omnicue_decisions_total{outcome="suppressed", reason="cap"}',
                    "values": "0+60x20",
                },
                {
                    "series": 'omnicue_decisions_total{outcome="fired", reason="matched"}',
                    "values": "0+20x20",
                },
            ],
            "alert_rule_test": [
                {
                    "alertname": "OmnicueSuppressionSpike",
                    "eval_time": "10m",
                    "exp_alerts": [{"exp_labels": {"severity": "info"}}],
                },
            ],
        },
        {
            "interval": "1m",
            "input_series": [
                {
                    "series": 'up{job="omnicue-sender", instance="s1:6067", service="sender-sms"}',
                    "values": "1 0 0 0 0 0",
                },
                {
                    "series": 'omnicue_sender_actions_total{channel="sms", outcome="expired"}',
                    "values": "0+5x25",
                },
                {
                    "series": 'omnicue_sender_actions_total{channel="push", outcome="sent"}',
                    "values": "0+5x25",
                },
            ],
            "alert_rule_test": [
                {
                    "alertname": "OmnicueSenderDown",
                    "eval_time": "5m",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "warning",
                                "job": "omnicue-sender",
                                "instance": "s1:6067",
                                "service": "sender-sms",
                            }
                        }
                    ],
                },
                {
                    "alertname": "OmnicueSenderActionsExpired",
                    "eval_time": "20m",
                    "exp_alerts": [{"exp_labels": {"severity": "warning", "channel": "sms"}}],
                },
            ],
        },
        {
            # Email fails 2 of every 12 actions for good (17%); push 1 of 101 (1%, under
            # the 5% threshold): only email alerts, once the ratio has held for 15m.
            "interval": "1m",
            "input_series": [
                {"series": 'omnicue_sender_actions_total{channel="email", outcome="sent"}',
                 "values": "0+10x45"},
                {"series": 'omnicue_sender_actions_total{channel="email", outcome="failed"}',
                 "values": "0+2x45"},
                {"series": 'omnicue_sender_failed_total{channel="email", reason="http_400"}',
                 "values": "0+2x45"},
                {"series": 'omnicue_sender_actions_total{channel="push", outcome="sent"}',
                 "values": "0+100x45"},
                {"series": 'omnicue_sender_actions_total{channel="push", outcome="failed"}',
                 "values": "0+1x45"},
                {"series": 'omnicue_sender_failed_total{channel="push", reason="http_500"}',
                 "values": "0+1x45"},
            ],  # fmt: skip
            "alert_rule_test": [
                {"alertname": "OmnicueSenderFailureRatio", "eval_time": "10m", "exp_alerts": []},
                {
                    "alertname": "OmnicueSenderFailureRatio",
                    "eval_time": "40m",
                    "exp_alerts": [{"exp_labels": {"severity": "warning", "channel": "email"}}],
                },
            ],
        },
        *_treatment_below_control_tests(),
    ]


def _holdout(rule: str, group: str, entries_per_hour: int, conversions_per_hour: int,
             hours: int = 40) -> list[dict[str, str]]:
    labels = f'rule="{rule}", group="{group}"'
    return [
        {"series": f"omnicue_holdout_entries_total{{{labels}}}",
         "values": f"0+{entries_per_hour}x{hours}"},
        {"series": f"omnicue_holdout_conversions_total{{{labels}}}",
         "values": f"0+{conversions_per_hour}x{hours}"},
    ]  # fmt: skip


def _treatment_below_control_tests() -> list[dict[str, Any]]:
    """Over a day, `cart` converts 10% of its treatment and 20% of its control: it
    alerts, once that has held for an hour. `welcome` does better than its control,
    and `browse` is worse but has too few control entries (2 an hour): both stay quiet.
    A day after `cart`'s treatment recovers (30% from hour 40), the alert clears."""
    return [
        {
            "interval": "1h",
            "input_series": [
                {"series": 'omnicue_holdout_entries_total{rule="cart", group="treatment"}',
                 "values": "0+10x70"},
                {"series": 'omnicue_holdout_conversions_total{rule="cart", group="treatment"}',
                 "values": "0+1x40 40+3x30"},
                *_holdout("cart", "control", 10, 2, 70),
                *_holdout("welcome", "treatment", 10, 3),
                *_holdout("welcome", "control", 10, 2),
                *_holdout("browse", "treatment", 10, 1),
                *_holdout("browse", "control", 1, 1),
            ],  # fmt: skip
            "alert_rule_test": [
                # Two hours in, under 30 entries a group: nothing yet.
                {"alertname": "OmnicueTreatmentBelowControl", "eval_time": "2h",
                 "exp_alerts": []},
                {
                    "alertname": "OmnicueTreatmentBelowControl",
                    "eval_time": "30h",
                    "exp_alerts": [{"exp_labels": {"severity": "warning", "rule": "cart"}}],
                },
                {"alertname": "OmnicueTreatmentBelowControl", "eval_time": "68h",
                 "exp_alerts": []},
            ],  # fmt: skip
        },
    ]


def test_promtool_alert_unit_tests(tmp_path: Path) -> None:
    """The alerts fire (and stay quiet) as intended on synthetic series.

    promtool compares annotations too, so the rules are copied without them: the
    annotations are checked by test_alerts_are_well_formed and `promtool check rules`.
    """
    promtool()
    rules = yaml.safe_load(ALERTS_FILE.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    tested = {case["alertname"] for test in _alert_unit_tests() for case in test["alert_rule_test"]}
    every_alert = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert tested == every_alert, f"untested alerts: {sorted(every_alert - tested)}"
    unit = {
        "rule_files": ["alerts.yml"],
        "evaluation_interval": "1m",
        "tests": _alert_unit_tests(),
    }
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(unit, sort_keys=False))
    result = run_promtool("test", "rules", str(tmp_path / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- runbook


def test_runbook_anchor_helper() -> None:
    text = "# Title\n```sh\n# not a heading\n```\n## OmnicueWorkerDown\n## A b, c!\n## A b c\n"
    assert github_anchors(text) == {"title", "omnicueworkerdown", "a-b-c", "a-b-c-1"}


# --------------------------------------------------------------------------- Grafana


def test_grafana_datasource_provisioning() -> None:
    data = yaml.safe_load((GRAFANA_DIR / "provisioning/datasources/prometheus.yml").read_text())
    assert data["apiVersion"] == 1
    (source,) = data["datasources"]
    assert source["uid"] == DATASOURCE_UID
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert source["isDefault"] is True


def test_grafana_dashboard_provider() -> None:
    data = yaml.safe_load((GRAFANA_DIR / "provisioning/dashboards/omnicue.yml").read_text())
    assert data["apiVersion"] == 1
    (provider,) = data["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_dashboard_identity(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "omnicue-overview"
    assert "id" in dashboard and dashboard["id"] is None
    assert dashboard.get("title")


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            panels.extend(panel.get("panels", []))
        else:
            panels.append(panel)
    return panels


def test_dashboard_panels(dashboard: dict[str, Any]) -> None:
    panels = _panels(dashboard)
    assert panels
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels:
        title = panel.get("title")
        assert title, panel
        assert panel["type"] == "timeseries", title
        assert panel["datasource"]["uid"] == DATASOURCE_UID, title
        targets = panel.get("targets") or []
        assert any(target.get("expr", "").strip() for target in targets), title
        ref_ids = [target.get("refId") for target in targets]
        assert all(ref_ids) and len(ref_ids) == len(set(ref_ids)), title
        for target in targets:
            assert target["datasource"]["uid"] == DATASOURCE_UID, title


def _dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in _panels(dashboard)
        for target in panel["targets"]
        if target.get("expr")
    ]


def test_dashboard_metrics_are_exposed(dashboard: dict[str, Any]) -> None:
    for title, expr in _dashboard_exprs(dashboard):
        unknown = metric_names(expr) - KNOWN_METRICS
        assert not unknown, f"{title}: unknown metrics {sorted(unknown)}"


def test_dashboard_covers_every_metric(dashboard: dict[str, Any]) -> None:
    used = set().union(*(metric_names(expr) for _title, expr in _dashboard_exprs(dashboard)))
    expected = COUNTERS | GAUGES | {f"{name}_bucket" for name in HISTOGRAMS} | {"up"}
    assert expected <= used, f"no panel for {sorted(expected - used)}"


def test_promtool_parses_dashboard_queries(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, is valid PromQL."""
    promtool()
    records = [
        {
            "record": f"omnicue:dashboard:query_{index}",
            "expr": expr.replace("$__rate_interval", "1m").replace("$__interval", "1m"),
        }
        for index, (_title, expr) in enumerate(_dashboard_exprs(dashboard))
    ]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- campaigns


@pytest.fixture(scope="module")
def campaign_dashboard() -> dict[str, Any]:
    data = json.loads(CAMPAIGN_DASHBOARD_FILE.read_text())
    assert isinstance(data, dict)
    return data


def test_campaign_dashboard_identity(campaign_dashboard: dict[str, Any]) -> None:
    """Provisioned beside the overview (the provider loads every file of the folder)."""
    assert campaign_dashboard["uid"] == "omnicue-campaigns"
    assert campaign_dashboard["title"] == "Campaign performance"
    assert "id" in campaign_dashboard and campaign_dashboard["id"] is None
    [window] = campaign_dashboard["templating"]["list"]
    assert window["name"] == "window" and window["current"]["value"] == "1d"


def test_campaign_dashboard_panels(campaign_dashboard: dict[str, Any]) -> None:
    test_dashboard_panels(campaign_dashboard)
    titles = {panel["title"] for panel in _panels(campaign_dashboard)}
    assert {"Conversion rate by channel", "Attributed revenue by model", "Lift by rule"} <= titles


def test_campaign_dashboard_metrics(campaign_dashboard: dict[str, Any]) -> None:
    test_dashboard_metrics_are_exposed(campaign_dashboard)
    used = set().union(
        *(metric_names(expr) for _title, expr in _dashboard_exprs(campaign_dashboard))
    )
    assert CAMPAIGN_COUNTERS <= used, f"no panel for {sorted(CAMPAIGN_COUNTERS - used)}"
    lift = {title: expr for title, expr in _dashboard_exprs(campaign_dashboard)}["Lift by rule"]
    assert 'group="treatment"' in lift and 'group="control"' in lift


def test_campaign_metrics_are_exposed_by_workers() -> None:
    from omnicue.metrics import WorkerMetrics

    metrics = WorkerMetrics()
    metrics.conversions.labels(rule="r", channel="push", model="linear").inc(0.5)
    metrics.attributed_revenue.labels(rule="r", channel="push", model="linear").inc(5)
    metrics.orders.labels(attributed="true").inc()
    metrics.holdout_entries.labels(rule="r", group="control").inc()
    metrics.holdout_conversions.labels(rule="r", group="control").inc()
    exposed = metrics.exposition().decode()
    for name in CAMPAIGN_COUNTERS:
        assert f"\n{name}{{" in exposed, name


def test_promtool_parses_campaign_dashboard_queries(
    campaign_dashboard: dict[str, Any], tmp_path: Path
) -> None:
    promtool()
    records = [
        {"record": f"omnicue:campaigns:query_{index}", "expr": expr.replace("$window", "1d")}
        for index, (_title, expr) in enumerate(_dashboard_exprs(campaign_dashboard))
    ]
    path = tmp_path / "campaign_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "campaigns", "rules": records}]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
