"""Public endpoints: what the site's form, visitors' browsers and mail clients call."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from app import (
    addresses,
    backends,
    errors,
    formguard,
    forms,
    hosted,
    lists,
    origins,
    pages,
    proofofwork,
    subscriptions,
    tokens,
    unsubscribe_form,
)
from app.api import views
from app.api.deps import (
    FORM,
    JSON,
    MULTIPART,
    Database,
    DatabaseDep,
    RateLimiterDep,
    Services,
    SettingsDep,
    evidence,
    inline_refs,
    limit_client,
    media_type,
    read_form,
    read_payload,
    request_locale,
    services_of,
    wants_html,
)
from app.config import ListSettings, Locale, Settings
from app.i18n import for_list, parse_locale, preferred
from app.models import MailingList, utcnow
from app.schemas import (
    Accepted,
    ActionResult,
    ProofOfWorkChallenge,
    SubscriptionRequest,
    UnsubscriptionRequest,
)

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["public"])

SUBSCRIBE_ACCEPTED = Accepted(
    detail="If this address can be subscribed, a confirmation mail is on its way."
)
UNSUBSCRIBE_ACCEPTED = Accepted(
    detail="If this address is subscribed, a mail with an unsubscribe link is on its way."
)


def _json_body(model: BaseModel) -> bytes:
    """A fixed answer's body, written once as JSONResponse writes it."""
    return bytes(JSONResponse(model.model_dump()).body)


SUBSCRIBE_ACCEPTED_BODY = _json_body(SUBSCRIBE_ACCEPTED)
UNSUBSCRIBE_ACCEPTED_BODY = _json_body(UNSUBSCRIBE_ACCEPTED)


def _accepted(body: bytes) -> Response:
    return Response(body, status_code=202, media_type=JSON)


def _form_fields(schema: dict[str, Any]) -> dict[str, Any]:
    """The JSON body's schema as form fields: text values only (a form has no null and
    no nested object, so `attributes` is JSON-only)."""
    properties = {}
    for name, field in schema["properties"].items():
        variants = field.get("anyOf", [field])
        text = [item for item in variants if item.get("type") == "string" or "enum" in item]
        if text:
            properties[name] = {**text[0], "title": field.get("title", name)}
    return {**schema, "properties": properties}


def _body_doc(model: type[SubscriptionRequest] | type[UnsubscriptionRequest]) -> dict[str, Any]:
    # Inlined: a body given in `openapi_extra` cannot add its nested models (Locale) to
    # the document's components, so a `$ref` to them would not resolve.
    schema = inline_refs(model.model_json_schema())
    return {
        "requestBody": {
            "required": True,
            "content": {JSON: {"schema": schema}, FORM: {"schema": _form_fields(schema)}},
        }
    }


def _html_and_json(description: str) -> dict[int | str, dict[str, Any]]:
    return {
        200: {"description": description, "content": {"text/html": {"schema": {"type": "string"}}}}
    }


FORM_TYPES = (FORM, MULTIPART)
# A list's pages: unknown list, or its name typed with capitals (app.api.handlers).
LIST_PAGE_ERRORS: dict[int | str, dict[str, Any]] = {
    308: {
        "description": "The list's name was written with capitals: the same page under its "
        "name in lowercase, as every list's is.",
        "headers": {"Location": {"schema": {"type": "string"}}},
    },
    **errors.responses(errors.ListNotFound, html=True),
}


@dataclass(frozen=True, slots=True)
class Submission:
    """A subscription request as sent: a JSON body (read), or a form post (raw fields, read
    against the list's own fields once the list is known)."""

    body: SubscriptionRequest | None = None
    form: dict[str, str] | None = None


async def subscription_submission(request: Request) -> Submission:
    if media_type(request) in FORM_TYPES:
        return Submission(form=await read_form(request))
    return Submission(body=await read_payload(request, SubscriptionRequest))


