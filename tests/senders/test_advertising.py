"""The Korean advertising rules (정보통신망법 제50조): pure."""

from __future__ import annotations

import pytest

from senders.advertising import (
    AD_LABEL,
    Advertiser,
    ad_notice,
    check_advertiser,
    is_korean,
    needs_ad_label,
    prefix_label,
)

SHOP = Advertiser("Shop", opt_out_phone="080-123-4567")


@pytest.mark.parametrize(
    ("locale", "timezone", "korean"),
    [
        ("ko", None, True),
        ("ko-KR", "America/New_York", True),
        ("ko_KR", None, True),
        ("KO-kr", None, True),
        (None, "Asia/Seoul", True),
        ("en-US", "Asia/Seoul", True),
        ("en-US", "America/New_York", False),
        ("kok", None, False),  # Konkani is not Korean
        (None, "Asia/Tokyo", False),
        (None, None, False),
    ],
)
def test_korean_by_locale_or_timezone(
    locale: str | None, timezone: str | None, korean: bool
) -> None:
    assert is_korean(locale, timezone) is korean


def test_only_marketing_on_sms_kakao_and_email_to_korean_customers_is_labelled() -> None:
    def label(category: str, channel: str, policy: str, tz: str | None = "Asia/Seoul") -> bool:
        return needs_ad_label(
            category=category,  # type: ignore[arg-type]
            channel=channel,  # type: ignore[arg-type]
            locale=None,
            timezone=tz,
            policy=policy,  # type: ignore[arg-type]
        )

    for channel in ("sms", "kakao", "email"):
        assert label("marketing", channel, "korea")
        assert not label("transactional", channel, "korea")
        assert not label("marketing", channel, "korea", tz="Europe/Berlin")
        assert label("marketing", channel, "always", tz="Europe/Berlin")
        assert not label("transactional", channel, "always")
        assert not label("marketing", channel, "never")
    assert not label("marketing", "push", "korea")
    assert not label("marketing", "push", "always")


def test_sms_and_kakao_name_the_sender_and_a_free_opt_out_number() -> None:
    for channel in ("sms", "kakao"):
        notice = ad_notice(channel, "ko", SHOP, None)
        assert notice.label == "(광고) [Shop]"
        assert notice.opt_out == ("무료수신거부 080-123-4567",)
    english = ad_notice("sms", "en", SHOP, None)
    assert english.label == "(광고) [Shop]"  # the law's label, whatever the language
    assert english.opt_out == ("Free opt-out: 080-123-4567",)
    no_number = ad_notice("sms", "ko", Advertiser("Shop"), "https://s.example/u/1")
    assert no_number.opt_out == ("수신거부 https://s.example/u/1",)


def test_email_labels_the_subject_and_links_the_unsubscribe_page() -> None:
    notice = ad_notice("email", "ko", SHOP, "https://s.example/u/1")
    assert notice.label == AD_LABEL
    assert notice.opt_out[0] == "본 메일은 Shop의 광고성 정보입니다."
    assert "https://s.example/u/1" in notice.opt_out[1]
    with pytest.raises(ValueError, match="unsubscribe URL"):
        ad_notice("email", "ko", SHOP, None)


def test_the_label_goes_first_and_only_once() -> None:
    assert prefix_label("Hello", "(광고) [Shop]") == "(광고) [Shop] Hello"
    assert prefix_label("  (광고) Hello", AD_LABEL) == "(광고) Hello"
    assert prefix_label("(광고)Hello", "(광고) [Shop]") == "(광고) [Shop] Hello"
    assert prefix_label("", AD_LABEL) == AD_LABEL


def test_a_sender_that_could_not_label_an_ad_fails_at_start() -> None:
    check_advertiser("sms", "korea", SHOP, None)
    check_advertiser("email", "korea", SHOP, "https://s.example/u/{action_id}")
    check_advertiser("push", "always", Advertiser(""), None)  # push is never labelled
    check_advertiser("email", "never", SHOP, None)
    with pytest.raises(ValueError, match="OMNICUE_SENDER_UNSUBSCRIBE_URL"):
        check_advertiser("email", "korea", SHOP, None)
    with pytest.raises(ValueError, match="OMNICUE_SENDER_OPT_OUT_PHONE"):
        check_advertiser("kakao", "always", Advertiser("Shop"), None)
    with pytest.raises(ValueError, match="OMNICUE_SENDER_BRAND"):
        check_advertiser("sms", "korea", Advertiser(" ", "080-1"), None)
