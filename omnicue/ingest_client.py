"""A small synchronous client of `omnicue ingest`: contract events sent as the Segment
messages a Segment client would send for them (`omnicue.segment.to_segment`), in
`/v1/batch` requests. The simulator sends its web and app traffic with it."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from omnicue.segment import to_segment

BATCH = 100  # messages a request, as Segment's libraries send them


@dataclass
class IngestResult:
    accepted: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


class IngestClient:
    def __init__(self, url: str, write_key: str, timeout: float = 30) -> None:
        self.url = url.rstrip("/")
        self._headers = {
            "Authorization": "Basic " + base64.b64encode(f"{write_key}:".encode()).decode(),
            "Content-Type": "application/json",
        }
        self._timeout = timeout

    def send(self, events: Sequence[Mapping[str, Any]]) -> IngestResult:
        """Send the events; what the ingest accepted (and the broker acknowledged), and
        what it did not, with the reasons."""
        result = IngestResult()
        for first in range(0, len(events), BATCH):
            chunk = [to_segment(event) for event in events[first : first + BATCH]]
            self._post(chunk, result)
        return result

    def _post(self, messages: list[dict[str, Any]], result: IngestResult) -> None:
        request = urllib.request.Request(
            f"{self.url}/v1/batch",
            data=json.dumps({"batch": messages}).encode(),
            headers=self._headers,
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                body = json.loads(exc.read())
            except ValueError:
                body = {"message": f"HTTP {exc.code}"}
            # A 400/413 lists the rejected messages; the others were published.
            accepted = int(body.get("accepted", 0)) if exc.code in (400, 413) else 0
            result.accepted += accepted
            result.failed += len(messages) - accepted
            result.errors += [e.get("message", "") for e in body.get("errors", [])] or [
                str(body.get("message", f"HTTP {exc.code}"))
            ]
            return
        except (OSError, ValueError) as exc:
            result.failed += len(messages)
            result.errors.append(f"{self.url}: {exc}")
            return
        result.accepted += int(body.get("accepted", len(messages)))
