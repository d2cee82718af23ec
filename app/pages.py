"""Server-rendered pages (no JavaScript): the interstitials behind mail links and results."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import jinja2
from starlette.responses import HTMLResponse

from app.config import Locale
from app.i18n import Translator

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates" / "pages"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


@dataclass(frozen=True, slots=True)
class Form:
    action: str
    button: str
    # Ask for an address (the "send me a new link" form); otherwise a lone button.
    ask_email: bool = False
    email_label: str = ""
    hidden: dict[str, str] = field(default_factory=dict)


def render(
    *,
    locale: Locale,
    title: str,
    text: str,
    status_code: int = 200,
    form: Form | None = None,
    back_url: str | None = None,
) -> HTMLResponse:
    t = Translator(locale)
    html = _env.get_template("page.html").render(
        lang=locale.value, title=title, text=text, form=form, back_url=back_url, t=t
    )
    return HTMLResponse(html, status_code=status_code)
