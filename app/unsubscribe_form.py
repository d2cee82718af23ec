"""The hosted page that asks for an unsubscribe link by address: what it shows for a list,
and what a post of it means.

For a visitor who lost the link of their mails. The post goes to the same endpoint as a
JSON caller's (`POST /v1/lists/{list}/unsubscriptions`); a form post of it is read into the
API's `UnsubscriptionRequest`, with the address's problem said in the visitor's language so
the page can come back with the value kept and the error tied to its input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import ValidationError

from app import formguard, pages, proofofwork
from app.forms import email_message
from app.i18n import Translator
from app.models import MailingList
from app.schemas import UnsubscriptionRequest

EMAIL = "email"


@dataclass(frozen=True, slots=True)
class Post:
    """A form post of the unsubscribe page, read."""

    request: UnsubscriptionRequest | None
    # The address's problem in the page's language (None when the address is fine, even if
    # another field, such as a malformed `pow_nonce`, is not).
    error: str | None = None
    # The pydantic error when the post is not a valid request (for a JSON-minded caller).
    invalid: ValidationError | None = None


def read_post(form: Mapping[str, str], *, t: Translator) -> Post:
    data: dict[str, object] = {}
    if EMAIL in form:
        # What a browser sends as typed, trailing space included (as on the subscription page).
        data[EMAIL] = form[EMAIL].strip()
    data.update(proofofwork.from_form(form))
    try:
        return Post(request=UnsubscriptionRequest.model_validate(data))
    except ValidationError as e:
        if not any(error["loc"][:1] == (EMAIL,) for error in e.errors(include_url=False)):
            # Not the visitor's typing (the page's hidden fields, or a robot's): the
            # generic error path, as on the subscription page, not "address invalid".
            return Post(request=None, invalid=e)
        return Post(request=None, error=email_message(form.get(EMAIL, ""), t), invalid=e)


def form_view(
    *,
    mailing_list: MailingList,
    t: Translator,
    action: str,
    stamp: str,
    value: str = "",
    error: str | None = None,
    notice: str | None = None,
) -> pages.UnsubscribeRequestForm:
    """The form as the page shows it; after a post sent back, with the address and its
    error or a notice."""
    return pages.UnsubscribeRequestForm(
        action=action,
        list_name=mailing_list.name,
        email=pages.InputView(
            name=EMAIL,
            label=t("page.unsubscribe_request.email_label"),
            hint=t("page.unsubscribe_request.email_hint"),
            type="email",
            required=True,
            autocomplete="email",
            value=value,
            error=error,
        ),
        hidden={"locale": t.locale.value, formguard.STAMP_FIELD: stamp},
        honeypot_name=formguard.HONEYPOT_FIELD,
        notice=notice,
    )
