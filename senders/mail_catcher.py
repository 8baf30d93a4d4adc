"""A local mail catcher for `omnicue dev`: a real SMTP server (aiosmtpd) that delivers
nothing and writes every email it accepts as an `.eml` file, for a newcomer to open
in a mail client or a browser's "view source".

It runs in a thread of its own (aiosmtpd's `Controller`), so the process that starts
it needs no event loop. Files are written whole, then renamed into place, so a reader
never sees half an email.
"""

from __future__ import annotations

import re
import threading
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from omnicue.services import free_port

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class _Writer:
    def __init__(self, directory: Path, prefix: str) -> None:
        self.directory = directory
        self.prefix = prefix
        self.count = 0
        self._lock = threading.Lock()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        headers = BytesHeaderParser().parsebytes(raw)
        # The Message-ID's local part is the action id for Omnicue's emails.
        message_id = (headers.get("Message-ID") or "").strip("<> ").split("@", 1)[0]
        with self._lock:
            self.count += 1
            number = self.count
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        name = _UNSAFE.sub("_", f"{self.prefix}{stamp}-{number:05d}-{message_id or 'email'}")
        path = self.directory / f"{name}.eml"
        partial = path.with_suffix(".eml.partial")
        partial.write_bytes(raw)
        partial.replace(path)
        return "250 OK: caught, not delivered"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        envelope.rcpt_tos.append(address)
        return "250 OK"


class MailCatcher:
    """`start()`, then send to `url`; each email lands in `directory` as an `.eml`."""

    def __init__(
        self, directory: Path, host: str = "127.0.0.1", port: int = 0, prefix: str = "email-"
    ) -> None:
        self.directory = directory
        self.host = host
        # aiosmtpd checks its server by connecting to the port: it must be a real one.
        self._port = port or free_port()
        self._writer = _Writer(directory, prefix)
        self._controller: Controller | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    @property
    def caught(self) -> int:
        return self._writer.count

    def files(self) -> list[Path]:
        return sorted(self.directory.glob(f"{self._writer.prefix}*.eml"))

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        controller = Controller(self._writer, hostname=self.host, port=self._port)
        controller.start()
        self._controller = controller

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> MailCatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["MailCatcher"]
