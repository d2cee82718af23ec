"""String catalogues (one JSON file per language) and language negotiation."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path

from app.config import ListSettings, Locale

LOCALES_DIR = Path(__file__).parent / "locales"


@cache
def catalogue(locale: Locale) -> dict[str, str]:
    data: dict[str, str] = json.loads((LOCALES_DIR / f"{locale.value}.json").read_text("utf-8"))
    return data


class Translator:
    """`t("page.confirm.text", list="BlueHats")` in the locale it was made for; a list's
    operators may reword any string (`overrides`, from `ListSettings.strings`)."""

    def __init__(self, locale: Locale, overrides: Mapping[str, str] | None = None) -> None:
        self.locale = locale
        self._strings = {**catalogue(locale), **(overrides or {})}

    def __contains__(self, key: str) -> bool:
        return key in self._strings

    def __call__(self, key: str, **values: object) -> str:
        text = self._strings[key]
        # Placeholders are filled by name, not with str.format: an operator's wording may
        # hold any brace without breaking the page.
        for name, value in values.items():
            text = text.replace("{" + name + "}", str(value))
        return text


def for_list(locale: Locale, list_settings: ListSettings | None) -> Translator:
    """The catalogue in `locale` with the list's own wording over it."""
    overrides = list_settings.strings.get(locale) if list_settings else None
    return Translator(locale, overrides)


# RFC 9110 §12.4.2's qvalue, with any number of decimals (some clients write more than 3).
_QVALUE = re.compile(r"0(?:\.[0-9]*)?|1(?:\.0*)?")


def qvalue(text: str) -> float | None:
    """A weight of an `Accept` or `Accept-Language` header (`q=0.8`'s `0.8`), from 0 to 1;
    None for anything else (`inf`, `nan`, `1_0`, `2`), which Python's float() would take."""
    text = text.strip()
    return float(text) if _QVALUE.fullmatch(text) else None


def negotiate(accept_language: str | None, *, default: Locale) -> Locale:
    """The best supported language in an `Accept-Language` header, else `default`."""
    return preferred(accept_language) or default


def preferred(accept_language: str | None) -> Locale | None:
    """The best supported language in an `Accept-Language` header, if it names one."""
    if not accept_language:
        return None
    best: tuple[float, Locale] | None = None
    for position, part in enumerate(accept_language.split(",")[:20]):
        tag, *params = part.strip().split(";")
        quality: float | None = 1.0
        for param in params:
            # The weight's name in any case, with spaces around `=` (RFC 9110 §12.4.2).
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                quality = qvalue(value)
                break
        if quality is None:
            continue
        primary = tag.strip().split("-")[0].lower()
        try:
            locale = Locale(primary)
        except ValueError:
            continue
        # Earlier entries win ties, as browsers list them by preference.
        score = quality - position * 1e-6
        if quality > 0 and (best is None or score > best[0]):
            best = (score, locale)
    return best[1] if best else None


def parse_locale(value: str | None) -> Locale | None:
    if value is None:
        return None
    try:
        return Locale(value.strip().lower()[:2])
    except ValueError:
        return None