@dataclass(frozen=True, slots=True)
class AddressSubmission:
    """An unsubscribe-link request as sent: a JSON body (read), or a form post (raw fields,
    read once the list, and so the page's language and wording, is known)."""

    body: UnsubscriptionRequest | None = None
    form: dict[str, str] | None = None


async def unsubscription_submission(request: Request) -> AddressSubmission:
    if media_type(request) in FORM_TYPES:
        return AddressSubmission(form=await read_form(request))
    return AddressSubmission(body=await read_payload(request, UnsubscriptionRequest))


async def one_click(request: Request) -> bool:
    """True for an RFC 8058 one-click POST (`List-Unsubscribe=One-Click` in a form body)."""
    if media_type(request) not in FORM_TYPES:
        return False
    raw = await request.body()
    if media_type(request) == FORM:
        try:
            fields = parse_qs(raw.decode("utf-8", errors="replace"), max_num_fields=50)
        except ValueError:
            # Too many fields: no mail client's one-click POST; a plain button press then.
            return False
        return "One-Click" in fields.get("List-Unsubscribe", [])
    return b"One-Click" in raw and b"List-Unsubscribe" in raw


def check_form_origin(request: Request, settings: Settings) -> None:
    """Refuse a browser form post sent from a page on a site not allowed (403).

    Any body but JSON: a browser posts JSON to another origin only after a CORS preflight,
    which names the same allowed origins, while a form (`enctype="text/plain"` too) or a
    bodiless post goes without one; servers calling the API send no `Origin`.
    """
    if media_type(request) == JSON:
        return
    origin = origins.request_origin(
        origin=request.headers.get("origin"), referer=request.headers.get("referer")
    )
    if not origins.allowed(origin, settings.form_origins()):
        log.info(
            "form.origin_refused origin=%s path=%s",
            origin[:200] if origin else origin,
            request.url.path,
        )
        raise errors.OriginNotAllowed()


async def screen_client(request: Request) -> Services:
    """Every public POST counts against its client's limit before any other work, then a
    browser form post must come from an allowed site. Called first by each such route (not
    a FastAPI dependency: see `deps.Services`)."""
    services = services_of(request)
    await limit_client(request, services)
    check_form_origin(request, services.settings)
    return services


FORM_ERRORS = (errors.RateLimited, errors.OriginNotAllowed)
POW_ERRORS = (
    errors.ProofOfWorkRequired,
    errors.ProofOfWorkInvalid,
    errors.ProofOfWorkExpired,
    errors.ProofOfWorkUsed,
)


async def _require_proof_of_work(
    body: SubscriptionRequest | UnsubscriptionRequest,
    settings: Settings,
    database: Database,
    *,
    slug: str,
) -> None:
    """When asked for by the settings, check and spend the request's solved challenge."""
    if settings.proof_of_work_bits == 0:
        return
    now = utcnow()
    proofofwork.check(
        challenge=body.pow_challenge,
        nonce=body.pow_nonce,
        key=settings.token_key(),
        bits=settings.proof_of_work_bits,
        ttl=settings.proof_of_work_ttl,
        now=now,
    )
    assert body.pow_challenge is not None
    await database.run(
        proofofwork.spend_for_list,
        list_slug=slug,
        challenge=body.pow_challenge,
        ttl=settings.proof_of_work_ttl,
        now=now,
    )


@router.get(
    "/challenge",
    operation_id="proof_of_work_challenge",
    response_model=ProofOfWorkChallenge,
)
async def challenge(settings: SettingsDep) -> ProofOfWorkChallenge:
    """A proof-of-work challenge for subscribe and unsubscribe-by-address (`bits` 0: none
    is asked for; app/static/pow.js solves it in a browser)."""
    issued = proofofwork.issue(
        key=settings.token_key(),
        bits=settings.proof_of_work_bits,
        ttl=settings.proof_of_work_ttl,
        now=utcnow(),
    )
    return ProofOfWorkChallenge(
        challenge=issued.challenge, bits=issued.bits, expires_at=issued.expires_at
    )


