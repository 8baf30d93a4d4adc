"""The `smtp` transport: each action as a real email to an SMTP server.

The URL is `smtp://host:port` (plain, or upgraded with STARTTLS when
`OMNICUE_SENDER_SMTP_STARTTLS` is set) or `smtps://host:port` (TLS from the first
byte). Auth is optional: `OMNICUE_SENDER_SMTP_USERNAME` and `..._PASSWORD`, kept out of
the URL so the password is not in a process list.

The email (built with the standard library's `email` package):

- multipart/alternative: the rendered text, then the HTML (senders/render.py);
- `Message-ID: <action_id@domain>`: derived from the action id, so the second copy a
  crashed sender can send (see senders/__init__.py) has the same id as the first, and
  mail systems that deduplicate on it show one;
- `X-SMTPAPI` with the unique args `omnicue_action_id` and `omnicue_customer_id`: SendGrid
  echoes them on its Event Webhook (omnicue/feedback.py);
- `List-Unsubscribe: <url>` and `List-Unsubscribe-Post: List-Unsubscribe=One-Click`
  (RFC 8058): a mailbox provider's "unsubscribe" button POSTs to the URL. (RFC 8058
  also asks for a DKIM signature covering both headers: that is the relay's job.)

One connection per email, for simplicity: a relay's own queue does the batching.
SMTP 4xx replies, timeouts and lost connections are retryable; 5xx replies are
permanent (`smtp_550`), as the runtime's retry policy expects.
"""

from __future__ import annotations

import email.policy
import io
import json
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from email.generator import BytesGenerator
from email.header import Header
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime, formataddr, parseaddr
from pathlib import Path
from urllib.parse import urlsplit

import aiosmtplib

from omnicue.feedback import ACTION_ARG, CUSTOMER_ARG
from omnicue.settings import Settings
from schemas.actions import Action
from senders.render import RenderedMessage, Renderer, TemplateError
from senders.transports import Accepted, Rejected, Result

ACTION_ID_HEADER = "X-Omnicue-Action-Id"
# SendGrid's SMTP API: unique args given here come back on every Event Webhook event of
# the email, which is how its feedback finds the action and the customer. Other relays
# pass the header through (it names no contact point).
SMTPAPI_HEADER = "X-SMTPAPI"


@dataclass(frozen=True)
class SmtpServer:
    host: str
    port: int
    implicit_tls: bool


def parse_smtp_url(url: str) -> SmtpServer:
    """`smtp://host[:port]` (default 25) or `smtps://host[:port]` (default 465)."""
    parts = urlsplit(url)
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise ValueError(f"{url!r} is not an smtp://host:port or smtps://host:port URL")
    if parts.username or parts.password:
        raise ValueError(
            "put SMTP credentials in OMNICUE_SENDER_SMTP_USERNAME and "
            "OMNICUE_SENDER_SMTP_PASSWORD, not in the URL"
        )
    implicit = parts.scheme == "smtps"
    try:
        port = parts.port or (465 if implicit else 25)
    except ValueError:
        raise ValueError(f"{url!r}: the port is not a number") from None
    return SmtpServer(parts.hostname, port, implicit)


def message_id(action_id: str, domain: str) -> str:
    return f"<{action_id}@{domain}>"


