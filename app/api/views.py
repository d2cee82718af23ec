"""What every page needs from the request: its language, the list's wording, the look."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import Request

from app import pages
from app.config import ListSettings, Locale, Settings
from app.i18n import for_list
from app.middleware import on_this_host


def list_settings(settings: Settings, *, slug: str, name: str) -> ListSettings:
    """The list's declared settings; a list created through the admin API has the defaults."""
    return settings.list_settings(slug) or ListSettings(slug=slug, name=name)


def chrome(
    request: Request,
    settings: Settings,
    *,
    locale: Locale,
    declared: ListSettings | None,
    list_name: str | None,
    switch_path: str | None = None,
) -> pages.Chrome:
    """The frame of a page in `locale`. Its language switch leads to the same page (a GET of
    this URL) unless `switch_path` names the page to show instead (after a POST)."""
    t = for_list(locale, declared)
    if switch_path is None and request.method in ("GET", "HEAD"):
        path, query = request.url.path, request.url.query
    else:
        path, query = switch_path or request.url.path, ""
    stylesheet = settings.dsfr_stylesheet_url
    return pages.Chrome(
        t=t,
        # The path as it came, encoded again (Starlette gives it decoded: `%00` is a NUL),
        # on this host (the error page of `//evil.example/x`, a path nginx passes on as it
        # came, linked its other language to another site's page).
        switch_url=pages.with_lang(on_this_host(quote(path)), query, pages.other_locale(locale)),
        service_name=list_name or t("layout.service"),
        stylesheet_url=str(stylesheet) if stylesheet else None,
        proof_of_work=settings.proof_of_work_bits > 0,
    )
