"""What every page needs from the request: its language, the list's wording, the look."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import Request
from starlette.responses import Response

from app import formguard, origins, pages
from app.config import ListSettings, Locale, Settings
from app.i18n import for_list
from app.middleware import PagePolicy, on_this_host
from app.models import utcnow


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


def lead_form_to(response: Response, request: Request, *, url: str | None) -> Response:
    """A page whose form's post leads on to `url` (a list's thank-you page): its CSP lets
    the browser follow there. The settings' lists are in every page's policy already; a
    list created through the API is not, and Chrome stopped its visitors on the form, the
    post taken but its redirect refused (`form-action`)."""
    target = origins.normalize(url) if url else None
    policy: PagePolicy = request.app.state.page_policy
    if target is not None and target not in policy.form_targets:
        response.headers["content-security-policy"] = policy.header(also_form_targets=[target])
    return response


def page_stamp(settings: Settings, *, filled_before: bool) -> str:
    """The fill-time stamp of a served form. `filled_before`: the visitor has filled this
    list's form once already, as a post that passed the robot screen shows (a form sent
    back for correction), or a link of its mail (the form of an expired or used link's page
    to ask for a new one). One who fixes a typo, or asks again, at once (an address the
    browser fills in) must not be dropped as too fast, told to check a mailbox that gets
    nothing: the stamp is dated a fill time back. A robot gains nothing by it, as it needed
    a valid stamp (or none), or a link of a real mail, to get here."""
    now = utcnow()
    if filled_before:
        now -= settings.form_min_fill_time
    return formguard.issue(key=settings.token_key(), now=now)


def kept_for_back(response: Response) -> Response:
    """A form page (the list's form, or that form sent back after a post) that the browser
    may show again from its own cache when its visitor comes back to it with Back. Under the
    pages' `no-store` Chrome could not: one who corrected a typo, went on to the thank-you
    page and pressed Back met "Confirm Form Resubmission" (ERR_CACHE_MISS), a dead end; and
    the form reached by Back was a new one whose stamp was too fresh for a press at once.
    `no-cache` still has every other load ask the server, and `private` keeps it out of
    shared caches (it holds what was typed); neither its URL nor its page holds a token."""
    response.headers["cache-control"] = "private, no-cache"
    return response
