"""The consent wording a visitor is shown: what a subscription's ledger version refers to."""

from __future__ import annotations

from collections.abc import Mapping

from app.config import Locale
from app.i18n import Translator


def wording(*, list_name: str, locale: Locale, overrides: Mapping[Locale, str]) -> str:
    """The list's own wording in `locale` if the operators wrote one, else the catalogue's."""
    text = overrides.get(locale)
    if text is not None:
        return text.replace("{list}", list_name)
    return Translator(locale)("consent.text", list=list_name)
