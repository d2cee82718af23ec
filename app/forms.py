"""A list's own form fields (`ListSettings.fields`): reading them from a post and checking
them. The answers name a problem by code, so the hosted page can say it in the visitor's
language and a JSON caller gets the usual validation error."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

from app import addresses
from app.config import FieldType, FormField
from app.i18n import Translator

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Problem(StrEnum):
    REQUIRED = "required"
    TOO_LONG = "too_long"
    INVALID_EMAIL = "invalid_email"
    INVALID_URL = "invalid_url"
    CONTROL_CHARACTERS = "control_characters"


# What a JSON caller reads in `{"error": "validation_error", "detail": ...}`.
PROBLEM_TEXT = {
    Problem.REQUIRED: "Field required",
    Problem.TOO_LONG: "String should have at most {max} characters",
    Problem.INVALID_EMAIL: "not a valid email address",
    Problem.INVALID_URL: "not a valid http(s) URL",
    Problem.CONTROL_CHARACTERS: "must not contain control characters (line breaks, NUL, ...)",
}


@dataclass(frozen=True, slots=True)
class FieldProblem:
    field: FormField
    problem: Problem

    def text(self) -> str:
        return PROBLEM_TEXT[self.problem].replace("{max}", str(self.field.max_length))


def from_form(form: Mapping[str, str], fields: Sequence[FormField]) -> dict[str, str]:
    """The declared fields' values in a form post, trimmed; empty ones left out."""
    values = {}
    for field in fields:
        value = form.get(field.name, "").strip()
        if value:
            values[field.name] = value
    return values


def trimmed(attributes: Mapping[str, str], fields: Sequence[FormField]) -> dict[str, str]:
    """An API caller's attributes read as a form's are (`from_form`): the declared fields'
    values trimmed, blank ones left out, so "   " is no answer to a required field from
    either; attributes the list does not declare are kept as sent."""
    declared = {field.name for field in fields}
    values = {name: value for name, value in attributes.items() if name not in declared}
    values.update(from_form(attributes, fields))
    return values


def problem(field: FormField, value: str | None) -> Problem | None:
    """What is wrong with one field's value, as the form says it; None: nothing."""
    if not value:
        return Problem.REQUIRED if field.required else None
    if len(value) > field.max_length:
        return Problem.TOO_LONG
    if _CONTROL.search(value):
        return Problem.CONTROL_CHARACTERS
    if field.type == FieldType.EMAIL:
        try:
            addresses.parse(value, new=True)
        except addresses.InvalidAddress:
            return Problem.INVALID_EMAIL
    if field.type == FieldType.URL:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return Problem.INVALID_URL
    return None


def check(attributes: Mapping[str, str], fields: Sequence[FormField]) -> list[FieldProblem]:
    """What is wrong with the declared fields among `attributes`, in the form's order.

    Attributes the list does not declare are the API's business (app/schemas.py limits).
    """
    problems = []
    for field in fields:
        found = problem(field, attributes.get(field.name))
        if found is not None:
            problems.append(FieldProblem(field=field, problem=found))
    return problems


def email_message(typed: str, t: Translator) -> str:
    """What to say beside an address field whose value was refused: it is empty, it looks
    like an address pasted with something around it (then which one), or it is not one."""
    if not typed.strip():
        return t("form.error.email_missing")
    meant = addresses.suggestion(typed)
    if meant is not None:
        return t("form.error.email_did_you_mean", address=meant)
    return t("form.error.email_invalid")