def build_email(action: Action, message: RenderedMessage, *, sender: str, now: datetime) -> Message:
    """The email for `action`. `sender` is the From (`Shop <news@shop.example>`)."""
    if action.recipient.email is None:
        raise ValueError(f"action {action.action_id} has no email address")
    name, address = parseaddr(sender)
    domain = address.rpartition("@")[2]
    if "@" not in address or not domain:
        raise ValueError(f"sender {sender!r} is not an email address")
    # The classic MIME classes, not EmailMessage: Python 3.11's newer folding drops the
    # space where it splits a long non-ASCII subject into encoded words ("쿠폰으로 더"
    # arrives as "쿠폰으로더"); `Header` keeps it.
    mail = MIMEMultipart("alternative")
    mail.attach(MIMEText(message.text, "plain", "utf-8"))
    if message.html is not None:
        mail.attach(MIMEText(message.html, "html", "utf-8"))
    mail["From"] = formataddr((name, address), charset="utf-8")
    mail["To"] = action.recipient.email
    # Encoded words folded here, at RFC 2047's 76; `email_bytes` folds nothing else.
    mail["Subject"] = Header(message.subject or "", "utf-8").encode(linesep="\r\n")
    mail["Date"] = format_datetime(now.astimezone(UTC))
    mail["Message-ID"] = message_id(action.action_id, domain)
    mail[ACTION_ID_HEADER] = action.action_id
    mail[SMTPAPI_HEADER] = json.dumps(
        {"unique_args": {ACTION_ARG: action.action_id, CUSTOMER_ARG: action.customer_id}},
        separators=(",", ":"),
    )
    if message.unsubscribe_url:
        mail["List-Unsubscribe"] = f"<{message.unsubscribe_url}>"
        mail["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    return mail


# compat32 (the classic classes' policy) would fold `List-Unsubscribe:` before its
# one long URL, leaving an empty first line some parsers read as a leading space.
_UNFOLDED = email.policy.compat32.clone(linesep="\r\n", max_line_length=0)


def email_bytes(message: Message) -> bytes:
    """The message as sent: CRLF lines, headers unfolded (all well under 998 bytes)."""
    with io.BytesIO() as out:
        BytesGenerator(out, policy=_UNFOLDED).flatten(message)
        return out.getvalue()


def _reply_rejected(code: int, text: str) -> Rejected:
    # 4xx: "try again later" (greylisting, a full queue); 5xx: it will not change.
    return Rejected(f"smtp_{code}", retryable=400 <= code < 500)


class SmtpTransport:
    """Send each action's rendered email to one SMTP server, one attempt per call."""

    def __init__(
        self,
        url: str,
        renderer: Renderer,
        *,
        sender: str,
        starttls: bool = False,
        username: str | None = None,
        password: str | None = None,
        ca_file: Path | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.server = parse_smtp_url(url)
        if self.server.implicit_tls and starttls:
            raise ValueError("smtps:// is TLS already: STARTTLS is for smtp://")
        if (username is None) != (password is None):
            raise ValueError("SMTP auth needs both a username and a password")
        # Checked now, so a bad From fails at start rather than on every email.
        if "@" not in parseaddr(sender)[1]:
            raise ValueError(f"sender {sender!r} is not an email address")
        self._renderer = renderer
        self._sender = sender
        self._starttls = starttls
        self._username = username
        self._password = password
        self._timeout = timeout
        self._tls_context: ssl.SSLContext | None = None
        if ca_file is not None:
            # A private relay's CA: certificates are still verified, against it.
            self._tls_context = ssl.create_default_context(cafile=str(ca_file))

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send(self, action: Action) -> Result:
        if action.recipient.email is None:
            return Rejected("no_email_address", retryable=False)
        try:
            rendered = self._renderer.render(action)
        except TemplateError:
            return Rejected("template_error", retryable=False)
        mail = build_email(action, rendered, sender=self._sender, now=datetime.now(UTC))
        try:
            await aiosmtplib.send(
                email_bytes(mail),
                sender=parseaddr(self._sender)[1],
                recipients=[action.recipient.email],
                hostname=self.server.host,
                port=self.server.port,
                use_tls=self.server.implicit_tls,
                start_tls=self._starttls,
                tls_context=self._tls_context,
                username=self._username,
                password=self._password,
                timeout=self._timeout,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            refused = exc.recipients[0]
            return _reply_rejected(refused.code, refused.message)
        except aiosmtplib.SMTPResponseException as exc:
            # Sender refused, data refused, auth failed, HELO refused, 421 on connect.
            return _reply_rejected(exc.code, exc.message)
        except aiosmtplib.SMTPNotSupported:
            # STARTTLS or auth asked of a server without them: no retry will help.
            return Rejected("smtp_not_supported", retryable=False)
        except (aiosmtplib.SMTPTimeoutError, TimeoutError):
            return Rejected("timeout", retryable=True)
        except (aiosmtplib.SMTPException, OSError):
            # Refused, reset, TLS failure, disconnected mid-dialogue. The server may have
            # queued the email already; its Message-ID then matches the retry's.
            return Rejected("connection_error", retryable=True)
        return Accepted()


def build_smtp_transport(settings: Settings, renderer: Renderer) -> SmtpTransport:
    if not settings.sender_url:
        raise ValueError("the smtp transport needs --url smtp://host:port (or OMNICUE_SENDER_URL)")
    if not settings.sender_unsubscribe_url:
        raise ValueError(
            "the smtp transport needs OMNICUE_SENDER_UNSUBSCRIBE_URL (List-Unsubscribe, RFC 8058)"
        )
    password = settings.sender_smtp_password
    return SmtpTransport(
        settings.sender_url,
        renderer,
        sender=settings.sender_email_from,
        starttls=settings.sender_smtp_starttls,
        username=settings.sender_smtp_username,
        password=password.get_secret_value() if password is not None else None,
        ca_file=settings.sender_smtp_ca_file,
        timeout=settings.sender_timeout,
    )


__all__ = [
    "ACTION_ID_HEADER",
    "SMTPAPI_HEADER",
    "SmtpServer",
    "SmtpTransport",
    "build_email",
    "build_smtp_transport",
    "email_bytes",
    "message_id",
    "parse_smtp_url",
]
