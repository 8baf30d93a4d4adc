"""The compose stack's HTTP ingest service (parsed with PyYAML, no Docker needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


def test_ingest_service_runs_omnicue_ingest_on_host_port_8088() -> None:
    services: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    ingest = services["ingest"]
    assert ingest["command"] == ["omnicue", "ingest"]
    assert ingest["image"] == "omnicue:dev"
    assert ingest["restart"] == "unless-stopped"
    assert ingest["ports"] == ["8088:8088"]
    env = ingest["environment"]
    assert env["OMNICUE_BROKER"] == services["worker"]["environment"]["OMNICUE_BROKER"]
    assert (env["OMNICUE_INGEST_HOST"], env["OMNICUE_INGEST_PORT"]) == ("0.0.0.0", "8088")
    assert env["OMNICUE_INGEST_WRITE_KEYS"] == "${OMNICUE_INGEST_WRITE_KEYS:-dev=web}"
    assert ingest["depends_on"] == {"topics": {"condition": "service_completed_successfully"}}
    assert "/health" in " ".join(ingest["healthcheck"]["test"])
    assert "profiles" not in ingest
