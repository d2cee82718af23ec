"""Settings from `NEWSLETTER_*` variables: bad values fail at start, naming the variable."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import certifi
import pytest

from app.config import (
    MIN_SECRET_KEY_LENGTH,
    Locale,
    MailmanBackendSettings,
    Settings,
    SettingsError,
    SmtpMailerSettings,
    known_variables,
    load_settings,
)

NEWSLETTER_CLI = Path(sys.executable).parent / "newsletter"
README = Path(__file__).parent.parent / "README.md"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No NEWSLETTER_* variable from the surrounding shell; no file written in the repo."""
    for name in list(os.environ):
        if name.startswith("NEWSLETTER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def settings_error() -> str:
    with pytest.raises(SettingsError) as raised:
        load_settings()
    message = str(raised.value)
    assert message.startswith("invalid settings:")
    return message


def lists(*items: dict[str, object]) -> str:
    return json.dumps(list(items))


class TestBadValues:
    def test_a_database_url_of_another_kind_names_the_variable_and_the_scheme(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_DATABASE_URL", "mysql://root@127.0.0.1/newsletter")
        message = settings_error()
        assert "NEWSLETTER_DATABASE_URL:" in message
        assert "'mysql'" in message
        assert "postgresql+psycopg://" in message

    @pytest.mark.parametrize(
        ("variable", "value"),
        [
            ("NEWSLETTER_RESEND_INTERVAL", "-5m"),
            ("NEWSLETTER_FORM_MIN_FILL_TIME", "-3s"),
            ("NEWSLETTER_RETRY_BASE_DELAY", "-PT30S"),
            ("NEWSLETTER_RETRY_MAX_DELAY", "-1.5h"),
            ("NEWSLETTER_SHUTDOWN_TIMEOUT", "-20"),
        ],
    )
    def test_a_negative_duration_is_refused_as_negative(
        self, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
    ) -> None:
        monkeypatch.setenv(variable, value)
        message = settings_error()
        assert f"{variable}: durations must not be negative" in message

    @pytest.mark.parametrize(
        ("variable", "value"),
        [
            # Accepted, this one failed every subscription later (now - interval < year 1).
            ("NEWSLETTER_RESEND_INTERVAL", "999999999d"),
            ("NEWSLETTER_RESEND_INTERVAL", "P999999999D"),
            # These stopped the start with a traceback (OverflowError).
            ("NEWSLETTER_RETENTION_PENDING", "99999999999d"),
            ("NEWSLETTER_FORM_MAX_AGE", "99999999999999999999s"),
            ("NEWSLETTER_RETENTION_INTERVAL", "36501d"),
        ],
    )
    def test_a_duration_beyond_a_century_is_refused_naming_the_variable(
        self, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
    ) -> None:
        monkeypatch.setenv(variable, value)
        message = settings_error()
        assert f"{variable}: durations may not exceed 36500d" in message

    def test_a_lists_confirm_ttl_beyond_a_century_is_refused(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv(
            "NEWSLETTER_LISTS",
            lists({"slug": "bluehats", "name": "A", "confirm_ttl": "99999999999d"}),
        )
        message = settings_error()
        assert "NEWSLETTER_LISTS[0].confirm_ttl: durations may not exceed" in message

    @pytest.mark.parametrize(
        ("variable", "value"),
        [
            # A zero lease is taken back at once: every job runs on several workers.
            ("NEWSLETTER_JOB_LEASE", "0"),
            ("NEWSLETTER_JOB_LEASE", "-90"),
            ("NEWSLETTER_WORKER_HEARTBEAT_TIMEOUT", "0s"),
            ("NEWSLETTER_FORM_MAX_AGE", "0"),
            ("NEWSLETTER_PROOF_OF_WORK_TTL", "0m"),
            # Every request would be cut before its first byte.
            ("NEWSLETTER_CLIENT_TIMEOUT", "0"),
        ],
    )
    def test_a_duration_that_must_be_positive_is_refused_at_zero_or_less(
        self, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
    ) -> None:
        monkeypatch.setenv(variable, value)
        message = settings_error()
        field = variable.removeprefix("NEWSLETTER_").lower()
        assert f"{variable}: {field} must be positive" in message

    @pytest.mark.parametrize(
        "variable", ["NEWSLETTER_RECONCILE_INTERVAL", "NEWSLETTER_RETENTION_INTERVAL"]
    )
    @pytest.mark.parametrize("value", ["0", "0s", "-5m", "-PT1H"])
    def test_a_periodic_task_at_zero_or_less_is_refused_pointing_at_off(
        self, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
    ) -> None:
        # At 0 a worker ran 500 reconciliations in ten seconds.
        monkeypatch.setenv(variable, value)
        message = settings_error()
        assert f"{variable}: " in message
        assert "must be positive (use 'off' to turn it off)" in message

    def test_a_retry_base_delay_above_the_max_delay_names_both(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_RETRY_BASE_DELAY", "2h")
        monkeypatch.setenv("NEWSLETTER_RETRY_MAX_DELAY", "1s")
        message = settings_error()
        assert "NEWSLETTER_RETRY_BASE_DELAY (2:00:00) must not exceed" in message
        assert "NEWSLETTER_RETRY_MAX_DELAY (0:00:01)" in message

    def test_a_job_lease_shorter_than_two_smtp_timeouts_names_both_variables(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_MAILER__KIND", "smtp")
        monkeypatch.setenv("NEWSLETTER_MAILER__HOST", "smtp.example.org")
        monkeypatch.setenv("NEWSLETTER_MAILER__TIMEOUT", "30")
        monkeypatch.setenv("NEWSLETTER_JOB_LEASE", "45s")
        message = settings_error()
        assert "NEWSLETTER_JOB_LEASE (0:00:45) must be at least twice" in message
        assert "NEWSLETTER_MAILER__TIMEOUT (30s)" in message

    def test_a_job_lease_shorter_than_two_backend_timeouts_names_both_variables(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        backend = {"kind": "mailgun", "list_address": "bluehats@mail.example.org", "api_key": "k"}
        monkeypatch.setenv(
            "NEWSLETTER_LISTS", lists({"slug": "bluehats", "name": "B", "backend": backend})
        )
        monkeypatch.setenv("NEWSLETTER_BACKEND_TIMEOUT", "30")
        monkeypatch.setenv("NEWSLETTER_JOB_LEASE", "45s")
        message = settings_error()
        assert "NEWSLETTER_JOB_LEASE (0:00:45) must be at least twice" in message
        assert "NEWSLETTER_BACKEND_TIMEOUT (30s)" in message

    def test_the_backend_timeout_does_not_bind_the_lease_without_a_backend_to_call(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_BACKEND_TIMEOUT", "30")
        monkeypatch.setenv("NEWSLETTER_JOB_LEASE", "45s")
        assert load_settings().job_lease == timedelta(seconds=45)

    @pytest.mark.parametrize(
        ("content", "reason"),
        [
            (None, "cannot be read (No such file or directory)"),
            ("not a certificate\n", "holds no PEM certificate"),
            ("", "holds no PEM certificate"),
        ],
    )
    def test_an_smtp_ca_file_that_is_no_readable_certificate_is_refused(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: str | None, reason: str
    ) -> None:
        # Accepted, every mail failed with FileNotFoundError and was retried for hours.
        path = tmp_path / "private-ca.pem"
        if content is not None:
            path.write_text(content)
        monkeypatch.setenv("NEWSLETTER_MAILER__KIND", "smtp")
        monkeypatch.setenv("NEWSLETTER_MAILER__HOST", "smtp.example.org")
        monkeypatch.setenv("NEWSLETTER_MAILER__CA_FILE", str(path))
        message = settings_error()
        assert f"NEWSLETTER_MAILER__CA_FILE: {path} {reason}" in message

    @pytest.mark.parametrize(
        ("variables", "named", "reason"),
        [
            # Taken as a token no scraper can send: every scrape got 401, loopback's too.
            ({"NEWSLETTER_METRICS_TOKEN": ""}, "NEWSLETTER_METRICS_TOKEN", "or leave it unset"),
            # Taken as credentials: every send tried to log in with them, retried for ever.
            (
                {"NEWSLETTER_MAILER__USERNAME": "", "NEWSLETTER_MAILER__PASSWORD": ""},
                "NEWSLETTER_MAILER__USERNAME",
                "or leave both unset",
            ),
            (
                {"NEWSLETTER_MAILER__USERNAME": "bluehats", "NEWSLETTER_MAILER__PASSWORD": ""},
                "NEWSLETTER_MAILER__PASSWORD",
                "or leave both unset",
            ),
            # Read as the current directory: ". cannot be read (Is a directory)".
            ({"NEWSLETTER_MAILER__CA_FILE": ""}, "NEWSLETTER_MAILER__CA_FILE", "or leave it unset"),
        ],
    )
    def test_an_empty_optional_secret_or_path_is_refused_pointing_at_unset(
        self, monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], named: str, reason: str
    ) -> None:
        # An environment file's template line left blank (`NEWSLETTER_METRICS_TOKEN=`).
        monkeypatch.setenv("NEWSLETTER_MAILER__KIND", "smtp")
        monkeypatch.setenv("NEWSLETTER_MAILER__HOST", "smtp.example.org")
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        message = settings_error()
        assert f"{named}: is empty: " in message
        assert reason in message

    def test_a_duration_that_is_not_one_names_the_variable(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_RESEND_INTERVAL", "2 hours")
        message = settings_error()
        # Not pydantic's "Input should be a valid timedelta, invalid digit in duration".
        assert (
            "NEWSLETTER_RESEND_INTERVAL: '2 hours' is not a duration; give seconds "
            "(90) or a number with its unit: 90s, 5m, 48h, 7d"
        ) in message

    def test_off_for_a_duration_that_cannot_be_off_says_so(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_RESEND_INTERVAL", "off")
        message = settings_error()
        assert "NEWSLETTER_RESEND_INTERVAL: cannot be off; give seconds" in message

    def test_an_unknown_mailer_kind_lists_the_known_ones(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_MAILER__KIND", "sendgrid")
        message = settings_error()
        assert message == (
            "invalid settings:\n  NEWSLETTER_MAILER__KIND: 'sendgrid' is not one of 'file', 'smtp'"
        )

    def test_an_unknown_backend_kind_names_the_kind_in_the_list(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv(
            "NEWSLETTER_LISTS",
            lists({"slug": "bluehats", "name": "BlueHats", "backend": {"kind": "mailchimp"}}),
        )
        message = settings_error()
        assert message == (
            "invalid settings:\n  NEWSLETTER_LISTS[0].backend.kind: 'mailchimp' is not one of "
            "'none', 'mailgun', 'mailman', 'listmonk'"
        )

    def test_an_smtp_username_without_a_password_is_refused(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_MAILER__KIND", "smtp")
        monkeypatch.setenv("NEWSLETTER_MAILER__HOST", "smtp.example.org")
        monkeypatch.setenv("NEWSLETTER_MAILER__USERNAME", "bluehats")
        message = settings_error()
        assert "NEWSLETTER_MAILER: SMTP username and password" in message
        # The union's tag is no variable anyone could set.
        assert "NEWSLETTER_MAILER__SMTP" not in message

    def test_a_password_that_would_go_in_clear_to_a_distant_relay_is_refused(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # smtplib logged in without TLS as readily as with it.
        monkeypatch.setenv("NEWSLETTER_MAILER__KIND", "smtp")
        monkeypatch.setenv("NEWSLETTER_MAILER__HOST", "smtp.example.org")
        monkeypatch.setenv("NEWSLETTER_MAILER__SECURITY", "none")
        monkeypatch.setenv("NEWSLETTER_MAILER__USERNAME", "bluehats")
        monkeypatch.setenv("NEWSLETTER_MAILER__PASSWORD", "s3cret-pass")
        message = settings_error()
        assert (
            "NEWSLETTER_MAILER: NEWSLETTER_MAILER__SECURITY=none would send the "
            "SMTP user name and password in clear to smtp.example.org: use starttls or ssl, or"
        ) in message
        assert "NEWSLETTER_MAILER__ALLOW_CLEARTEXT_AUTH=true" in message
        assert "s3cret-pass" not in message

    @pytest.mark.parametrize(
        ("host", "allow"),
        [
            ("127.0.0.1", None),
            ("::1", None),
            ("localhost", None),
            ("relay.localhost", None),
            ("smtp.example.org", "true"),
        ],
    )
    def test_a_password_in_clear_is_taken_to_loopback_or_when_allowed(
        self, monkeypatch: pytest.MonkeyPatch, host: str, allow: str | None
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_MAILER__KIND", "smtp")
        monkeypatch.setenv("NEWSLETTER_MAILER__HOST", host)
        monkeypatch.setenv("NEWSLETTER_MAILER__SECURITY", "none")
        monkeypatch.setenv("NEWSLETTER_MAILER__USERNAME", "bluehats")
        monkeypatch.setenv("NEWSLETTER_MAILER__PASSWORD", "s3cret-pass")
        if allow is not None:
            monkeypatch.setenv("NEWSLETTER_MAILER__ALLOW_CLEARTEXT_AUTH", allow)
        mailer = load_settings().mailer
        assert isinstance(mailer, SmtpMailerSettings)
        assert mailer.username == "bluehats"

    @pytest.mark.parametrize(
        ("variable", "username", "password"),
        [
            ("NEWSLETTER_MAILER__PASSWORD", "bluehats", "s3cré t p@ss"),
            ("NEWSLETTER_MAILER__USERNAME", "équipe-bluehats", "s3cret"),
        ],
    )
    def test_smtp_credentials_beyond_ascii_are_refused_without_showing_them(
        self, monkeypatch: pytest.MonkeyPatch, variable: str, username: str, password: str
    ) -> None:
        # smtplib would raise UnicodeEncodeError at every send's AUTH.
        monkeypatch.setenv("NEWSLETTER_MAILER__KIND", "smtp")
        monkeypatch.setenv("NEWSLETTER_MAILER__HOST", "smtp.example.org")
        monkeypatch.setenv("NEWSLETTER_MAILER__USERNAME", username)
        monkeypatch.setenv("NEWSLETTER_MAILER__PASSWORD", password)
        message = settings_error()
        assert f"{variable}: has letters beyond ASCII" in message
        assert message.count("\n  ") == 1  # the one variable
        assert password not in message
        assert username not in message

    def test_an_smtp_mailer_without_a_host_names_the_host_variable(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_MAILER__KIND", "smtp")
        message = settings_error()
        assert "NEWSLETTER_MAILER__HOST: Field required" in message

    @pytest.mark.parametrize(
        "host", ["smtp.example.org:587", "smtp://smtp.example.org", "smtp.example.org 587"]
    )
    def test_an_smtp_host_with_a_port_or_a_scheme_names_the_variables_to_use(
        self, monkeypatch: pytest.MonkeyPatch, host: str
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_MAILER__KIND", "smtp")
        monkeypatch.setenv("NEWSLETTER_MAILER__HOST", host)
        message = settings_error()
        assert (
            f"NEWSLETTER_MAILER__HOST: {host!r} is not a host name nor an IP "
            "address: give the host alone (smtp.example.gouv.fr), the port in "
            "NEWSLETTER_MAILER__PORT and TLS in NEWSLETTER_MAILER__SECURITY"
        ) in message

    @pytest.mark.parametrize("host", ["smtp.example.org", "127.0.0.1", "::1"])
    def test_an_smtp_host_name_or_address_is_taken(
        self, monkeypatch: pytest.MonkeyPatch, host: str
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_MAILER__KIND", "smtp")
        monkeypatch.setenv("NEWSLETTER_MAILER__HOST", host)
        mailer = Settings().mailer
        assert isinstance(mailer, SmtpMailerSettings)
        assert mailer.host == host

    def test_an_smtp_port_out_of_range_names_the_port_variable(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_MAILER__KIND", "smtp")
        monkeypatch.setenv("NEWSLETTER_MAILER__HOST", "smtp.example.org")
        monkeypatch.setenv("NEWSLETTER_MAILER__PORT", "99999")
        message = settings_error()
        assert "NEWSLETTER_MAILER__PORT:" in message
        assert "65535" in message

    @pytest.mark.parametrize(
        ("security", "port", "used"),
        [("ssl", None, 465), ("starttls", None, 587), ("none", None, 587), ("ssl", "2465", 2465)],
    )
    def test_implicit_tls_goes_to_port_465_unless_a_port_is_given(
        self, monkeypatch: pytest.MonkeyPatch, security: str, port: str | None, used: int
    ) -> None:
        # With the port left at 587, `ssl` failed every send with WRONG_VERSION_NUMBER.
        monkeypatch.setenv("NEWSLETTER_MAILER__KIND", "smtp")
        monkeypatch.setenv("NEWSLETTER_MAILER__HOST", "smtp.example.org")
        monkeypatch.setenv("NEWSLETTER_MAILER__SECURITY", security)
        if port is not None:
            monkeypatch.setenv("NEWSLETTER_MAILER__PORT", port)
        mailer = load_settings().mailer
        assert isinstance(mailer, SmtpMailerSettings)
        assert mailer.port == used

    def test_duplicate_list_slugs_are_named(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(
            "NEWSLETTER_LISTS",
            lists({"slug": "bluehats", "name": "A"}, {"slug": "bluehats", "name": "B"}),
        )
        message = settings_error()
        assert "NEWSLETTER_LISTS: list slugs must be unique" in message
        assert "repeated: bluehats" in message

    @pytest.mark.parametrize("slug", ["Blue Hats", "bluehats/", "-bluehats", "", "a" * 64])
    def test_a_list_with_an_invalid_slug_names_the_list_and_its_slug(
        self, monkeypatch: pytest.MonkeyPatch, slug: str
    ) -> None:
        monkeypatch.setenv(
            "NEWSLETTER_LISTS",
            lists({"slug": "bluehats", "name": "A"}, {"slug": slug, "name": "B"}),
        )
        # Not pydantic's "String should match pattern '^[a-z0-9][a-z0-9-]{0,62}$'".
        assert settings_error() == (
            "invalid settings:\n  NEWSLETTER_LISTS[1].slug: a list's name is lowercase letters, "
            "digits and dashes, starting with a letter or a digit, at most 63 of them (as "
            "bluehats or gazette-bluehats)"
        )

    def test_a_list_with_a_negative_confirm_ttl_is_refused(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv(
            "NEWSLETTER_LISTS", lists({"slug": "bluehats", "name": "A", "confirm_ttl": "-1h"})
        )
        message = settings_error()
        assert "NEWSLETTER_LISTS[0].confirm_ttl: confirm_ttl must be positive" in (message)

    def test_a_consent_text_among_a_lists_strings_points_at_consent_text(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Accepted, it would change nothing: the wording shown and recorded is consent_text.
        strings = {"en": {"consent.text": "I agree."}}
        monkeypatch.setenv(
            "NEWSLETTER_LISTS", lists({"slug": "bluehats", "name": "A", "strings": strings})
        )
        message = settings_error()
        assert "NEWSLETTER_LISTS[0].strings: en string key consent.text" in message
        assert "consent_text" in message.partition("consent.text")[2]

    def test_lists_that_are_not_json_name_the_variable(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_LISTS", "bluehats")
        message = settings_error()
        assert "NEWSLETTER_LISTS: not valid JSON" in message

    def test_a_sender_name_with_an_unquoted_comma_is_refused_with_the_quoted_form(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Read as two addresses; the relay was given MAIL FROM:<Gazette> for every mail.
        monkeypatch.setenv(
            "NEWSLETTER_MAIL_FROM", "Gazette BlueHats, DINUM <bluehats@code.gouv.fr>"
        )
        message = settings_error()
        assert "NEWSLETTER_MAIL_FROM: " in message
        assert 'as in "Gazette BlueHats, DINUM" <bluehats@code.gouv.fr>' in message

    @pytest.mark.parametrize(
        ("value", "reason"),
        [
            ("not an address", "is not one address"),
            ("bluehats@code.gouv.fr, other@code.gouv.fr", "is not one address"),
            ("BlueHats: bluehats@code.gouv.fr;", "is not one address"),
            ("BlueHats <bluehats@code.gouv.fr", "is not one address"),
            ("Blue@Hats <bluehats@code.gouv.fr>", '"Blue@Hats" <bluehats@code.gouv.fr>'),
            ("BlueHats <bluehats@code>", "'bluehats@code' is not a valid address"),
            ("BlueHats <bluehats@exämple.fr>", "ASCII form: bluehats@xn--exmple-cua.fr"),
            ("BlueHats <bluéhats@code.gouv.fr>", "letters beyond ASCII before the @-sign"),
            (
                "=?utf-8?q?Blue=0D=0ABcc:_x@example.org?= <bluehats@code.gouv.fr>",
                "holds a line break in an RFC 2047 word (=?...?=): write the name as plain text",
            ),
            ("", "is not one address"),
        ],
    )
    def test_a_sender_that_is_not_one_valid_address_is_refused(
        self, monkeypatch: pytest.MonkeyPatch, value: str, reason: str
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_MAIL_FROM", value)
        message = settings_error()
        assert "NEWSLETTER_MAIL_FROM: " in message
        assert reason in message

    @pytest.mark.parametrize(
        ("name", "reason"),
        [
            # No space to fold at: a From line of 1,200 characters, which a relay refuses
            # (`500 Line too long`) or breaks.
            ("B" * 1200, "makes a From header line of 1201 characters, more than the 998"),
            # Folded, the quotes were lost and the commas read as 41 addresses.
            ('"' + "DINUM," * 16 + '"', "does not read back as one name once folded"),
        ],
    )
    def test_a_sender_name_a_from_header_cannot_carry_is_refused(
        self, monkeypatch: pytest.MonkeyPatch, name: str, reason: str
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_MAIL_FROM", f"{name} <bluehats@code.gouv.fr>")
        message = settings_error()
        assert "NEWSLETTER_MAIL_FROM: the name in " in message
        assert reason in message
        assert "use a shorter name, with spaces between its words" in message
        assert name not in message  # shown cut, with its length

    def test_a_list_name_with_a_control_character_is_refused(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # It went as it was into the mails' Subject; the API refused it already.
        monkeypatch.setenv("NEWSLETTER_LISTS", lists({"slug": "bluehats", "name": "Blue\x1bHats"}))
        message = settings_error()
        assert "NEWSLETTER_LISTS[0].name: must not contain control characters" in (message)

    @pytest.mark.parametrize("field", ["name", "consent_version"])
    def test_a_blank_list_name_or_consent_version_is_refused(
        self, monkeypatch: pytest.MonkeyPatch, field: str
    ) -> None:
        # As the API refuses them: a Subject naming no list, a proof citing no wording.
        declared = {"slug": "bluehats", "name": "BlueHats", field: " "}
        monkeypatch.setenv("NEWSLETTER_LISTS", lists(declared))
        assert f"NEWSLETTER_LISTS[0].{field}: must not be blank" in settings_error()

    @pytest.mark.parametrize(
        ("declared", "said"),
        [
            # Shown in the form's hidden field: the post's version read back with its line
            # break is no version, and the ledger recorded none for each sign-up.
            (
                {"consent_version": "2026-11\n"},
                "NEWSLETTER_LISTS[0].consent_version: must not contain control characters",
            ),
            # Stored at start as the proof's wording: PostgreSQL refuses a NUL in a text.
            (
                {"consent_text": {"fr": "J'accepte\x00 de recevoir la lettre."}},
                "NEWSLETTER_LISTS[0].consent_text: fr: must not contain control characters "
                "other than line breaks and tabs",
            ),
        ],
        ids=["consent_version", "consent_text"],
    )
    def test_a_list_consent_wording_with_a_control_character_is_refused(
        self, monkeypatch: pytest.MonkeyPatch, declared: dict[str, Any], said: str
    ) -> None:
        # As the API refuses them for a list it creates.
        monkeypatch.setenv(
            "NEWSLETTER_LISTS",
            lists({"slug": "bluehats", "name": "Gazette BlueHats", **declared}),
        )
        assert said in settings_error()

    def test_a_list_string_with_a_control_character_is_refused(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv(
            "NEWSLETTER_LISTS",
            lists(
                {
                    "slug": "bluehats",
                    "name": "Gazette BlueHats",
                    "strings": {"fr": {"mail.confirm.subject": "Confirmez\x00 {list}"}},
                }
            ),
        )
        message = settings_error()
        assert "fr string mail.confirm.subject: must not contain control characters" in message

    def test_a_list_string_keeps_its_line_breaks(self, monkeypatch: pytest.MonkeyPatch) -> None:
        intro = "Bonjour,\n\nvous avez demandé {list}\tà l'adresse {email}."
        monkeypatch.setenv(
            "NEWSLETTER_LISTS",
            lists(
                {
                    "slug": "bluehats",
                    "name": "Gazette BlueHats",
                    "strings": {"fr": {"mail.confirm.intro": intro}},
                }
            ),
        )
        assert load_settings().lists[0].strings[Locale.FR]["mail.confirm.intro"] == intro

    def test_every_bad_variable_is_named_at_once(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("NEWSLETTER_DATABASE_URL", "mongodb://127.0.0.1/x")
        monkeypatch.setenv("NEWSLETTER_RESEND_INTERVAL", "-1m")
        monkeypatch.setenv("NEWSLETTER_MAX_BODY_BYTES", "10")
        message = settings_error()
        for variable in (
            "NEWSLETTER_DATABASE_URL",
            "NEWSLETTER_RESEND_INTERVAL",
            "NEWSLETTER_MAX_BODY_BYTES",
        ):
            assert f"  {variable}:" in message

    @pytest.mark.parametrize(
        ("field", "value", "reason"),
        [
            (
                "list_id",
                "bluehats@lists.example.org",
                "list_id is the list's id, not its posting address: bluehats.lists.example.org",
            ),
            (
                "base_url",
                "https://lists.example.org",
                "base_url must end with the REST API version, e.g. https://lists.example.org/3.1",
            ),
            # A call's URL: cut after its version, not given the version again at its end
            # (".../3.1/lists/bluehats.lists.example.org/3.1").
            (
                "base_url",
                "https://lists.example.org/3.1/lists/bluehats.lists.example.org",
                "base_url must end with the REST API version, e.g. https://lists.example.org/3.1 ",
            ),
            # API 3.0 gives users' and members' ids as numbers: an erasure found no user
            # there and left the person's name at Mailman.
            (
                "base_url",
                "https://lists.example.org/3.0",
                "base_url must end with /3.1, the REST API version this service speaks, "
                "e.g. https://lists.example.org/3.1 (",
            ),
        ],
    )
    def test_a_mailman_list_given_as_mailman_would_refuse_it_fails_at_start(
        self, monkeypatch: pytest.MonkeyPatch, field: str, value: str, reason: str
    ) -> None:
        backend = {
            "kind": "mailman",
            "base_url": "https://lists.example.org/3.1",
            "username": "restadmin",
            "password": "p",
            "list_id": "bluehats.lists.example.org",
        }
        backend[field] = value
        monkeypatch.setenv(
            "NEWSLETTER_LISTS", lists({"slug": "bluehats", "name": "B", "backend": backend})
        )
        message = settings_error()
        assert "NEWSLETTER_LISTS" in message
        assert reason in message

    @pytest.mark.parametrize(
        ("backend", "instead"),
        [
            (
                {"kind": "mailgun", "list_address": "news@mg.example.org", "api_key": "k"},
                "api_key",
            ),
            (
                {
                    "kind": "mailman",
                    "username": "restadmin",
                    "password": "p",
                    "list_id": "bluehats.lists.example.org",
                },
                "username and password",
            ),
            (
                {"kind": "listmonk", "username": "sync-bot", "api_token": "t", "list_id": 3},
                "username and api_token",
            ),
        ],
    )
    def test_credentials_in_a_backend_url_are_refused_without_repeating_them(
        self, monkeypatch: pytest.MonkeyPatch, backend: dict[str, object], instead: str
    ) -> None:
        # They went along in the URL the HTTP client logs at DEBUG and its errors print.
        backend["base_url"] = "https://bot:s3cr3t-pw@lists.example.org/3.1"
        monkeypatch.setenv(
            "NEWSLETTER_LISTS", lists({"slug": "bluehats", "name": "B", "backend": backend})
        )
        message = settings_error()
        assert (
            "  NEWSLETTER_LISTS[0].backend.base_url: base_url holds a user name or password "
            "(user:password@): remove them from it and give the credentials in "
            f"{instead}, which are kept out of logs"
        ) in message
        assert "s3cr3t" not in message
        assert "bot:" not in message


class TestGoodValues:
    @pytest.mark.parametrize(
        ("level", "fmt", "expected"),
        [("debug", "JSON", ("DEBUG", "json")), ("Warning", "Text", ("WARNING", "text"))],
    )
    def test_the_log_level_and_format_are_taken_in_any_case(
        self, monkeypatch: pytest.MonkeyPatch, level: str, fmt: str, expected: tuple[str, str]
    ) -> None:
        # `NEWSLETTER_LOG_LEVEL=debug` stopped the start: "Input should be 'DEBUG', ...".
        monkeypatch.setenv("NEWSLETTER_LOG_LEVEL", level)
        monkeypatch.setenv("NEWSLETTER_LOG_FORMAT", fmt)
        settings = load_settings()
        assert (settings.log_level, settings.log_format) == expected

    def test_a_log_level_of_no_case_is_still_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("NEWSLETTER_LOG_LEVEL", "verbose")
        assert settings_error() == (
            "invalid settings:\n  NEWSLETTER_LOG_LEVEL: Input should be 'DEBUG', 'INFO', "
            "'WARNING' or 'ERROR'"
        )

    def test_settings_in_seconds_take_the_durations_units(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # The README's durations (`30s`, `1m`) were refused here as "not a valid number".
        monkeypatch.setenv("NEWSLETTER_MAILER__KIND", "smtp")
        monkeypatch.setenv("NEWSLETTER_MAILER__HOST", "smtp.example.org")
        monkeypatch.setenv("NEWSLETTER_MAILER__TIMEOUT", "30s")
        monkeypatch.setenv("NEWSLETTER_BACKEND_TIMEOUT", "1m")
        monkeypatch.setenv("NEWSLETTER_BACKEND_CONNECT_TIMEOUT", "2.5")
        monkeypatch.setenv("NEWSLETTER_WORKER_POLL_INTERVAL", "500")
        monkeypatch.setenv("NEWSLETTER_WORKER_GIVE_WAY", "0s")
        settings = load_settings()
        assert isinstance(settings.mailer, SmtpMailerSettings)
        assert settings.mailer.timeout == 30.0
        assert settings.backend_timeout == 60.0
        assert settings.backend_connect_timeout == 2.5
        assert settings.worker_poll_interval == 500.0
        assert settings.worker_give_way == 0.0

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("48h", timedelta(hours=48)),
            ("5m", timedelta(minutes=5)),
            ("90", timedelta(seconds=90)),
            ("90s", timedelta(seconds=90)),
            ("1.5h", timedelta(minutes=90)),
            ("7d", timedelta(days=7)),
            (" 10 m ", timedelta(minutes=10)),
            ("0", timedelta(0)),
            ("PT10M", timedelta(minutes=10)),
            ("01:30:00", timedelta(minutes=90)),
        ],
    )
    def test_durations_parse_to_the_right_timedelta(
        self, monkeypatch: pytest.MonkeyPatch, value: str, expected: timedelta
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_RESEND_INTERVAL", value)
        assert load_settings().resend_interval == expected

    def test_a_mailman_list_id_in_capitals_is_taken_as_mailman_holds_it(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        backend = {
            "kind": "mailman",
            "base_url": "https://lists.example.org/mailman-rest/3.1/",
            "username": "restadmin",
            "password": "p",
            "list_id": "BlueHats.Lists.Example.org",
        }
        monkeypatch.setenv(
            "NEWSLETTER_LISTS", lists({"slug": "bluehats", "name": "B", "backend": backend})
        )
        [declared] = load_settings().lists
        assert isinstance(declared.backend, MailmanBackendSettings)
        assert declared.backend.list_id == "bluehats.lists.example.org"

    @pytest.mark.parametrize(
        "variable", ["NEWSLETTER_RECONCILE_INTERVAL", "NEWSLETTER_RETENTION_INTERVAL"]
    )
    @pytest.mark.parametrize("value", ["off", "OFF", " none ", ""])
    def test_a_periodic_task_is_turned_off_as_a_rate_limit_is(
        self, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
    ) -> None:
        monkeypatch.setenv(variable, value)
        monkeypatch.setenv("NEWSLETTER_RATE_LIMIT_PER_IP", value)
        settings = load_settings()
        field = variable.removeprefix("NEWSLETTER_").lower()
        assert getattr(settings, field) is None
        assert settings.rate_limit_per_ip is None

    def test_a_periodic_task_takes_a_duration(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("NEWSLETTER_RECONCILE_INTERVAL", "24h")
        monkeypatch.setenv("NEWSLETTER_RETENTION_INTERVAL", "30m")
        settings = load_settings()
        assert settings.reconcile_interval == timedelta(hours=24)
        assert settings.retention_interval == timedelta(minutes=30)

    def test_retries_may_start_at_once_and_the_base_may_equal_the_cap(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Zero is "no wait", still bounded by NEWSLETTER_JOB_MAX_ATTEMPTS (the tests use it).
        monkeypatch.setenv("NEWSLETTER_RETRY_BASE_DELAY", "0")
        monkeypatch.setenv("NEWSLETTER_RETRY_MAX_DELAY", "0")
        assert load_settings().retry_max_delay == timedelta(0)
        monkeypatch.setenv("NEWSLETTER_RETRY_BASE_DELAY", "1m")
        monkeypatch.setenv("NEWSLETTER_RETRY_MAX_DELAY", "60s")
        assert load_settings().retry_base_delay == timedelta(minutes=1)

    def test_an_smtp_ca_file_with_certificates_is_read(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_MAILER__KIND", "smtp")
        monkeypatch.setenv("NEWSLETTER_MAILER__HOST", "smtp.example.org")
        monkeypatch.setenv("NEWSLETTER_MAILER__CA_FILE", certifi.where())
        mailer = load_settings().mailer
        assert isinstance(mailer, SmtpMailerSettings)
        assert mailer.ca_file == Path(certifi.where())

    def test_a_lists_confirm_ttl_in_hours_is_read(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(
            "NEWSLETTER_LISTS",
            lists({"slug": "bluehats", "name": "Gazette", "confirm_ttl": "72h"}),
        )
        settings = load_settings()
        [bluehats] = settings.lists
        assert bluehats.confirm_ttl == timedelta(hours=72)

    def test_an_smtp_mailer_is_read_from_nested_variables(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_MAILER__KIND", "smtp")
        monkeypatch.setenv("NEWSLETTER_MAILER__HOST", "127.0.0.1")
        monkeypatch.setenv("NEWSLETTER_MAILER__PORT", "2525")
        monkeypatch.setenv("NEWSLETTER_MAILER__USERNAME", "bluehats")
        monkeypatch.setenv("NEWSLETTER_MAILER__PASSWORD", "s3cret")
        mailer = load_settings().mailer
        assert isinstance(mailer, SmtpMailerSettings)
        assert (mailer.host, mailer.port, mailer.username) == ("127.0.0.1", 2525, "bluehats")
        assert mailer.password is not None
        assert mailer.password.get_secret_value() == "s3cret"
        assert "s3cret" not in repr(mailer)

    @pytest.mark.parametrize(
        "value",
        [
            "bluehats@code.gouv.fr",
            "BlueHats <bluehats@code.gouv.fr>",
            '"Gazette BlueHats, DINUM" <bluehats@code.gouv.fr>',
            "L'équipe BlueHats <bluehats@code.gouv.fr>",
            "J. Doe <bluehats@code.gouv.fr>",
        ],
    )
    def test_a_sender_with_or_without_a_name_is_read_as_given(
        self, monkeypatch: pytest.MonkeyPatch, value: str
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_MAIL_FROM", value)
        assert load_settings().mail_from == value

    def test_a_postgresql_url_gets_the_psycopg_driver(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_DATABASE_URL", "postgresql://postgres@127.0.0.1/news")
        monkeypatch.setenv("NEWSLETTER_SECRET_KEY", "k" * MIN_SECRET_KEY_LENGTH)
        assert load_settings().database_url == "postgresql+psycopg://postgres@127.0.0.1/news"
        monkeypatch.setenv("NEWSLETTER_DATABASE_URL", "postgres://postgres@127.0.0.1/news")
        assert load_settings().database_url == "postgresql+psycopg://postgres@127.0.0.1/news"


class TestSecretKey:
    @pytest.mark.parametrize(
        ("value", "reason"),
        [
            # Empty, it was taken as a key of no bytes (and not as unset, which uses the file).
            ("", "is empty"),
            ("s3cr3t", "is too short"),
            ("k" * (MIN_SECRET_KEY_LENGTH - 1), "is too short"),
        ],
    )
    def test_an_empty_or_short_key_is_refused_without_showing_it(
        self, monkeypatch: pytest.MonkeyPatch, value: str, reason: str
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_SECRET_KEY", value)
        message = settings_error()
        assert f"NEWSLETTER_SECRET_KEY: {reason}; " in message
        assert f"at least {MIN_SECRET_KEY_LENGTH} characters" in message
        assert "token_urlsafe(48)" in message
        if value:
            assert value not in message

    def test_a_key_of_the_minimum_length_derives_the_tokens(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        key = "k" * MIN_SECRET_KEY_LENGTH
        monkeypatch.setenv("NEWSLETTER_SECRET_KEY", key)
        assert load_settings().token_key() == key.encode()

    def test_the_generated_key_file_is_kept_and_passes_the_check(self, tmp_path: Path) -> None:
        first = load_settings().token_key()
        assert len(first) >= MIN_SECRET_KEY_LENGTH
        assert (tmp_path / "var" / "secret.key").read_text().encode() == first
        assert load_settings().token_key() == first

    def test_on_postgresql_a_key_is_required_rather_than_one_made_per_process(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        monkeypatch.setenv(
            "NEWSLETTER_DATABASE_URL", "postgresql+psycopg://newsletter@127.0.0.1:5432/newsletter"
        )
        message = settings_error()
        assert message == (
            "invalid settings:\n  NEWSLETTER_SECRET_KEY: is not set: on PostgreSQL every API "
            "replica, worker and command must sign the links with the same key, or a link "
            "mailed by one does not open at another; give them all the same "
            "NEWSLETTER_SECRET_KEY (or NEWSLETTER_SECRET_KEY_FILE, a file they all read)"
        )
        assert not (tmp_path / "var" / "secret.key").exists()
        # A key file named in the settings is where the operator keeps the key.
        shared = tmp_path / "shared.key"
        monkeypatch.setenv("NEWSLETTER_SECRET_KEY_FILE", str(shared))
        assert load_settings().token_key() == shared.read_text().encode()
        # The default one, once there (made by an earlier release), is read as before.
        monkeypatch.delenv("NEWSLETTER_SECRET_KEY_FILE")
        (tmp_path / "var").mkdir()
        (tmp_path / "var" / "secret.key").write_text("s" * MIN_SECRET_KEY_LENGTH)
        assert load_settings().token_key() == b"s" * MIN_SECRET_KEY_LENGTH

    @pytest.mark.parametrize(
        ("content", "reason"), [("", "is empty"), ("short\n", "holds a key too short")]
    )
    def test_a_key_file_with_an_empty_or_short_key_stops_the_start(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: str, reason: str
    ) -> None:
        path = tmp_path / "keys" / "newsletter.key"
        path.parent.mkdir()
        path.write_text(content)
        monkeypatch.setenv("NEWSLETTER_SECRET_KEY_FILE", str(path))
        message = settings_error()
        assert f"NEWSLETTER_SECRET_KEY_FILE: {path} {reason}; " in message
        assert f"at least {MIN_SECRET_KEY_LENGTH} characters" in message
        # Read when the key is asked for, too, with the same message.
        with pytest.raises(SettingsError, match=r"holds a key too short|is empty"):
            Settings().token_key()


class TestUnknownVariables:
    @pytest.mark.parametrize(
        ("variable", "suggestion"),
        [
            ("NEWSLETTER_LOG_LEVL", "NEWSLETTER_LOG_LEVEL"),
            ("NEWSLETTER_SECRETKEY", "NEWSLETTER_SECRET_KEY"),
            ("NEWSLETTER_MAILER_HOST", "NEWSLETTER_MAILER__HOST"),
            ("NEWSLETTER_MAILER__HOSTNAME", "NEWSLETTER_MAILER__HOST"),
            ("NEWSLETTER_RECONCILE", "NEWSLETTER_RECONCILE_INTERVAL"),
            # Names are read in any case; a misspelt one is named as it was written.
            ("newsletter_log_levl", "NEWSLETTER_LOG_LEVEL"),
            ("newsletter_mailer__hostt", "NEWSLETTER_MAILER__HOST"),
        ],
    )
    def test_a_misspelt_variable_is_named_with_the_closest_setting(
        self, monkeypatch: pytest.MonkeyPatch, variable: str, suggestion: str
    ) -> None:
        monkeypatch.setenv(variable, "DEBUG")
        message = settings_error()
        assert f"  {variable}: no such setting (did you mean {suggestion}?)" in message
        assert message.count("\n  ") == 1  # the one variable

    def test_a_variable_like_no_setting_points_at_the_readme(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_XYZZY", "1")
        assert "  NEWSLETTER_XYZZY: no such setting (see the README's settings)" in (
            settings_error()
        )

    def test_a_list_is_json_only_not_one_variable_per_field(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_LISTS__0__SLUG", "bluehats")
        assert "  NEWSLETTER_LISTS__0__SLUG: no such setting" in settings_error()

    def test_unknown_and_bad_variables_are_named_together(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_LOG_LEVL", "DEBUG")
        monkeypatch.setenv("NEWSLETTER_JOB_LEASE", "0")
        message = settings_error()
        assert "  NEWSLETTER_LOG_LEVL: no such setting" in message
        assert "  NEWSLETTER_JOB_LEASE: job_lease must be positive" in message

    def test_every_setting_is_read_from_its_own_name_in_any_case(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("newsletter_log_level", "DEBUG")
        monkeypatch.setenv("Newsletter_Mailer__Directory", "outbox")
        monkeypatch.setenv("NEWSLETTER_MAILER", '{"kind": "file"}')
        settings = load_settings()
        assert settings.log_level == "DEBUG"
        assert settings.mailer.kind == "file"
        assert settings.mailer.directory == Path("outbox")
        assert "NEWSLETTER_MAILER__CA_FILE" in known_variables()
        assert {f"NEWSLETTER_{field.upper()}" for field in Settings.model_fields} <= (
            known_variables()
        )

    def test_every_variable_is_in_the_readme_table(self) -> None:
        table = README.read_text().partition("## Settings")[2].partition("\n## ")[0]
        rows = [line for line in table.splitlines() if line.startswith("| `NEWSLETTER_")]
        variables = " ".join(row.split(" | ")[0] for row in rows)
        known = sorted(known_variables())
        missing = [
            name
            for name in known
            # A nested one may be written `__PORT` after its sibling in the same cell; the
            # mailer as one JSON value is documented by its nested variables.
            if f"`{name}`" not in variables
            and f"`__{name.rpartition('__')[2]}`" not in variables
            and not any(other.startswith(f"{name}__") for other in known)
        ]
        assert missing == []

    def test_each_default_in_the_readme_table_is_the_setting_s_default(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Given as its value, the default the README shows makes the same setting as leaving
        # the variable out. Rows whose default is said in words ("unset", "none") are left
        # to the reader; most are values.
        table = README.read_text().partition("## Settings")[2].partition("\n## ")[0]
        rows = [line for line in table.splitlines() if line.startswith("| `NEWSLETTER_")]
        defaults = Settings()
        checked = []
        for row in rows:
            names_cell, default_cell, _ = row.strip("|").split(" | ", 2)
            names = re.findall(r"`(NEWSLETTER_[A-Z_]+)`", names_cell)
            values = [value.strip() for value in default_cell.split(",")]
            if len(names) != len(values) or any("__" in name for name in names):
                continue
            for name, written in zip(names, values, strict=True):
                value = re.fullmatch(r"`([^`]*)`(?: \(.*\))?|(\d+(?:\.\d+)?)", written)
                if value is None:
                    continue
                field = name.removeprefix("NEWSLETTER_").lower()
                monkeypatch.setenv(name, value[1] if value[1] is not None else value[2])
                assert getattr(Settings(), field) == getattr(defaults, field), row
                monkeypatch.delenv(name)
                checked.append(name)
        assert len(checked) >= 40, checked


class TestCommandLine:
    @pytest.mark.parametrize(
        ("variable", "value"),
        [
            ("NEWSLETTER_DATABASE_URL", "mysql://root@127.0.0.1/newsletter"),
            ("NEWSLETTER_LISTS", "bluehats"),
            ("NEWSLETTER_MAILER__KIND", "carrier-pigeon"),
            ("NEWSLETTER_LOG_LEVL", "DEBUG"),
            ("NEWSLETTER_SECRET_KEY", ""),
            ("NEWSLETTER_RECONCILE_INTERVAL", "0"),
        ],
    )
    def test_migrate_with_a_bad_setting_exits_2_naming_the_variable(
        self, tmp_path: Path, variable: str, value: str
    ) -> None:
        assert NEWSLETTER_CLI.exists()
        environment = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
        environment[variable] = value
        result = subprocess.run(
            [str(NEWSLETTER_CLI), "migrate"],
            cwd=tmp_path,
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2, result.stderr
        assert variable.split("__")[0] in result.stderr
        assert "invalid settings:" in result.stderr
        assert "Traceback" not in result.stderr
        # Nothing was created next to the command: it stopped before touching a database.
        assert list(tmp_path.iterdir()) == []

    def test_serve_with_an_unquoted_comma_in_the_sender_says_how_to_write_it(
        self, tmp_path: Path
    ) -> None:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
        environment["NEWSLETTER_MAIL_FROM"] = "Gazette BlueHats, DINUM <bluehats@code.gouv.fr>"
        result = subprocess.run(
            # No one can listen there: had the settings passed, serve would stop at once.
            [str(NEWSLETTER_CLI), "serve", "--host", "256.0.0.1"],
            cwd=tmp_path,
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("invalid settings:\n  NEWSLETTER_MAIL_FROM: ")
        assert '"Gazette BlueHats, DINUM" <bluehats@code.gouv.fr>' in result.stderr
        assert "Traceback" not in result.stderr
        assert list(tmp_path.iterdir()) == []


class TestMessagesSayWhatToFix:
    """pydantic's own words completed where they left the operator to guess: a key of
    another kind, a misspelt key, a boolean, a URL without its scheme, a proxy by name, a
    rate limit's syntax; and no "Value error, " before our own messages."""

    def test_a_mailer_key_of_another_kind_says_so(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # The file mailer's folder, left set when the mailer became smtp.
        monkeypatch.setenv("NEWSLETTER_MAILER__KIND", "smtp")
        monkeypatch.setenv("NEWSLETTER_MAILER__HOST", "smtp.example.gouv.fr")
        monkeypatch.setenv("NEWSLETTER_MAILER__DIRECTORY", "var/mail")
        assert settings_error() == (
            "invalid settings:\n  NEWSLETTER_MAILER__DIRECTORY: only for kind file, and the kind "
            "is smtp: remove it, or change the kind"
        )

    def test_a_backend_s_keys_are_named_as_its_json_has_them(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        backend = {"kind": "mailgun", "list_address": "l@mg.example.org", "regoin": "eu"}
        monkeypatch.setenv(
            "NEWSLETTER_LISTS", lists({"slug": "b", "name": "B", "backend": backend})
        )
        message = settings_error()
        # Not `.backend.mailgun.api_key`: no such key is written in the JSON.
        assert "  NEWSLETTER_LISTS[0].backend.api_key: Field required" in message
        assert (
            "  NEWSLETTER_LISTS[0].backend.regoin: no such setting (did you mean region? those "
            "here: list_address, api_key, region, base_url, webhook_signing_key, "
            "clear_suppressions)"
        ) in message

    def test_a_key_of_another_backend_kind_says_so(self, monkeypatch: pytest.MonkeyPatch) -> None:
        backend = {
            "kind": "listmonk", "base_url": "https://listmonk.example.org", "username": "api",
            "api_token": "t", "list_id": 3, "list_address": "l@example.org",
        }  # fmt: skip
        monkeypatch.setenv(
            "NEWSLETTER_LISTS", lists({"slug": "b", "name": "B", "backend": backend})
        )
        assert settings_error() == (
            "invalid settings:\n  NEWSLETTER_LISTS[0].backend.list_address: only for kind "
            "mailgun, and the kind is listmonk: remove it, or change the kind"
        )

    @pytest.mark.parametrize(
        ("variable", "value", "problem"),
        [
            # The list's name where its address goes.
            ("NEWSLETTER_LISTS", lists({"slug": "b", "name": "B", "backend": {
                "kind": "mailgun", "list_address": "bluehats", "api_key": "k",
                "webhook_signing_key": "s"}}),
             "NEWSLETTER_LISTS[0].backend.list_address: the list's address, as "
             "bluehats@mail.codegouv.fr"),
            ("NEWSLETTER_LISTS", lists({"slug": "b", "name": "B", "fields": [
                {"name": "Organisation", "label": {"fr": "Administration"}}]}),
             "NEWSLETTER_LISTS[0].fields[0].name: a field's name is lowercase letters, digits "
             "and underscores, starting with a letter, at most 63 of them (as organisation or "
             "job_title)"),
            ("NEWSLETTER_LISTS", lists({"slug": "b", "name": "B", "fields": [
                {"name": "organisation", "label": {"fr": "A"}, "autocomplete": "Organization"}]}),
             "NEWSLETTER_LISTS[0].fields[0].autocomplete: an HTML autocomplete token, lowercase "
             "letters and dashes (as organization)"),
            ("NEWSLETTER_MAILER__HELO_NAME", "newsletter code",
             "NEWSLETTER_MAILER__HELO_NAME: a host name, of letters, digits, dashes and dots (as "
             "newsletter.code.gouv.fr), or an address literal (as [192.0.2.7])"),
            ("NEWSLETTER_RATE_LIMIT_KEY_PREFIX", "newsletter staging",
             "NEWSLETTER_RATE_LIMIT_KEY_PREFIX: letters, digits and _ . : - only, at most 64 of "
             "them (as newsletter-staging)"),
        ],
    )  # fmt: skip
    def test_a_value_its_pattern_refuses_is_said_in_words(
        self, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, problem: str
    ) -> None:
        # pydantic gave the regular expression: '^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}...' for the
        # EHLO name.
        if variable == "NEWSLETTER_MAILER__HELO_NAME":
            monkeypatch.setenv("NEWSLETTER_MAILER__KIND", "smtp")
            monkeypatch.setenv("NEWSLETTER_MAILER__HOST", "smtp.example.gouv.fr")
        monkeypatch.setenv(variable, value)
        assert settings_error() == f"invalid settings:\n  {problem}"

    @pytest.mark.parametrize(
        ("variable", "value", "problem"),
        [
            ("NEWSLETTER_MAILER__PORT", "587  # default",
             "Input should be a valid integer, unable to parse string as an integer"),
            ("NEWSLETTER_MAILER__SECURITY", "starttls # default",
             "Input should be 'none', 'starttls' or 'ssl'"),
            ("NEWSLETTER_JOB_LEASE", "5m # lease",
             "'5m # lease' is not a duration; give seconds (90) or a number with its unit: 90s, "
             "5m, 48h, 7d"),
        ],
    )  # fmt: skip
    def test_a_comment_after_a_value_is_said_to_be_part_of_it(
        self, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, problem: str
    ) -> None:
        # systemd's and Docker's environment files keep it (docs/production.md), where a
        # shell would drop it: the refusal said nothing of the comment.
        monkeypatch.setenv("NEWSLETTER_MAILER__KIND", "smtp")
        monkeypatch.setenv("NEWSLETTER_MAILER__HOST", "smtp.example.gouv.fr")
        monkeypatch.setenv(variable, value)
        assert settings_error() == (
            f"invalid settings:\n  {variable}: {problem} (the value holds ' #': a comment after "
            "a value is part of it in an environment file; put the comment on a line of its own)"
        )

    @pytest.mark.parametrize(
        ("backend", "problem"),
        [
            # As Mailgun's pages write each call: https://api.eu.mailgun.net/v3/lists/...
            ({"kind": "mailgun", "list_address": "l@mg.example.org", "api_key": "k",
              "base_url": "https://api.eu.mailgun.net/v3"},
             "base_url is the API's root, without the version the calls add: "
             "https://api.eu.mailgun.net"),
            ({"kind": "listmonk", "username": "api", "api_token": "t", "list_id": 3,
              "base_url": "https://news.example.org/listmonk/api/"},
             "base_url is listmonk's root, without the /api the calls add: "
             "https://news.example.org/listmonk"),
        ],
    )  # fmt: skip
    def test_a_backend_url_with_the_path_its_calls_add_says_so(
        self, monkeypatch: pytest.MonkeyPatch, backend: dict[str, object], problem: str
    ) -> None:
        # Every call went to /v3/v3/... or /api/api/...: a 404 that named no setting.
        monkeypatch.setenv(
            "NEWSLETTER_LISTS", lists({"slug": "b", "name": "B", "backend": backend})
        )
        assert settings_error() == (
            f"invalid settings:\n  NEWSLETTER_LISTS[0].backend.base_url: {problem}"
        )

    def test_one_list_written_without_its_array_says_to_put_it_in_one(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # pydantic said "Input should be a valid list" of a value that held one list.
        monkeypatch.setenv("NEWSLETTER_LISTS", json.dumps({"slug": "bluehats", "name": "B"}))
        assert settings_error() == (
            "invalid settings:\n  NEWSLETTER_LISTS: one JSON object where a JSON array is "
            "expected: put it in [ ], even alone"
        )

    def test_a_misspelt_key_of_a_list_or_of_its_fields_gets_the_closest(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        field = {"name": "organisation", "lable": {"fr": "Administration"}}
        declared = {"slug": "b", "name": "B", "thanks_url": "https://x.org", "fields": [field]}
        monkeypatch.setenv("NEWSLETTER_LISTS", lists(declared))
        message = settings_error()
        assert (
            "  NEWSLETTER_LISTS[0].thanks_url: no such setting (did you mean thank_you_url? "
            in (message)
        )
        assert "  NEWSLETTER_LISTS[0].fields[0].lable: no such setting (did you mean label? " in (
            message
        )

    def test_a_boolean_that_is_not_one_is_shown_with_the_two_words(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_RUN_WORKER", "flase")
        assert settings_error() == (
            "invalid settings:\n  NEWSLETTER_RUN_WORKER: 'flase' is not a boolean: write true "
            "or false"
        )

    @pytest.mark.parametrize(
        ("variable", "value"),
        [
            ("NEWSLETTER_PUBLIC_URL", "newsletter.code.gouv.fr"),
            ("NEWSLETTER_DSFR_STYLESHEET_URL", "code.gouv.fr/dsfr.min.css"),
        ],
    )
    def test_a_url_without_its_scheme_asks_for_the_whole_url(
        self, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
    ) -> None:
        monkeypatch.setenv(variable, value)
        assert settings_error() == (
            f"invalid settings:\n  {variable}: Input should be a valid URL, relative URL without "
            "a base: give the whole URL with its scheme, e.g. https://example.gouv.fr"
        )

    def test_a_proxy_named_by_its_host_name_is_refused_saying_why(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_TRUSTED_PROXIES", "10.0.0.7, nginx")
        assert settings_error() == (
            "invalid settings:\n  NEWSLETTER_TRUSTED_PROXIES[1]: 'nginx' is not an IP address: "
            "give each proxy as the service sees it connect, by address (10.0.0.7) or network "
            "(10.0.0.0/8), not by name"
        )

    def test_a_rate_limit_that_cannot_be_read_shows_the_syntax(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_RATE_LIMIT_PER_IP", "20 a minute")
        assert settings_error() == (
            "invalid settings:\n  NEWSLETTER_RATE_LIMIT_PER_IP: '20 a minute' is not a rate "
            "limit: write a count per period, as 20/minute, 3/day or 200/hour (several joined "
            "by ';'), or off"
        )

    def test_a_key_file_that_cannot_be_made_is_a_settings_error(self, tmp_path: Path) -> None:
        # A regular file where its folder should be: no folder can be made there, as root too.
        (tmp_path / "not-a-folder").write_text("x")
        path = tmp_path / "not-a-folder" / "secret.key"
        settings = Settings(secret_key_file=path)
        with pytest.raises(SettingsError) as refused:
            settings.token_key()
        assert str(refused.value) == (
            f"invalid settings:\n  NEWSLETTER_SECRET_KEY_FILE: {path} does not exist and cannot "
            f"be made (File exists: {path.parent}); make it, or give NEWSLETTER_SECRET_KEY"
        )