@router.post(
    "/lists/{slug}/subscriptions",
    operation_id="subscribe",
    status_code=202,
    response_model=Accepted,
    responses={
        303: {"description": "A form post: go to the list's thank-you page."},
        **errors.responses(
            errors.ListNotFound,
            errors.InvalidBody,
            errors.UnsupportedMediaType,
            errors.CompressedBody,
            errors.PayloadTooLarge,
            *FORM_ERRORS,
            *POW_ERRORS,
            html=True,
        ),
    },
    openapi_extra=_body_doc(SubscriptionRequest),
)
async def subscribe(slug: str, request: Request) -> Response:
    """Ask to subscribe an address; a confirmation mail follows (double opt-in).

    The answer is the same whatever the address's state, so nobody can learn from it who
    is subscribed; the mail tells the truth instead. A form post that a robot made (its
    honeypot filled, its page's stamp forged) gets the same answer and is dropped. A
    browser's form post with bad input, or sent sooner or later than the page's stamp
    allows, gets the form back (422) and nothing is done until it is sent again.
    """
    services = await screen_client(request)
    submission = await subscription_submission(request)
    settings, database, limiter = services.settings, services.database, services.limiter
    accepted = preferred(request.headers.get("accept-language"))
    if submission.form is None:
        assert submission.body is not None
        body = submission.body
        declared = settings.list_settings(slug)
        if declared is not None:
            attributes = forms.trimmed(body.attributes, declared.fields)
            _refuse_bad_fields(forms.check(attributes, declared.fields))
            body = body.model_copy(update={"attributes": attributes})
            _refuse_what_the_list_cannot_hold(body.email, declared)
        await _require_proof_of_work(body, settings, database, slug=slug)
        await _subscribe(request, database, settings, limiter, slug, body, source="api")
        return _accepted(SUBSCRIBE_ACCEPTED_BODY)

    form = submission.form
    mailing_list = await database.run(lists.get, slug=slug)
    declared = views.list_settings(settings, slug=slug, name=mailing_list.name)
    locale = parse_locale(form.get("locale")) or accepted or Locale(mailing_list.default_locale)
    verdict = _robot_screen(form, settings, declared, slug=slug)
    t = for_list(locale, declared)

    def again(errors: dict[str, str], *, notice: str | None = None) -> Response:
        """The form back, with what was typed and why it was refused."""
        return _subscribe_page(
            request,
            settings,
            mailing_list,
            declared,
            locale=locale,
            values=form,
            errors=errors,
            notice=notice,
        )

    if verdict in formguard.SENT_BACK and wants_html(request, default=False):
        # Maybe a person's, pressed at once or after a night: the form again, not a
        # "check your inbox" for a mail that never leaves.
        return again({}, notice=t("form.notice.send_again", button=t("page.subscribe.button")))
    if verdict != formguard.Verdict.ACCEPTED:
        return _thanks_redirect(settings, mailing_list, locale)

    post = hosted.read_post(form, list_settings=declared, t=t)
    if post.request is None:
        if post.errors and wants_html(request, default=False):
            return again(post.errors)
        if post.invalid is not None:
            raise RequestValidationError(
                post.invalid.errors(include_url=False, include_context=False)
            )
        _refuse_bad_fields(post.problems)
    assert post.request is not None
    refused = backends.refused_characters(declared.backend, post.request.email)
    if refused:
        if wants_html(request, default=False):
            return again({hosted.EMAIL: t("form.error.email_refused_by_list", characters=refused)})
        _refuse_what_the_list_cannot_hold(post.request.email, declared)
    await _require_proof_of_work(post.request, settings, database, slug=slug)
    await _subscribe(
        request,
        database,
        settings,
        limiter,
        slug,
        post.request,
        source="form",
        shown_consent_version=hosted.shown_consent_version(form),
    )
    return _thanks_redirect(settings, mailing_list, post.request.locale or locale)


