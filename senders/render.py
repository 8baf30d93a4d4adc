"""An action's message, rendered from Jinja2 templates in the customer's language.

Templates live in one directory per language (`ko/`, `en/`):

- `<template>.txt` defines `{% block subject %}` (the email subject, the push title)
  and `{% block text %}` (the SMS, Kakao or push text, and the email's plain part);
- `_email.html` is the email's HTML part around that text (autoescaped); a
  `<template>.html` beside it, when there is one, is that template's own HTML part.

Omnicue ships both languages for every template its packaged rules name. A
`--templates DIR` (`OMNICUE_SENDER_TEMPLATES`) laid out the same way overrides them
file by file and may add templates of its own. `Renderer.check` is called at start
with every template the rules name, so a missing one stops the sender before it
sends anything, not at send time.

The language: the customer's locale (`ko-KR` is `ko`), else Korean when their timezone
is Korean, else `OMNICUE_SENDER_DEFAULT_LOCALE`. The engine puts the customer's
locale and timezone on every action; a customer with neither is taken to be in
`OMNICUE_DEFAULT_TIMEZONE`.

`render` is pure (templates are read once, at construction): the runtime calls it
for every transport, and the webhook body carries its result.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import jinja2
from pydantic import BaseModel, ConfigDict

from omnicue.rules import read_rules_file
from omnicue.settings import Settings
from schemas.actions import Action
from schemas.events import ActionChannel
from schemas.rules import RulesError, RulesFile
from senders.advertising import (
    AdLabelPolicy,
    AdNotice,
    Advertiser,
    ad_label,
    ad_notice,
    check_advertiser,
    is_korean,
    needs_ad_label,
    prefix_label,
)

log = logging.getLogger(__name__)

PACKAGED_TEMPLATES = Path(__file__).resolve().parent / "templates"
LANGUAGES: tuple[str, ...] = ("ko", "en")
EMAIL_LAYOUT = "_email.html"
# The channels whose messages have a subject (email) or a title (push).
_TITLED: frozenset[ActionChannel] = frozenset({"email", "push"})


class TemplateError(ValueError):
    """A template that is missing or broken: raised at start by `check`."""


class RenderedMessage(BaseModel):
    """What the provider is given. `subject` is the email subject or the push title."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    template: str
    language: str
    subject: str | None = None
    text: str
    html: str | None = None
    advertising: bool = False
    unsubscribe_url: str | None = None


@dataclass(frozen=True)
class RenderOptions:
    ad_policy: AdLabelPolicy = "korea"
    advertiser: Advertiser = Advertiser("Omnicue")
    # `{action_id}`, `{customer_id}` and `{channel}` are replaced.
    unsubscribe_url: str | None = None
    default_language: str = "en"
    default_timezone: str = "Asia/Seoul"
    # False: an ad with no opt-out configured is labelled and flagged, without the
    # opt-out lines (a provider that adds its own); True: it is an error.
    require_opt_out: bool = True


def language_of(locale: str | None, timezone: str | None, default: str) -> str:
    """The template language for a customer (see the module docstring)."""
    if locale:
        language = locale.replace("_", "-").split("-", 1)[0].lower()
        return language if language in LANGUAGES else default
    return "ko" if is_korean(None, timezone) else default


def rule_templates(rules: RulesFile, channel: ActionChannel | None = None) -> set[str]:
    """Every template the rules can send (on `channel`, when given): steps' and
    variants' (a variant's template replaces its step's)."""
    names: set[str] = set()
    for rule in rules.rules:
        variant_templates = {v.template for v in rule.variants.values() if v.template}
        for step in rule.steps:
            if channel is None or channel in step.channels:
                names.add(step.template)
                names.update(variant_templates)
    return names


