"""Korean advertising rules for marketing messages (정보통신망법 제50조, 시행령 제61조).

An advertisement sent electronically to a recipient in Korea must start with `(광고)`
(for email: the subject), name the sender, and say how to opt out free of charge
(for SMS and Kakao usually a free 080 number, for email an unsubscribe link).
Transactional messages (an order confirmation) are not advertisements and are left
alone.

Which recipients count as Korean is a policy (`OMNICUE_SENDER_AD_LABEL_POLICY`):
`korea` labels customers whose locale is Korean (`ko`, `ko-KR`) or whose timezone is
Korean (`Asia/Seoul`); `always` labels every marketing message; `never` none (for
markets where the law does not apply, at the operator's own risk). A customer with
neither locale nor timezone is judged by the default timezone the engine also uses for
quiet hours, so an unknown customer of a Korean deployment is labelled.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from schemas.events import ActionChannel, Category

AdLabelPolicy = Literal["korea", "always", "never"]
AD_LABEL_POLICIES: tuple[AdLabelPolicy, ...] = ("korea", "always", "never")
AD_LABEL = "(광고)"
# The channels the issue names. (App push ads are covered by the same article in the
# regulator's guidance; add "push" here if the operator wants them labelled too.)
AD_CHANNELS: frozenset[ActionChannel] = frozenset({"sms", "kakao", "email"})
# IANA names for Korea: the canonical zone and its legacy alias.
KOREAN_TIMEZONES = frozenset({"Asia/Seoul", "ROK"})


@dataclass(frozen=True)
class Advertiser:
    """Who sends, and how a recipient opts out: what the law wants in every ad."""

    name: str
    # A free opt-out number (080-...), the way SMS and Kakao ads say how to opt out.
    opt_out_phone: str | None = None


@dataclass(frozen=True)
class AdNotice:
    """What a labelled message carries: the label up front, the opt-out at the end."""

    label: str
    opt_out: tuple[str, ...]


def is_korean(locale: str | None, timezone: str | None) -> bool:
    """Korean by locale (`ko`, `ko-KR`, `ko_KR`) or by timezone."""
    if locale and locale.replace("_", "-").split("-", 1)[0].lower() == "ko":
        return True
    return timezone in KOREAN_TIMEZONES


def needs_ad_label(
    *,
    category: Category,
    channel: ActionChannel,
    locale: str | None,
    timezone: str | None,
    policy: AdLabelPolicy,
) -> bool:
    if category != "marketing" or channel not in AD_CHANNELS or policy == "never":
        return False
    return policy == "always" or is_korean(locale, timezone)


def opt_out_lines(
    channel: ActionChannel,
    language: str,
    advertiser: Advertiser,
    unsubscribe_url: str | None,
) -> tuple[str, ...]:
    """The opt-out instructions, in the message's language. Raises ValueError when the
    advertiser gave nothing to opt out with (checked at start: see `check_advertiser`)."""
    korean = language == "ko"
    if channel == "email":
        if not unsubscribe_url:
            raise ValueError("an advertising email needs an unsubscribe URL")
        if korean:
            return (
                f"본 메일은 {advertiser.name}의 광고성 정보입니다.",
                f"수신을 원하지 않으시면 수신거부: {unsubscribe_url}",
            )
        return (
            f"This is an advertisement from {advertiser.name}.",
            f"To stop receiving these messages, unsubscribe: {unsubscribe_url}",
        )
    if advertiser.opt_out_phone:
        how = advertiser.opt_out_phone
        return (f"무료수신거부 {how}",) if korean else (f"Free opt-out: {how}",)
    if unsubscribe_url:
        return (f"수신거부 {unsubscribe_url}",) if korean else (f"Opt out: {unsubscribe_url}",)
    raise ValueError(f"an advertising {channel} message needs an opt-out number or URL")


def ad_notice(
    channel: ActionChannel,
    language: str,
    advertiser: Advertiser,
    unsubscribe_url: str | None,
) -> AdNotice:
    return AdNotice(
        ad_label(channel, advertiser), opt_out_lines(channel, language, advertiser, unsubscribe_url)
    )


def ad_label(channel: ActionChannel, advertiser: Advertiser) -> str:
    # SMS and Kakao name the sender right after the label (시행령 제61조); an email
    # names it in its From and in the body's footer.
    return AD_LABEL if channel == "email" else f"{AD_LABEL} [{advertiser.name}]"


def prefix_label(text: str, label: str) -> str:
    """`label` before `text`, once: a template that already starts with `(광고)` does
    not get a second one."""
    stripped = text.lstrip()
    if stripped.startswith(AD_LABEL):
        stripped = stripped[len(AD_LABEL) :].lstrip()
    return f"{label} {stripped}" if stripped else label


def check_advertiser(
    channel: ActionChannel,
    policy: AdLabelPolicy,
    advertiser: Advertiser,
    unsubscribe_url: str | None,
) -> None:
    """At start: raise ValueError if this channel could send an ad it cannot label."""
    if policy == "never" or channel not in AD_CHANNELS:
        return
    if not advertiser.name.strip():
        raise ValueError("advertising messages must name the sender (OMNICUE_SENDER_BRAND)")
    try:
        opt_out_lines(channel, "ko", advertiser, unsubscribe_url)
    except ValueError as exc:
        hint = (
            "OMNICUE_SENDER_UNSUBSCRIBE_URL"
            if channel == "email"
            else "OMNICUE_SENDER_OPT_OUT_PHONE or OMNICUE_SENDER_UNSUBSCRIBE_URL"
        )
        raise ValueError(
            f"{exc} (set {hint}, or OMNICUE_SENDER_AD_LABEL_POLICY=never where Korean "
            "advertising law does not apply)"
        ) from None


__all__ = [
    "AD_CHANNELS",
    "AD_LABEL",
    "AD_LABEL_POLICIES",
    "KOREAN_TIMEZONES",
    "AdLabelPolicy",
    "AdNotice",
    "Advertiser",
    "ad_label",
    "ad_notice",
    "check_advertiser",
    "is_korean",
    "needs_ad_label",
    "opt_out_lines",
    "prefix_label",
]