def _robot_screen(
    form: dict[str, str], settings: Settings, declared: ListSettings, *, slug: str
) -> formguard.Verdict:
    """The form's honeypot and fill-time stamp (app/formguard.py), with this list's rules."""
    return formguard.screen(
        form,
        key=settings.token_key(),
        now=utcnow(),
        min_fill_time=settings.form_min_fill_time,
        max_age=settings.form_max_age,
        require_stamp=declared.require_form_stamp,
        list_slug=slug,
    )


def _refuse_bad_fields(problems: list[forms.FieldProblem]) -> None:
    """The list's declared fields are checked for every caller; 422 as any bad payload."""
    if problems:
        raise RequestValidationError(
            [
                {
                    "loc": ("body", "attributes", problem.field.name),
                    "msg": problem.text(),
                    "type": f"field_{problem.problem.value}",
                }
                for problem in problems
            ]
        )


def _refuse_what_the_list_cannot_hold(email: str, declared: ListSettings) -> None:
    """422 for an address the list's backend would refuse (Mailman takes fewer than this
    service does): said now rather than after a confirmation that could never be mailed."""
    refusal = backends.refusal(declared.backend, _stored(email))
    if refusal is not None:
        raise RequestValidationError(
            [
                {
                    "loc": ("body", "email"),
                    "msg": refusal,
                    "type": "address_refused_by_list",
                    "input": email,
                }
            ]
        )


def _stored(email: str) -> str:
    """A valid address as typed, as it is stored and reaches the backend: without the spaces
    around it, which a backend's check would otherwise count as characters of the address."""
    return addresses.parse(email, new=True).email


async def _subscribe(
    request: Request,
    database: DatabaseDep,
    settings: Settings,
    limiter: RateLimiterDep,
    slug: str,
    body: SubscriptionRequest,
    *,
    source: str,
    shown_consent_version: str | None = None,
) -> MailingList:
    return await database.write(
        subscriptions.subscribe,
        list_slug=slug,
        address=addresses.parse(body.email, new=True),
        locale=body.locale,
        fallback_locale=preferred(request.headers.get("accept-language")),
        attributes=body.attributes,
        evidence=evidence(request, settings, source=source),
        key=settings.token_key(),
        now=utcnow(),
        resend_interval=settings.resend_interval,
        mail_budget=limiter.allow_mail,
        shown_consent_version=shown_consent_version,
    )


def _thanks_redirect(settings: Settings, mailing_list: MailingList, locale: Locale) -> Response:
    target = mailing_list.thank_you_url or settings.public_link(
        f"/v1/lists/{mailing_list.slug}/thanks?lang={locale.value}"
    )
    return RedirectResponse(target, status_code=303)


def _subscribe_page(
    request: Request,
    settings: Settings,
    mailing_list: MailingList,
    declared: ListSettings,
    *,
    locale: Locale,
    values: dict[str, str] | None = None,
    errors: dict[str, str] | None = None,
    notice: str | None = None,
) -> Response:
    """The subscription form; sent back (422) with field errors, or with a notice to press
    again for a post that came too soon or too late after the page (app/formguard.py)."""
    sent_back = bool(errors) or notice is not None
    chrome = views.chrome(
        request,
        settings,
        locale=locale,
        declared=declared,
        list_name=mailing_list.name,
        switch_path=f"/v1/lists/{mailing_list.slug}",
    )
    form = hosted.form_view(
        mailing_list=mailing_list,
        list_settings=declared,
        t=chrome.t,
        # The page's language in the URL too: a page answering the post before its body is
        # read (too many requests, another site's origin...) is then in the same language.
        action=settings.public_link(
            f"/v1/lists/{mailing_list.slug}/subscriptions?lang={locale.value}"
        ),
        stamp=views.page_stamp(settings, filled_before=sent_back),
        values=values,
        errors=errors,
        notice=notice,
    )
    page = pages.render_subscribe(chrome=chrome, form=form, status_code=422 if sent_back else 200)
    views.kept_for_back(page)
    return views.lead_form_to(page, request, url=mailing_list.thank_you_url)