def _paragraphs(text: str) -> list[str]:
    """The text's lines, one HTML paragraph each."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def _money(value: Any, language: str) -> str:
    amount = float(value)
    return f"{amount:,.0f}원" if language == "ko" else f"₩{amount:,.0f}"


class Renderer:
    def __init__(self, overrides: Path | None = None, options: RenderOptions | None = None):
        if overrides is not None and not overrides.is_dir():
            raise TemplateError(f"templates directory {overrides} does not exist")
        self.options = options or RenderOptions()
        if self.options.default_language not in LANGUAGES:
            raise TemplateError(
                f"default locale {self.options.default_language!r}: templates exist for "
                f"{', '.join(LANGUAGES)}"
            )
        roots = [PACKAGED_TEMPLATES] if overrides is None else [overrides, PACKAGED_TEMPLATES]
        self._env = jinja2.Environment(
            loader=jinja2.FileSystemLoader([str(root) for root in roots]),
            autoescape=jinja2.select_autoescape(enabled_extensions=("html",)),
            # A variable the action does not have is an error, not an empty string;
            # templates test optional ones with `is defined`.
            undefined=jinja2.StrictUndefined,
            # Read once: `check` at start loads them all, and what it checked is what
            # is sent, even if the files change or go while the sender runs.
            auto_reload=False,
            cache_size=-1,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._env.filters["paragraphs"] = _paragraphs

    def _template(self, name: str) -> jinja2.Template:
        return self._env.get_template(name)

    def check(self, templates: Iterable[str], channel: ActionChannel | None = None) -> None:
        """Load every template in every language; raise one TemplateError naming all
        that are missing or broken."""
        problems: list[str] = []
        for language in LANGUAGES:
            if channel in (None, "email"):
                try:
                    self._template(f"{language}/{EMAIL_LAYOUT}")
                except jinja2.TemplateNotFound:
                    problems.append(f"{language}/{EMAIL_LAYOUT} is missing")
                except jinja2.TemplateSyntaxError as exc:
                    problems.append(f"{language}/{EMAIL_LAYOUT}:{exc.lineno}: {exc.message}")
            for name in sorted(templates):
                path = f"{language}/{name}.txt"
                try:
                    template = self._template(path)
                except jinja2.TemplateNotFound:
                    problems.append(f"{path} is missing")
                    continue
                except jinja2.TemplateSyntaxError as exc:
                    problems.append(f"{path}:{exc.lineno}: {exc.message}")
                    continue
                needed = ["text"] + (["subject"] if channel in _TITLED or channel is None else [])
                for block in needed:
                    if block not in template.blocks:
                        problems.append(f"{path} has no {{% block {block} %}}")
                try:
                    self._template(f"{language}/{name}.html")
                except jinja2.TemplateNotFound:
                    pass
                except jinja2.TemplateSyntaxError as exc:
                    problems.append(f"{language}/{name}.html:{exc.lineno}: {exc.message}")
        if problems:
            raise TemplateError("templates: " + "; ".join(problems))

    def unsubscribe_url(self, action: Action) -> str | None:
        url = self.options.unsubscribe_url
        if not url:
            return None
        return (
            url.replace("{action_id}", action.action_id)
            .replace("{customer_id}", action.customer_id)
            .replace("{channel}", action.channel)
        )

    def render(
        self, action: Action, *, locale: str | None = None, timezone: str | None = None
    ) -> RenderedMessage:
        """The message for `action`. Raises TemplateError (a template missing since
        `check`, or one using a variable the action lacks)."""
        options = self.options
        locale = locale if locale is not None else action.locale
        timezone = timezone if timezone is not None else action.timezone
        if locale is None and timezone is None:
            timezone = options.default_timezone
        language = language_of(locale, timezone, options.default_language)
        unsubscribe = self.unsubscribe_url(action)
        advertising = needs_ad_label(
            category=action.category,
            channel=action.channel,
            locale=locale,
            timezone=timezone,
            policy=options.ad_policy,
        )
        notice = None
        if advertising:
            try:
                notice = ad_notice(action.channel, language, options.advertiser, unsubscribe)
            except ValueError as exc:
                if options.require_opt_out:
                    raise TemplateError(str(exc)) from None
                # Labelled, and flagged `advertising` for the provider to add its opt-out.
                notice = AdNotice(ad_label(action.channel, options.advertiser), ())
        context: dict[str, Any] = {
            # The model itself: attribute access, no dump per message.
            "action": action,
            "payload": action.payload,
            "customer_id": action.customer_id,
            "channel": action.channel,
            "language": language,
            "brand": options.advertiser.name,
            "unsubscribe_url": unsubscribe,
            "money": lambda value: _money(value, language),
        }
        try:
            template = self._template(f"{language}/{action.template}.txt")
            # One context for both blocks: building it is most of a render's time.
            jinja_context = template.new_context(context)
            subject = (
                _block(template, "subject", jinja_context) if "subject" in template.blocks else None
            )
            text = body = _block(template, "text", jinja_context)
        except jinja2.TemplateNotFound as exc:
            raise TemplateError(f"template {exc.name} is missing") from None
        except jinja2.UndefinedError as exc:
            raise TemplateError(f"{language}/{action.template}.txt: {exc.message}") from None
        if notice is not None:
            if action.channel == "email":
                subject = prefix_label(subject or "", notice.label)
            else:
                text = prefix_label(text, notice.label)
            if notice.opt_out:
                text = f"{text}\n\n" + "\n".join(notice.opt_out)
        html = None
        if action.channel == "email":
            html = self._html(action, language, context, subject, body, notice)
        return RenderedMessage(
            template=action.template,
            language=language,
            subject=subject if action.channel in _TITLED else None,
            text=text,
            html=html,
            advertising=advertising,
            unsubscribe_url=unsubscribe if action.channel == "email" else None,
        )

    def _html(
        self,
        action: Action,
        language: str,
        context: dict[str, Any],
        subject: str | None,
        body: str,
        notice: AdNotice | None,
    ) -> str:
        # The text without the opt-out lines: the layout shows those in its footer.
        page = {**context, "subject": subject, "text": body, "notice": notice}
        try:
            try:
                template = self._template(f"{language}/{action.template}.html")
            except jinja2.TemplateNotFound:
                template = self._template(f"{language}/{EMAIL_LAYOUT}")
            return template.render(page)
        except jinja2.TemplateNotFound as exc:
            raise TemplateError(f"template {exc.name} is missing") from None
        except jinja2.UndefinedError as exc:
            raise TemplateError(f"{language}/{action.template} (html): {exc.message}") from None


def _block(template: jinja2.Template, name: str, context: jinja2.runtime.Context) -> str:
    return "".join(template.blocks[name](context)).strip()


def build_renderer(settings: Settings, channel: str, *, strict: bool = True) -> Renderer:
    """The renderer a sender starts with, checked against every template its rules
    can send on `channel`: raises TemplateError or ValueError before anything is sent.

    `strict`: an ad this channel could not give opt-out instructions for is an error
    at start. Not strict (the webhook transport, whose provider may add its own): a
    warning at start, and such ads go out labelled and flagged `advertising` only."""
    advertiser = Advertiser(settings.sender_brand, settings.sender_opt_out_phone)
    action_channel = cast(ActionChannel, channel)
    policy = settings.sender_ad_label_policy
    unsubscribe = settings.sender_unsubscribe_url
    require_opt_out = True
    try:
        check_advertiser(action_channel, policy, advertiser, unsubscribe)
    except ValueError as exc:
        if strict:
            raise
        log.warning("%s senders: %s; ads go out labelled without it", channel, exc)
        require_opt_out = False
    options = RenderOptions(
        ad_policy=policy,
        advertiser=advertiser,
        unsubscribe_url=unsubscribe,
        default_language=settings.sender_default_locale,
        default_timezone=settings.default_timezone,
        require_opt_out=require_opt_out,
    )
    renderer = Renderer(settings.sender_templates, options)
    try:
        rules = read_rules_file(settings.rules)
    except RulesError as exc:
        raise TemplateError(f"cannot read the rules to check their templates: {exc}") from None
    renderer.check(rule_templates(rules, action_channel), action_channel)
    return renderer


_default: Renderer | None = None


def render(action: Action) -> RenderedMessage:
    """`action` rendered with the packaged templates and the default options."""
    global _default
    if _default is None:
        _default = Renderer()
    return _default.render(action)


__all__ = [
    "EMAIL_LAYOUT",
    "LANGUAGES",
    "PACKAGED_TEMPLATES",
    "RenderOptions",
    "RenderedMessage",
    "Renderer",
    "TemplateError",
    "build_renderer",
    "language_of",
    "render",
    "rule_templates",
]
