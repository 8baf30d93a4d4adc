"""Rendering actions from the packaged Jinja2 templates, overrides, and the ad rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from omnicue.rules import packaged_rules_path, read_rules_file
from omnicue.settings import Settings
from schemas.actions import Action, Recipient
from senders.advertising import Advertiser
from senders.render import (
    LANGUAGES,
    PACKAGED_TEMPLATES,
    Renderer,
    RenderOptions,
    TemplateError,
    build_renderer,
    language_of,
    render,
    rule_templates,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
OPTIONS = RenderOptions(
    advertiser=Advertiser("Shop", opt_out_phone="080-123-4567"),
    unsubscribe_url="https://shop.example/unsubscribe/{action_id}?c={customer_id}",
)
CART = {
    "cart_id": "cart-9",
    "items": [{"product_id": "p1", "quantity": 2, "price": 6000.0}],
    "value": 12000.0,
    "coupon": "CART10",
}


def _action(
    channel: str = "email",
    template: str = "cart_reminder_2",
    *,
    category: str = "marketing",
    payload: dict[str, Any] | None = None,
) -> Action:
    values: dict[str, Any] = {
        "action_id": "act_1", "rule_id": "cart_abandonment", "rule_version": "1", "step": 2,
        "customer_id": "c1", "journey_key": "cart-9", "channel": channel,
        "category": category, "template": template,
        "recipient": Recipient(email="kim@example.com", phone="+821012345678"),
        "payload": CART if payload is None else payload,
        # The customer's locale and timezone travel on the action, not in its payload;
        # tests name them beside the payload's fields for brevity.
        "created_at": NOW, "due_at": NOW, "expires_at": NOW + timedelta(hours=1),
        "trigger_event_id": "e1", "trigger_occurred_at": NOW,
    }  # fmt: skip
    payload_values = dict(values["payload"])
    for field in ("locale", "timezone"):
        values[field] = payload_values.pop(field, None)
    values["payload"] = payload_values
    return Action(**values)


def test_every_template_of_the_packaged_rules_exists_in_korean_and_english() -> None:
    names: set[str] = set()
    for ruleset in ("default", "demo"):
        names |= rule_templates(read_rules_file(packaged_rules_path(ruleset)))
    assert "order_confirmation" in names and "cart_reminder_1" in names
    Renderer(options=OPTIONS).check(names)
    for language in LANGUAGES:
        for name in names:
            assert (PACKAGED_TEMPLATES / language / f"{name}.txt").is_file()


def test_every_packaged_template_renders_on_every_channel_in_both_languages() -> None:
    renderer = Renderer(options=OPTIONS)
    rules = read_rules_file(packaged_rules_path())
    for rule in rules.rules:
        for step in rule.steps:
            for channel in step.channels:
                for locale in ("ko-KR", "en-US"):
                    payload = {**CART, **step.payload, "locale": locale}
                    action = _action(
                        channel, step.template, category=rule.category, payload=payload
                    )
                    message = renderer.render(action)
                    assert message.language == locale[:2]
                    assert message.text.strip()
                    assert "{{" not in message.text and "{%" not in message.text
                    if channel in ("email", "push"):
                        assert message.subject
                    if channel == "email":
                        assert message.html and message.html.startswith("<!DOCTYPE html>")


@pytest.mark.parametrize(
    ("locale", "timezone", "language"),
    [
        ("ko-KR", None, "ko"),
        ("ko", "America/New_York", "ko"),
        ("en_GB", "Asia/Seoul", "en"),  # the locale wins over the timezone
        ("ja-JP", None, "en"),  # no Japanese templates: the default
        (None, "Asia/Seoul", "ko"),
        (None, "Europe/Paris", "en"),
        (None, None, "en"),
    ],
)
def test_the_language_follows_the_locale_then_the_timezone(
    locale: str | None, timezone: str | None, language: str
) -> None:
    assert language_of(locale, timezone, "en") == language


def test_the_locale_and_timezone_come_from_the_payload_or_the_caller() -> None:
    renderer = Renderer(options=OPTIONS)
    english = renderer.render(_action(payload={**CART, "locale": "en-US"}))
    assert english.language == "en"
    assert english.subject == "Still thinking it over? Here is a coupon"
    assert renderer.render(_action(), locale="en").language == "en"
    # Neither: the default timezone (Asia/Seoul, as for quiet hours), so Korean.
    assert renderer.render(_action()).language == "ko"
    paris = RenderOptions(default_timezone="Europe/Paris", unsubscribe_url="https://u")
    assert Renderer(options=paris).render(_action()).language == "en"


def test_a_korean_marketing_email_is_labelled_in_its_subject_with_an_unsubscribe_footer() -> None:
    message = Renderer(options=OPTIONS).render(_action())
    assert message.advertising
    assert message.subject == "(광고) 장바구니 상품, 쿠폰으로 더 가볍게"
    assert "12,000원" in message.text and "CART10" in message.text
    assert message.text.endswith(
        "본 메일은 Shop의 광고성 정보입니다.\n"
        "수신을 원하지 않으시면 수신거부: https://shop.example/unsubscribe/act_1?c=c1"
    )
    assert message.unsubscribe_url == "https://shop.example/unsubscribe/act_1?c=c1"
    assert message.html is not None
    assert "본 메일은 Shop의 광고성 정보입니다." in message.html
    assert 'href="https://shop.example/unsubscribe/act_1?c=c1"' in message.html
    # The opt-out is in the footer once, not in the body paragraphs as well.
    assert message.html.count("광고성 정보") == 1


def test_korean_sms_and_kakao_ads_start_with_the_label_and_end_with_the_free_opt_out() -> None:
    for channel in ("sms", "kakao"):
        message = Renderer(options=OPTIONS).render(_action(channel))
        assert message.text.startswith("(광고) [Shop] 아직 장바구니에")
        assert message.text.endswith("\n\n무료수신거부 080-123-4567")
        assert message.subject is None and message.html is None


def test_transactional_and_non_korean_messages_are_not_labelled() -> None:
    renderer = Renderer(options=OPTIONS)
    confirmation = renderer.render(_action("sms", "order_confirmation", category="transactional"))
    assert not confirmation.advertising
    assert "(광고)" not in confirmation.text and "수신거부" not in confirmation.text
    american = renderer.render(
        _action("sms", payload={**CART, "locale": "en-US", "timezone": "America/Chicago"})
    )
    assert not american.advertising and "(광고)" not in american.text
    push = renderer.render(_action("push"))
    assert not push.advertising and push.subject and "(광고)" not in push.subject


def test_the_policy_labels_always_or_never() -> None:
    abroad = _action("sms", payload={**CART, "locale": "en-US", "timezone": "America/Chicago"})
    always = Renderer(options=RenderOptions(ad_policy="always", advertiser=OPTIONS.advertiser))
    message = always.render(abroad)
    assert message.text.startswith("(광고) [Shop] Your cart still has items")
    assert message.text.endswith("Free opt-out: 080-123-4567")
    never = Renderer(options=RenderOptions(ad_policy="never"))
    assert "(광고)" not in never.render(_action("sms")).text


def test_html_escapes_what_the_payload_brings() -> None:
    payload = {**CART, "coupon": "<script>alert(1)</script>"}
    message = Renderer(options=OPTIONS).render(_action(payload=payload))
    assert message.html is not None and "<script>" not in message.html
    assert "&lt;script&gt;" in message.html
    assert "<script>" in message.text  # plain text is not HTML


def test_a_templates_directory_overrides_file_by_file_and_adds_templates(tmp_path: Path) -> None:
    (tmp_path / "ko").mkdir()
    (tmp_path / "en").mkdir()
    (tmp_path / "ko" / "cart_reminder_2.txt").write_text(
        "{% block subject %}쿠폰 {{ payload.coupon }}{% endblock %}"
        "{% block text %}{{ customer_id }}님, 쿠폰 {{ payload.coupon }}{% endblock %}",
        encoding="utf-8",
    )
    for language in ("ko", "en"):
        (tmp_path / language / "cart_b.txt").write_text(
            "{% block subject %}B{% endblock %}{% block text %}variant b{% endblock %}",
            encoding="utf-8",
        )
    renderer = Renderer(tmp_path, OPTIONS)
    renderer.check({"cart_reminder_1", "cart_reminder_2", "cart_b"})
    overridden = renderer.render(_action())
    assert overridden.subject == "(광고) 쿠폰 CART10"
    assert overridden.text.startswith("c1님, 쿠폰 CART10")
    # Not overridden: packaged.
    english = renderer.render(_action(payload={**CART, "locale": "en"}))
    assert english.subject == "Still thinking it over? Here is a coupon"
    assert renderer.render(_action(template="cart_b")).text.startswith("variant b")


def test_a_missing_or_broken_template_is_an_error_at_start_naming_the_files(
    tmp_path: Path,
) -> None:
    (tmp_path / "ko").mkdir()
    (tmp_path / "ko" / "cart_b.txt").write_text("{% block text %}b{% endblock %}", "utf-8")
    (tmp_path / "ko" / "broken.txt").write_text("{% block text %}{{ oops {% endblock %}", "utf-8")
    renderer = Renderer(tmp_path, OPTIONS)
    with pytest.raises(TemplateError) as caught:
        renderer.check({"cart_b", "broken", "welcome"})
    message = str(caught.value)
    assert "en/cart_b.txt is missing" in message
    assert "ko/cart_b.txt has no {% block subject %}" in message
    assert "ko/broken.txt:1:" in message
    assert "welcome" not in message  # packaged in both languages
    # An SMS sender needs no subject.
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "cart_b.txt").write_text("{% block text %}b{% endblock %}", "utf-8")
    renderer.check({"cart_b"}, channel="sms")
    with pytest.raises(TemplateError, match="does not exist"):
        Renderer(tmp_path / "nope")


def test_a_template_gone_or_a_variable_the_action_lacks_is_a_clear_error(
    tmp_path: Path,
) -> None:
    with pytest.raises(TemplateError, match="ko/nope.txt is missing"):
        Renderer(options=OPTIONS).render(_action(template="nope"))
    (tmp_path / "ko").mkdir()
    (tmp_path / "ko" / "welcome.txt").write_text(
        "{% block subject %}s{% endblock %}{% block text %}{{ payload.points }}{% endblock %}",
        "utf-8",
    )
    with pytest.raises(TemplateError, match="ko/welcome.txt: .*points"):
        Renderer(tmp_path, OPTIONS).render(_action(template="welcome", payload={}))


def test_the_channel_filter_of_the_rules_templates() -> None:
    rules = read_rules_file(packaged_rules_path())
    assert rule_templates(rules, "sms") == {"win_back", "store_visit_coupon", "order_confirmation"}
    assert "cart_reminder_2" in rule_templates(rules, "email")


def test_render_uses_the_packaged_templates() -> None:
    message = render(_action("push", "welcome", payload={"locale": "en"}))
    assert message.subject == "Welcome to Omnicue"
    assert message.text.startswith("Thanks for joining us.")


def _settings(**values: Any) -> Settings:
    return Settings(**values)


def test_build_renderer_checks_the_rules_templates_and_the_opt_out_at_start(
    tmp_path: Path,
) -> None:
    rules = tmp_path / "rules.yaml"
    text = packaged_rules_path("demo").read_text(encoding="utf-8")
    rules.write_text(text.replace("template: cart_reminder_2", "template: vip_offer"), "utf-8")
    phone = {"sender_opt_out_phone": "080-123-4567"}
    with pytest.raises(TemplateError, match="ko/vip_offer.txt is missing"):
        build_renderer(_settings(rules=rules, **phone), "email", strict=False)
    # The SMS sender never sends vip_offer (an email-only step): it starts.
    build_renderer(_settings(rules=rules, **phone), "sms")
    (tmp_path / "t" / "ko").mkdir(parents=True)
    (tmp_path / "t" / "en").mkdir()
    for language in ("ko", "en"):
        (tmp_path / "t" / language / "vip_offer.txt").write_text(
            "{% block subject %}VIP{% endblock %}{% block text %}vip{% endblock %}", "utf-8"
        )
    url = {"sender_unsubscribe_url": "https://s.example/u/{action_id}"}
    renderer = build_renderer(
        _settings(rules=rules, sender_templates=tmp_path / "t", **url), "email"
    )
    assert renderer.render(_action(template="vip_offer")).subject == "(광고) VIP"
    # Strict: an SMS ad with no opt-out number or URL cannot start.
    with pytest.raises(ValueError, match="OMNICUE_SENDER_OPT_OUT_PHONE"):
        build_renderer(_settings(), "sms")


def test_a_lenient_renderer_labels_an_ad_it_has_no_opt_out_for() -> None:
    renderer = build_renderer(_settings(sender_brand="Shop"), "sms", strict=False)
    message = renderer.render(_action("sms"))
    assert message.advertising and message.text.startswith("(광고) [Shop] ")
    assert "수신거부" not in message.text