@router.get(
    "/lists/{slug}",
    operation_id="subscription_page",
    responses={
        **_html_and_json("The hosted subscription form (HTML, works without JavaScript)."),
        **LIST_PAGE_ERRORS,
    },
)
async def subscription_page(
    slug: str, request: Request, database: DatabaseDep, settings: SettingsDep
) -> Response:
    """The list's own subscription page: address, the list's fields, the consent wording."""
    mailing_list = await database.run(lists.get, slug=slug)
    declared = views.list_settings(settings, slug=slug, name=mailing_list.name)
    locale = request_locale(request, default=Locale(mailing_list.default_locale))
    return _subscribe_page(request, settings, mailing_list, declared, locale=locale)


@router.get(
    "/lists/{slug}/thanks",
    operation_id="subscription_thanks_page",
    responses={
        **_html_and_json("The 'check your inbox' page."),
        **LIST_PAGE_ERRORS,
    },
)
async def thanks_page(
    slug: str, request: Request, database: DatabaseDep, settings: SettingsDep
) -> Response:
    """The page a form post lands on: check your inbox."""
    mailing_list = await database.run(lists.get, slug=slug)
    return _list_page(request, settings, mailing_list, page="thanks")


@router.get(
    "/lists/{slug}/confirmed",
    operation_id="subscription_confirmed_page",
    responses={
        **_html_and_json("The 'subscription confirmed' page (the result page's other language)."),
        **LIST_PAGE_ERRORS,
    },
)
async def confirmed_page(
    slug: str, request: Request, database: DatabaseDep, settings: SettingsDep
) -> Response:
    """What the confirm button's answer says, as a page of its own (changes nothing)."""
    mailing_list = await database.run(lists.get, slug=slug)
    return _list_page(request, settings, mailing_list, page="confirmed")


@router.get(
    "/lists/{slug}/unsubscribed",
    operation_id="unsubscribed_page",
    responses={
        **_html_and_json("The 'you are unsubscribed' page (the result page's other language)."),
        **LIST_PAGE_ERRORS,
    },
)
async def unsubscribed_page(
    slug: str, request: Request, database: DatabaseDep, settings: SettingsDep
) -> Response:
    """What the unsubscribe button's answer says, as a page of its own (changes nothing)."""
    mailing_list = await database.run(lists.get, slug=slug)
    return _list_page(request, settings, mailing_list, page="unsubscribed")


def _list_page(
    request: Request,
    settings: Settings,
    mailing_list: MailingList,
    *,
    page: str,
    locale: Locale | None = None,
    form: pages.Form | None = None,
    switch_path: str | None = None,
) -> Response:
    """A list's page `page.<page>.*`: an interstitial with its button, or a result with a
    way on (the site's landing page; after leaving, the hosted page to subscribe again)."""
    locale = locale or request_locale(request, default=Locale(mailing_list.default_locale))
    declared = views.list_settings(settings, slug=mailing_list.slug, name=mailing_list.name)
    chrome = views.chrome(
        request,
        settings,
        locale=locale,
        declared=declared,
        list_name=mailing_list.name,
        switch_path=switch_path,
    )
    t = chrome.t
    subscribe_url = None
    if page == "unsubscribed":
        subscribe_url = f"/v1/lists/{mailing_list.slug}?lang={locale.value}"
    return pages.render(
        chrome=chrome,
        title=t(f"page.{page}.title"),
        text=t(f"page.{page}.text", list=mailing_list.name),
        form=form,
        back_url=None if form else mailing_list.landing_url,
        subscribe_url=subscribe_url,
    )


@router.get(
    "/lists/{slug}/unsubscribe",
    operation_id="unsubscribe_request_page",
    responses={
        **_html_and_json("The page to ask for an unsubscribe link by address (HTML)."),
        **LIST_PAGE_ERRORS,
    },
)
async def unsubscribe_request_page(
    slug: str, request: Request, database: DatabaseDep, settings: SettingsDep
) -> Response:
    """The list's page to ask for an unsubscribe link, for a visitor who lost theirs."""
    mailing_list = await database.run(lists.get, slug=slug)
    locale = request_locale(request, default=Locale(mailing_list.default_locale))
    return _unsubscribe_request_page(request, settings, mailing_list, locale=locale)


