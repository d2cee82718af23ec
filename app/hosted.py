"""The hosted subscription page: what it shows for a list, and what a post of it means.

A post is read into a `SubscriptionRequest` (the API's own model) plus the list's declared
fields; what is wrong is said per field in the visitor's language, so the page can come
back with the values kept and each error tied to its input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import ValidationError

from app import consent, formguard, forms, pages, proofofwork
from app.config import MAX_CONSENT_VERSION, ListSettings, Locale
from app.i18n import Translator
from app.models import MailingList
from app.schemas import SubscriptionRequest, has_control_characters

EMAIL = "email"
CONSENT_VERSION = "consent_version"


@dataclass(slots=True)
class Post:
    """A form post of the subscription form, read."""

    request: SubscriptionRequest | None
    # Input name -> message, in the page's language (empty when all is well).
    errors: dict[str, str] = field(default_factory=dict)
    # The pydantic error when the post is not a valid request (for a JSON-minded caller).
    invalid: ValidationError | None = None
    problems: list[forms.FieldProblem] = field(default_factory=list)


def read_post(form: Mapping[str, str], *, list_settings: ListSettings, t: Translator) -> Post:
    declared = list_settings.fields
    attributes = forms.from_form(form, declared)
    problems = forms.check(attributes, declared)
    data: dict[str, object] = {"attributes": attributes}
    if EMAIL in form:
        data[EMAIL] = form[EMAIL].strip()
    if form.get("locale"):
        data["locale"] = form["locale"]
    data.update(proofofwork.from_form(form))
    request: SubscriptionRequest | None = None
    invalid = None
    try:
        request = SubscriptionRequest.model_validate(data)
    except ValidationError as e:
        invalid = e
    messages: dict[str, str] = {}
    if invalid is not None and any(
        error["loc"][:1] == (EMAIL,) for error in invalid.errors(include_url=False)
    ):
        messages[EMAIL] = forms.email_message(form.get(EMAIL, ""), t)
    for problem in problems:
        label = problem.field.label_in(t.locale)
        messages[problem.field.name] = t(
            f"form.error.{problem.problem.value}", label=label, max=problem.field.max_length
        )
    return Post(
        request=request if not problems else None,
        errors=messages,
        invalid=invalid,
        problems=problems,
    )


def form_view(
    *,
    mailing_list: MailingList,
    list_settings: ListSettings,
    t: Translator,
    action: str,
    stamp: str,
    values: Mapping[str, str] | None = None,
    errors: Mapping[str, str] | None = None,
    notice: str | None = None,
) -> pages.SubscribeForm:
    """The form as the page shows it; after a post sent back, with its values and its
    errors or a notice."""
    values = values or {}
    errors = errors or {}
    locale: Locale = t.locale
    inputs = [
        pages.InputView(
            name=EMAIL,
            label=t("page.subscribe.email_label"),
            hint=t("page.subscribe.email_hint"),
            type="email",
            required=True,
            autocomplete="email",
            value=values.get(EMAIL, ""),
            error=errors.get(EMAIL),
        )
    ]
    for item in list_settings.fields:
        inputs.append(
            pages.InputView(
                name=item.name,
                label=item.label_in(locale),
                type=pages.input_type(item.type),
                required=item.required,
                autocomplete=item.autocomplete or "",
                value=values.get(item.name, ""),
                error=errors.get(item.name),
                max_length=item.max_length,
            )
        )
    return pages.SubscribeForm(
        action=action,
        list_name=mailing_list.name,
        consent_text=consent.wording(
            list_name=mailing_list.name, locale=locale, overrides=list_settings.consent_text
        ),
        consent_version=mailing_list.consent_version,
        inputs=inputs,
        hidden={
            "locale": locale.value,
            CONSENT_VERSION: mailing_list.consent_version,
            formguard.STAMP_FIELD: stamp,
        },
        honeypot_name=formguard.HONEYPOT_FIELD,
        unsubscribe_url=f"/v1/lists/{mailing_list.slug}/unsubscribe?lang={locale.value}",
        notice=notice,
    )


def shown_consent_version(form: Mapping[str, str]) -> str | None:
    """The consent version a post's page showed (its hidden field), for the ledger; None
    when the value cannot be a version (over 64 characters, or a control character): no
    page of ours wrote it. A NUL recorded there made the subscriber's proof of consent fail
    on PostgreSQL, which refuses a NUL in the text of a query."""
    value = form.get(CONSENT_VERSION, "")
    if not value or len(value) > MAX_CONSENT_VERSION or has_control_characters(value):
        return None
    return value
