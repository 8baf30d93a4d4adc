"""Static checks of the container build and docker-compose stack.

No Docker engine is needed: the compose file is parsed with PyYAML. If a compose CLI
that can render the file offline is on PATH (`docker compose` or `docker-compose`),
`config -q` is run as well.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"

CHANNELS = ("push", "email", "sms", "kakao")
SENDERS = tuple(f"sender-{channel}" for channel in CHANNELS)
OMNICUE_SERVICES = ("topics", "worker", *SENDERS, "simulator")
REQUIRED_SERVICES = {"broker", "redis", *OMNICUE_SERVICES, "prometheus", "grafana"}

OMNICUE_ENV = {
    "OMNICUE_BROKER": "kafka://broker:19092",
    "OMNICUE_REDIS_URL": "redis://redis:6379/0",
    "OMNICUE_WEB_HOST": "0.0.0.0",
    "OMNICUE_WEB_PORT": "6066",
    "OMNICUE_DATA_DIR": "/data",
}

BROKER_ENV = {
    "KAFKA_NODE_ID": "1",
    "KAFKA_PROCESS_ROLES": "broker,controller",
    "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@broker:29093",
    "KAFKA_LISTENERS": "CONTROLLER://:29093,PLAINTEXT_HOST://:9092,PLAINTEXT://:19092",
    "KAFKA_ADVERTISED_LISTENERS": "PLAINTEXT_HOST://localhost:9092,PLAINTEXT://broker:19092",
    "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
    "KAFKA_INTER_BROKER_LISTENER_NAME": "PLAINTEXT",
    "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
    "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
    "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
    "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
    "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    svcs = compose["services"]
    assert isinstance(svcs, dict)
    return svcs


def env_of(service: dict[str, Any]) -> dict[str, str]:
    """`environment` as a dict of strings, whether written as a mapping or a list."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) for item in env)
        return {key: value for key, value in pairs}
    return {key: _scalar(value) for key, value in env.items()}


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """`depends_on` as {service: condition}; the short list form means service_started."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def volume_mounts(service: dict[str, Any]) -> list[tuple[str, str | None, str]]:
    """(kind, source, target) per volume; kind is bind, volume or anonymous."""
    mounts: list[tuple[str, str | None, str]] = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            source = volume.get("source")
            target = volume["target"]
            kind = volume.get("type", "volume")
            if kind == "volume" and not source:
                kind = "anonymous"
            mounts.append((kind, source, target))
            continue
        parts = volume.split(":")
        if len(parts) == 1:
            mounts.append(("anonymous", None, parts[0]))
        elif parts[0].startswith((".", "/", "~")):
            mounts.append(("bind", parts[0], parts[1]))
        else:
            mounts.append(("volume", parts[0], parts[1]))
    return mounts


def host_ports(service: dict[str, Any]) -> list[str]:
    """Published ports that bind a fixed host port."""
    fixed = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            if port.get("published"):
                fixed.append(str(port))
        elif ":" in str(port):
            fixed.append(str(port))
    return fixed


def test_compose_spec_has_no_version_key(compose: dict[str, Any]) -> None:
    assert "version" not in compose


def test_all_services_present(services: dict[str, dict[str, Any]]) -> None:
    assert REQUIRED_SERVICES <= set(services)


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        image = service.get("image")
        assert image or service.get("build"), f"{name}: neither image nor build"
        if not image:
            continue
        last = image.rsplit("/", 1)[-1]
        assert ":" in last or "@sha256:" in image, f"{name}: image {image!r} has no tag"
        tag = last.split("@", 1)[0].split(":", 1)[1] if ":" in last else ""
        assert tag != "latest", f"{name}: image {image!r} uses latest"


def test_third_party_images(services: dict[str, dict[str, Any]]) -> None:
    assert services["broker"]["image"].startswith("apache/kafka:4.")
    assert services["redis"]["image"].startswith("redis:7")
    assert services["redis"]["image"].endswith("-alpine")
    assert services["prometheus"]["image"].startswith("prom/prometheus:v")
    assert services["grafana"]["image"].startswith("grafana/grafana:")


def test_broker_is_single_node_kraft(services: dict[str, dict[str, Any]]) -> None:
    broker = services["broker"]
    env = env_of(broker)
    for key, value in BROKER_ENV.items():
        assert env.get(key) == value, key
    protocols = dict(
        item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    assert protocols == {
        "CONTROLLER": "PLAINTEXT",
        "PLAINTEXT": "PLAINTEXT",
        "PLAINTEXT_HOST": "PLAINTEXT",
    }
    assert env.get("CLUSTER_ID")
    health = " ".join(command_of({"command": broker["healthcheck"]["test"]}))
    assert "/opt/kafka/bin/kafka-topics.sh" in health
    assert "--bootstrap-server localhost:9092" in health
    assert "--list" in health


def test_redis_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    test = services["redis"]["healthcheck"]["test"]
    joined = test if isinstance(test, str) else " ".join(test)
    assert "redis-cli ping" in joined


def test_topics_is_one_shot_after_broker(services: dict[str, dict[str, Any]]) -> None:
    topics = services["topics"]
    assert command_of(topics) == ["omnicue", "topics", "create"]
    assert depends_on(topics) == {"broker": "service_healthy"}
    assert str(topics.get("restart", "no")) in {"no", "False", "false"}


@pytest.mark.parametrize("name", OMNICUE_SERVICES)
def test_omnicue_services_share_the_image_and_env(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    service = services[name]
    assert service.get("build") in (".", {"context": "."}), name
    assert service.get("image") == "omnicue:dev", name
    env = env_of(service)
    for key, value in OMNICUE_ENV.items():
        assert env.get(key) == value, f"{name}: {key}"
    assert "container_name" not in service, name
    assert not host_ports(service), f"{name} publishes a fixed host port"


@pytest.mark.parametrize("name", ["worker", *SENDERS, "simulator"])
def test_long_running_services_wait_for_topics_and_redis(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    deps = depends_on(services[name])
    assert deps.get("topics") == "service_completed_successfully", name
    assert deps.get("redis") == "service_healthy", name


def test_worker_is_scalable(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert command_of(worker) == ["omnicue", "worker"]
    assert worker.get("restart") == "unless-stopped"
    assert "6066" in [str(port) for port in worker.get("expose", [])]
    assert "ports" not in worker
    assert "container_name" not in worker
    assert "hostname" not in worker
    # /data must not be shared between replicas: anonymous volume or none.
    for kind, _source, target in volume_mounts(worker):
        if target.rstrip("/") == "/data":
            assert kind == "anonymous", f"worker /data is a {kind} mount"


@pytest.mark.parametrize("channel", CHANNELS)
def test_senders(services: dict[str, dict[str, Any]], channel: str) -> None:
    sender = services[f"sender-{channel}"]
    assert command_of(sender) == ["omnicue", "send", "--channel", channel]
    assert sender.get("restart") == "unless-stopped"
    assert "6067" in [str(port) for port in sender.get("expose", [])]


def test_simulator_only_in_demo_profile(services: dict[str, dict[str, Any]]) -> None:
    simulator = services["simulator"]
    assert simulator.get("profiles") == ["demo"]
    assert command_of(simulator) == ["omnicue", "simulate"]
    for name, service in services.items():
        if name != "simulator":
            assert "profiles" not in service, f"{name} should start by default"


def test_prometheus_and_grafana_mounts(services: dict[str, dict[str, Any]]) -> None:
    prometheus = {(s, t) for _k, s, t in volume_mounts(services["prometheus"])}
    assert ("./deploy/prometheus/prometheus.yml", "/etc/prometheus/prometheus.yml") in prometheus
    assert ("./deploy/prometheus/alerts.yml", "/etc/prometheus/alerts.yml") in prometheus
    assert "9090:9090" in [str(p) for p in services["prometheus"]["ports"]]

    grafana = services["grafana"]
    mounts = {(s, t) for _k, s, t in volume_mounts(grafana)}
    assert ("./deploy/grafana/provisioning", "/etc/grafana/provisioning") in mounts
    assert ("./deploy/grafana/dashboards", "/var/lib/grafana/dashboards") in mounts
    assert "3000:3000" in [str(p) for p in grafana["ports"]]
    env = env_of(grafana)
    assert env.get("GF_AUTH_ANONYMOUS_ENABLED") == "true"
    assert env.get("GF_AUTH_ANONYMOUS_ORG_ROLE") == "Viewer"


def test_build_contexts_and_bind_mounts_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        build = service.get("build")
        if build is not None:
            context = build if isinstance(build, str) else build.get("context", ".")
            dockerfile = (
                "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            )
            assert (ROOT / context).is_dir(), f"{name}: build context {context}"
            assert (ROOT / context / dockerfile).is_file(), f"{name}: {dockerfile}"
        for kind, source, _target in volume_mounts(service):
            if kind == "bind":
                assert source is not None
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    instructions = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]
    assert instructions[0] == "FROM python:3.11-slim"
    assert any(line.startswith("COPY . ") for line in instructions)
    assert "pip install ." in text
    assert instructions[-1] == 'CMD ["omnicue", "worker"]'


def test_dockerignore_keeps_context_small() -> None:
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for pattern in (".git", ".venv", "**/__pycache__", ".pytest_cache", ".mypy_cache"):
        assert pattern in patterns, pattern
    # Everything `pip install .` reads must stay in the context.
    for needed in ("pyproject.toml", "README.md", "omnicue", "schemas", "triggers", "streams"):
        assert needed not in patterns, needed


def _compose_cli() -> list[str] | None:
    """A compose CLI able to run `config` without an engine, or None."""
    candidates = []
    if docker := shutil.which("docker"):
        candidates.append([docker, "compose"])
    if docker_compose := shutil.which("docker-compose"):
        candidates.append([docker_compose])
    for cli in candidates:
        try:
            probe = subprocess.run(
                [*cli, "version"], capture_output=True, text=True, timeout=60, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return cli
    return None


@pytest.mark.parametrize("profiles", [[], ["--profile", "demo"]], ids=["default", "demo"])
def test_compose_cli_config(profiles: list[str]) -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no `docker compose` plugin or `docker-compose` on PATH")
    result = subprocess.run(
        [*cli, "-f", str(COMPOSE_FILE), *profiles, "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_senders_deliver_by_webhook_to_the_catcher_unless_configured(
    services: dict[str, dict[str, Any]],
) -> None:
    env = services["sender-email"]["environment"]
    assert env["OMNICUE_SENDER_TRANSPORT"] == "${OMNICUE_SENDER_TRANSPORT:-webhook}"
    assert env["OMNICUE_SENDER_URL"].endswith(":-http://webhook-catcher:8099/{channel}}")
    assert env["OMNICUE_WEBHOOK_SECRET"].startswith("${OMNICUE_WEBHOOK_SECRET:-")
    catcher = services["webhook-catcher"]
    assert command_of(catcher)[:2] == ["omnicue", "webhook-catcher"]
    assert "8099" in [str(port) for port in catcher.get("expose", [])]