@router.get(
    "/lists/{slug}/unsubscribe/sent",
    operation_id="unsubscribe_sent_page",
    responses={
        **_html_and_json("The 'check your inbox' page after asking for an unsubscribe link."),
        **LIST_PAGE_ERRORS,
    },
)
async def unsubscribe_sent_page(
    slug: str, request: Request, database: DatabaseDep, settings: SettingsDep
) -> Response:
    """The page the unsubscribe form's post lands on: check your inbox."""
    mailing_list = await database.run(lists.get, slug=slug)
    return _list_page(request, settings, mailing_list, page="unsubscribe_sent")


def _unsubscribe_request_page(
    request: Request,
    settings: Settings,
    mailing_list: MailingList,
    *,
    locale: Locale,
    value: str = "",
    error: str | None = None,
    notice: str | None = None,
) -> Response:
    """The page to ask for an unsubscribe link; sent back (422) with the address's error,
    or with a notice to press again (as the subscription form, `_subscribe_page`)."""
    sent_back = error is not None or notice is not None
    declared = views.list_settings(settings, slug=mailing_list.slug, name=mailing_list.name)
    chrome = views.chrome(
        request,
        settings,
        locale=locale,
        declared=declared,
        list_name=mailing_list.name,
        switch_path=f"/v1/lists/{mailing_list.slug}/unsubscribe",
    )
    form = unsubscribe_form.form_view(
        mailing_list=mailing_list,
        t=chrome.t,
        # In the page's language, as the subscription page's (see `_subscribe_page`).
        action=settings.public_link(
            f"/v1/lists/{mailing_list.slug}/unsubscriptions?lang={locale.value}"
        ),
        stamp=views.page_stamp(settings, filled_before=sent_back),
        value=value,
        error=error,
        notice=notice,
    )
    page = pages.render_unsubscribe_request(
        chrome=chrome, form=form, status_code=422 if sent_back else 200
    )
    return views.kept_for_back(page)


def _unsubscribe_sent_redirect(
    settings: Settings, mailing_list: MailingList, locale: Locale
) -> Response:
    return RedirectResponse(
        settings.public_link(f"/v1/lists/{mailing_list.slug}/unsubscribe/sent?lang={locale.value}"),
        status_code=303,
    )


@router.post(
    "/lists/{slug}/unsubscriptions",
    operation_id="request_unsubscribe",
    status_code=202,
    response_model=Accepted,
    responses={
        303: {"description": "A form post: go to the list's 'check your inbox' page."},
        **errors.responses(
            errors.ListNotFound,
            errors.InvalidBody,
            errors.UnsupportedMediaType,
            errors.CompressedBody,
            errors.PayloadTooLarge,
            *FORM_ERRORS,
            *POW_ERRORS,
            html=True,
        ),
    },
    openapi_extra=_body_doc(UnsubscriptionRequest),
)
async def request_unsubscribe(slug: str, request: Request) -> Response:
    """Ask for an unsubscribe link by address; same answer whatever the address's state.

    A form post goes on (303) to the list's 'check your inbox' page; one that a robot made
    (honeypot filled, stamp forged) gets the same and is dropped. A browser's form post
    with a bad address, or sent sooner or later than the page's stamp allows, gets the page
    back (422) and nothing is done until it is sent again.
    """
    services = await screen_client(request)
    submission = await unsubscription_submission(request)
    settings, database, limiter = services.settings, services.database, services.limiter
    if submission.form is None:
        assert submission.body is not None
        await _require_proof_of_work(submission.body, settings, database, slug=slug)
        await _request_unsubscribe(
            request, database, settings, limiter, slug, submission.body, source="api"
        )
        return _accepted(UNSUBSCRIBE_ACCEPTED_BODY)

    form = submission.form
    mailing_list = await database.run(lists.get, slug=slug)
    declared = views.list_settings(settings, slug=slug, name=mailing_list.name)
    locale = parse_locale(form.get("locale")) or request_locale(
        request, default=Locale(mailing_list.default_locale)
    )
    verdict = _robot_screen(form, settings, declared, slug=slug)
    t = for_list(locale, declared)

    def again(**message: str) -> Response:
        """The page back with what was typed, and the `error` or `notice` why."""
        return _unsubscribe_request_page(
            request,
            settings,
            mailing_list,
            locale=locale,
            value=form.get(unsubscribe_form.EMAIL, ""),
            **message,
        )

    if verdict in formguard.SENT_BACK and wants_html(request, default=False):
        return again(
            notice=t("form.notice.send_again", button=t("page.unsubscribe_request.button"))
        )
    if verdict != formguard.Verdict.ACCEPTED:
        return _unsubscribe_sent_redirect(settings, mailing_list, locale)
    post = unsubscribe_form.read_post(form, t=t)
    if post.request is None:
        if post.error is not None and wants_html(request, default=False):
            return again(error=post.error)
        assert post.invalid is not None
        raise RequestValidationError(post.invalid.errors(include_url=False, include_context=False))
    await _require_proof_of_work(post.request, settings, database, slug=slug)
    await _request_unsubscribe(
        request, database, settings, limiter, slug, post.request, source="form"
    )
    return _unsubscribe_sent_redirect(settings, mailing_list, locale)


