"""`omnicue dev`'s senders: the mail catcher's .eml files, and `--transport webhook`
switching every sender to a (real, local) webhook provider."""

from __future__ import annotations

import email
import email.policy
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.omnicue.test_dev import (
    FIRST_ACTION_TIMEOUT,
    READY_LINE,
    READY_TIMEOUT,
    STOP_TIMEOUT,
    Output,
    _env,
    running_dev,
)
from tests.senders.provider import SECRET, RecordingProvider

# `omnicue dev` binds fixed ports: one dev-stack module at a time (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("dev_stack_lock")




def _stop(proc: subprocess.Popen[str], out: Output) -> None:
    proc.send_signal(signal.SIGINT)
    assert proc.wait(STOP_TIMEOUT) == 0
    out.drain()
    assert out.lines[-1] == "omnicue dev stopped (exit code 0)", out.lines[-15:]


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_dev_catches_its_emails_as_eml_files_beside_the_logs(tmp_path: Path) -> None:
    with running_dev(tmp_path) as (proc, out):
        ready = out.wait_for(READY_LINE, READY_TIMEOUT)
        line = ready.group(0)
        logs = Path(ready.group(5))
        caught = re.search(r"mail catcher (smtp://127\.0\.0\.1:\d+), emails in (\S+)/email-\*\.eml",
                           line)  # fmt: skip
        assert caught is not None, line
        assert Path(caught.group(2)) == logs
        assert "senders console (email over SMTP to the mail catcher)" in line
        # The simulator's customers without a push token get the cart reminder by email.
        deadline = time.monotonic() + FIRST_ACTION_TIMEOUT
        while not (emails := sorted(logs.glob("email-*.eml"))):
            assert time.monotonic() < deadline, "\n".join(out.lines[-30:])
            assert proc.poll() is None, "\n".join(out.lines[-30:])
            time.sleep(0.5)
        _stop(proc, out)
    message = email.message_from_bytes(emails[0].read_bytes(), policy=email.policy.default)
    action_id = str(message["X-Omnicue-Action-Id"])
    assert message["Message-ID"] == f"<{action_id}@omnicue.localhost>"
    assert emails[0].name.endswith(f"-{action_id}.eml")
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message.get_content_type() == "multipart/alternative"
    # The emails stay for the newcomer to open after the stop.
    assert emails[0].is_file()


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_dev_transport_webhook_switches_every_sender(tmp_path: Path) -> None:
    with RecordingProvider() as provider:
        url = provider.url  # http://127.0.0.1:PORT/hooks/{channel}
        args = ("--transport", "webhook", "--webhook-url", url)
        with running_dev(tmp_path, *args, OMNICUE_WEBHOOK_SECRET=SECRET) as (proc, out):
            line = out.wait_for(READY_LINE, READY_TIMEOUT).group(0)
            assert f"senders webhook {url}" in line
            deadline = time.monotonic() + FIRST_ACTION_TIMEOUT
            while not provider.delivered:
                assert time.monotonic() < deadline, "\n".join(out.lines[-30:])
                time.sleep(0.5)
            _stop(proc, out)
    assert all(r.signed for r in provider.requests)
    assert {r.path.rsplit("/", 1)[1] for r in provider.requests} <= {"push", "email", "sms",
                                                                      "kakao"}  # fmt: skip


def test_dev_wants_a_webhook_url_with_the_webhook_transport(tmp_path: Path) -> None:
    for args in (["--transport", "webhook"], ["--webhook-url", "http://127.0.0.1:9/x"]):
        result = subprocess.run(
            [sys.executable, "-m", "omnicue.cli", "dev", *args],
            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 2
        assert "--transport webhook and --webhook-url URL go together" in result.stderr