async def _request_unsubscribe(
    request: Request,
    database: DatabaseDep,
    settings: Settings,
    limiter: RateLimiterDep,
    slug: str,
    body: UnsubscriptionRequest,
    *,
    source: str,
) -> MailingList:
    return await database.write(
        subscriptions.request_unsubscribe,
        list_slug=slug,
        address=addresses.parse(body.email, new=False),
        evidence=evidence(request, settings, source=source),
        key=settings.token_key(),
        now=utcnow(),
        resend_interval=settings.resend_interval,
        mail_budget=limiter.allow_mail,
    )


def _page_locale(request: Request, stored: str) -> Locale:
    return parse_locale(request.query_params.get("lang")) or Locale(stored)


def _result(target: subscriptions.Target) -> Response:
    body = _result_body(target.subscription.status, target.mailing_list.slug)
    return Response(body, media_type=JSON)


@functools.lru_cache(maxsize=64)
def _result_body(status: str, slug: str) -> bytes:
    """A link's JSON answer: a few statuses for each list, each written once."""
    return _json_body(ActionResult(status=status, list=slug))


def _page(
    request: Request,
    settings: Settings,
    target: subscriptions.Target,
    *,
    page: str,
    form_action: str | None = None,
) -> Response:
    """The page for a link (`page.<page>.title` / `.text` / `.button` in the catalogue)."""
    if not wants_html(request, default=True):
        return _result(target)
    mailing_list = target.mailing_list
    locale = _page_locale(request, target.subscription.locale)
    if form_action is None:
        return _result_page(request, settings, mailing_list, page=page, locale=locale)
    declared = views.list_settings(settings, slug=mailing_list.slug, name=mailing_list.name)
    t = for_list(locale, declared)
    # The button's answer in the page's language: one who switched the page to the other
    # language read the result in the subscriber's stored one.
    action = pages.with_lang(form_action, "", locale)
    form = pages.Form(action=action, button=t(f"page.{page}.button"))
    return _list_page(request, settings, mailing_list, page=page, locale=locale, form=form)


# A button's result page is the same for everyone on a list in one language: each is
# rendered once (a confirmation's Jinja page cost about a tenth of its CPU). By everything
# the page shows of the list, so one renamed through the admin API gets a fresh page.
_RESULT_PAGES_KEPT = 256


def _result_page(
    request: Request, settings: Settings, mailing_list: MailingList, *, page: str, locale: Locale
) -> Response:
    """The page after a link's button (confirmed, unsubscribed). Its other language is the
    list's own page of that result, not the link's."""
    key = (page, locale, mailing_list.slug, mailing_list.name, mailing_list.landing_url)
    kept: dict[tuple[str | None, ...], bytes] = request.app.state.result_pages
    body = kept.get(key)
    if body is None:
        switch_path = f"/v1/lists/{mailing_list.slug}/{page}"
        rendered = _list_page(
            request, settings, mailing_list, page=page, locale=locale, switch_path=switch_path
        )
        if len(kept) >= _RESULT_PAGES_KEPT:
            kept.clear()
        body = kept[key] = bytes(rendered.body)
    return HTMLResponse(body)


TOKEN_ERRORS = errors.responses(
    errors.TokenNotFound, errors.TokenExpired, errors.TokenUsed, html=True
)
TOKEN_POST_ERRORS = errors.responses(
    errors.TokenNotFound, errors.TokenExpired, errors.TokenUsed, *FORM_ERRORS, html=True
)


@router.get(
    "/confirm/{token}",
    operation_id="confirm_page",
    response_model=ActionResult,
    responses={**_html_and_json("A page with one button that confirms."), **TOKEN_ERRORS},
)
async def confirm_page(
    token: str, request: Request, database: DatabaseDep, settings: SettingsDep
) -> Response:
    """Show the confirmation button. Changes nothing: mail scanners follow links."""
    secret = tokens.from_link(token)
    target = await database.run(subscriptions.confirmation_target, secret=secret, now=utcnow())
    return _page(
        request,
        settings,
        target,
        page="confirm",
        form_action=settings.public_link(f"/v1/confirm/{secret}"),
    )


@router.post(
    "/confirm/{token}",
    operation_id="confirm",
    response_model=ActionResult,
    responses={**_html_and_json("The subscription is confirmed."), **TOKEN_POST_ERRORS},
)
async def confirm(token: str, request: Request) -> Response:
    """Confirm a subscription (the button on the confirmation page)."""
    services = await screen_client(request)
    settings = services.settings
    target = await services.database.write(
        subscriptions.confirm,
        secret=tokens.from_link(token),
        evidence=evidence(request, settings, source="link"),
        key=settings.token_key(),
        now=utcnow(),
    )
    return _page(request, settings, target, page="confirmed")


@router.get(
    "/unsubscribe/{token}",
    operation_id="unsubscribe_page",
    response_model=ActionResult,
    responses={**_html_and_json("A page with one button that unsubscribes."), **TOKEN_ERRORS},
)
async def unsubscribe_page(
    token: str, request: Request, database: DatabaseDep, settings: SettingsDep
) -> Response:
    """Show the unsubscribe button. Changes nothing: mail scanners follow links."""
    secret = tokens.from_link(token)
    target = await database.run(subscriptions.unsubscription_target, secret=secret, now=utcnow())
    return _page(
        request,
        settings,
        target,
        page="unsubscribe",
        form_action=settings.public_link(f"/v1/unsubscribe/{secret}"),
    )


@router.post(
    "/unsubscribe/{token}",
    operation_id="unsubscribe",
    response_model=ActionResult,
    responses={**_html_and_json("The address is unsubscribed."), **TOKEN_POST_ERRORS},
)
async def unsubscribe(token: str, request: Request) -> Response:
    """Unsubscribe (the page's button, or an RFC 8058 one-click POST: 200, no redirect)."""
    is_one_click = await one_click(request)
    # Mail providers send RFC 8058 one-click POSTs for many subscribers from few addresses,
    # with whatever Origin their systems set; refusing one would keep someone subscribed
    # who asked to leave. The token in the URL guards it.
    services = services_of(request) if is_one_click else await screen_client(request)
    settings = services.settings
    target = await services.database.write(
        subscriptions.unsubscribe,
        secret=tokens.from_link(token),
        evidence=evidence(request, settings, source="one_click" if is_one_click else "link"),
        now=utcnow(),
        # A mail client's one-click POST is not a person waiting for a goodbye mail.
        send_goodbye=not is_one_click,
    )
    return _page(request, settings, target, page="unsubscribed")
