"""Small parts on their own: addresses, languages, mails, tokens."""

from __future__ import annotations

import email
import email.policy
import re
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from email_validator import validate_email
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlmodel import Session

from app import addresses, mails, tokens
from app import mailer as mailer_module
from app.api.deps import MAX_ACCEPT_RANGES, accept_ranges, prefers_html
from app.config import FileMailerSettings, Locale, Settings
from app.errors import TokenExpired, TokenNotFound, TokenUsed
from app.i18n import catalogue, negotiate
from app.mailer import FileMailer, OutgoingMail
from app.mails import MailKind, compose
from app.models import MailingList, Subscription, Token, TokenPurpose, utcnow
from tests.conftest import SECRET


class TestAddresses:
    def test_domain_is_lowercased_local_part_kept_and_key_case_folded(self) -> None:
        address = addresses.parse("  Jean.Dupont+BlueHats@Exemple.GOUV.fr ", new=True)
        assert address.email == "Jean.Dupont+BlueHats@exemple.gouv.fr"
        assert address.key == "jean.dupont+bluehats@exemple.gouv.fr"

    def test_internationalized_addresses_are_accepted(self) -> None:
        assert addresses.parse("josé@exämple.fr", new=True).email == "josé@exämple.fr"
        assert addresses.parse("用户@例子.广告", new=True).key == "用户@例子.广告"

    @pytest.mark.parametrize(
        "raw",
        [
            "plain",
            "a@b",
            "a@localhost",
            "two@@example.org",
            "a@example.org\r\nBcc: victim@example.org",
            "nul\x00@example.org",
            "x" * 10_000 + "@example.org",
            "<script>@example.org",
            "a@[127.0.0.1]",
        ],
    )
    @pytest.mark.parametrize("new", [True, False], ids=["new", "lookup"])
    def test_invalid_addresses_are_refused_with_a_message(self, raw: str, new: bool) -> None:
        with pytest.raises(addresses.InvalidAddress) as caught:
            addresses.parse(raw, new=new)
        assert str(caught.value)

    @pytest.mark.parametrize(
        "raw",
        ["\u0441\u0430mille@example.org", "camille@ex\u0430mple.org", "\u03bfscar@example.org"],
    )
    def test_a_look_alike_is_refused_as_a_new_address_and_found_as_a_stored_one(
        self, raw: str
    ) -> None:
        with pytest.raises(addresses.InvalidAddress, match="look alike"):
            addresses.parse(raw, new=True)
        stored = addresses.parse(raw.upper(), new=False)
        assert stored.key == raw.casefold()

    @pytest.mark.parametrize(
        ("raw", "named"),
        [
            # An input method left in full-width mode; a ligature; a superscript.
            ("\uff4a\uff4f@example.org", "FULLWIDTH LATIN SMALL LETTER J"),
            ("cam\uff49lle@example.org", "FULLWIDTH LATIN SMALL LETTER I"),
            ("\ufb01n@example.org", "LATIN SMALL LIGATURE FI"),
            ("jo\u00b2@example.org", "SUPERSCRIPT TWO"),
        ],
    )
    def test_a_character_standing_for_another_is_refused_as_new_and_found_as_stored(
        self, raw: str, named: str
    ) -> None:
        # No mailbox of that name at most providers: the confirmation would never come.
        with pytest.raises(addresses.InvalidAddress, match=named):
            addresses.parse(raw, new=True)
        assert addresses.parse(raw, new=False).email == raw

    def test_other_scripts_and_accents_are_not_compatibility_characters(self) -> None:
        for raw in (
            "jos\u00e9@example.org",
            "\u7528\u6237@example.org",
            "\uc9c0\ubbfc@example.org",
        ):
            assert addresses.parse(raw, new=True).email == raw

    @pytest.mark.parametrize(
        ("raw", "email"),
        [
            ("Jean.Dupont+BlueHats@Exemple.GOUV.fr", "Jean.Dupont+BlueHats@exemple.gouv.fr"),
            ("o'brien_{x}|y~z@sub-1.example.org", "o'brien_{x}|y~z@sub-1.example.org"),
            ("a@" + "b" * 63 + ".fr", "a@" + "b" * 63 + ".fr"),
        ],
    )
    def test_an_everyday_address_takes_the_short_path_with_the_same_result(
        self, raw: str, email: str
    ) -> None:
        plain = addresses._plain(raw)
        assert plain == addresses._general(raw, True)
        assert plain == addresses.Address(email=email, key=email.casefold())

    @pytest.mark.parametrize(
        ("raw", "email"),
        [
            ("Postmaster@Example.org", "postmaster@example.org"),  # role names lowercased
            ("a@xn--exmple-cua.fr", "a@exämple.fr"),  # Punycode shown decoded
            ("a@ab--cd.fr", None),  # two letters then two hyphens, not Punycode
            ("a@b.local", None),  # special-use
            ("a@mail.test", None),
            ("a@example.123", None),  # a top-level label ends with a letter
            ("a@" + "b" * 64 + ".fr", None),  # a label over 63 characters
            ("a@" + ("b" * 62 + ".") * 4 + "fr", None),  # a domain over 253 characters
        ],
    )
    def test_the_other_cases_take_email_validator_path(self, raw: str, email: str | None) -> None:
        assert addresses._plain(raw) is None
        if email is None:
            with pytest.raises(addresses.InvalidAddress):
                addresses.parse(raw, new=True)
        else:
            assert addresses.parse(raw, new=True).email == email

    @pytest.mark.parametrize(
        "raw",
        [
            "a" * 64 + "@example.org",
            "a." * 31 + "bc@example.org",
            "\u00e9" * 32 + "@example.org",  # 64 octets in UTF-8
            "\u7528" * 21 + "a@example.org",  # 63 + 1
        ],
    )
    def test_a_part_before_the_at_sign_of_64_octets_is_accepted(self, raw: str) -> None:
        assert addresses.parse(raw, new=True).email == raw

    @pytest.mark.parametrize(
        ("raw", "unit"),
        [
            ("a" * 65 + "@example.org", "characters"),
            ("a." * 32 + "b@example.org", "characters"),
            ("\u00e9" * 33 + "@example.org", "bytes in UTF-8"),  # 33 characters, 66 octets
            ("a" * 63 + "\u00e9@example.org", "bytes in UTF-8"),  # 64 characters, 65 octets
            ("\u7528" * 22 + "@example.org", "bytes in UTF-8"),  # 22 characters, 66 octets
        ],
    )
    @pytest.mark.parametrize("new", [True, False], ids=["new", "lookup"])
    def test_a_part_before_the_at_sign_over_64_octets_is_refused_on_either_path(
        self, raw: str, unit: str, new: bool
    ) -> None:
        assert addresses._plain(raw) is None
        with pytest.raises(addresses.InvalidAddress) as caught:
            addresses.parse(raw, new=new)
        assert str(caught.value) == f"The part before the @-sign is longer than 64 {unit}" + (
            "." if unit == "characters" else " (a letter beyond ASCII takes 2 to 4)."
        )

    def test_an_address_over_254_characters_is_refused_on_either_path(self) -> None:
        raw = "a" * 63 + "@" + ".".join(["b" * 62] * 3) + ".fr"
        assert len(raw) == 255
        assert addresses._plain(raw) is None
        with pytest.raises(addresses.InvalidAddress, match="too long"):
            addresses._general(raw, True)
        with pytest.raises(addresses.InvalidAddress, match="longer than 254 characters"):
            addresses.parse(raw, new=True)
        # The same address one character shorter is a valid one, on the short path.
        assert addresses._plain(raw[1:]) == addresses.parse(raw[1:], new=True)
        # Spaces around it count for nothing.
        assert addresses.parse(f"  {raw[1:]}  ", new=True) == addresses.parse(raw[1:], new=True)

    @settings(max_examples=3000, deadline=None)
    @given(
        # Short parts of every kind, some led by enough letters to reach 64 and beyond.
        local=st.builds(
            str.__add__,
            st.sampled_from(["", "", "", "x" * 37, "x" * 58, "x" * 63, "x" * 64]),
            st.lists(
                st.text(alphabet="aZ09!#$%&'*+-/=?^_`{|}~.\"@ ", max_size=6),
                min_size=1,
                max_size=4,
            ).map(".".join),
        ),
        labels=st.lists(
            st.one_of(
                st.text(alphabet="aZ09-", min_size=0, max_size=5),
                st.sampled_from(["xn--exmple-cua", "ab--cd", "local", "test", "123", "b" * 64]),
            ),
            min_size=1,
            max_size=4,
        ),
        role=st.sampled_from(["", "Postmaster", "abuse"]),
    )
    def test_the_short_path_answers_only_where_email_validator_gives_the_same(
        self, local: str, labels: list[str], role: str
    ) -> None:
        raw = f"{role or local}@{'.'.join(labels)}"
        plain = addresses._plain(raw)
        if plain is not None:
            assert plain == addresses._general(raw, True)
            # email-validator in its strict mode, which also holds the 64-character limit.
            strict = validate_email(raw, check_deliverability=False, strict=True)
            assert plain.email == strict.normalized

    def test_mask_hides_the_local_part(self) -> None:
        assert addresses.mask("camille@example.org") == "c***@example.org"


class TestLanguages:
    @pytest.mark.parametrize(
        ("header", "expected"),
        [
            (None, Locale.FR),
            ("", Locale.FR),
            ("en-GB,en;q=0.9", Locale.EN),
            ("de-DE,de;q=0.9,en;q=0.5", Locale.EN),
            ("en;q=0.4,fr;q=0.8", Locale.FR),
            ("de, it", Locale.FR),
            ("en;q=0", Locale.FR),
            ("en;q=abc,fr", Locale.FR),
            # Only weights from 0 to 1: `inf` and `1_0` are what float() reads, not weights.
            ("fr;q=0.9,en;q=inf", Locale.FR),
            ("fr;q=0.9,en;q=1_0", Locale.FR),
            ("fr;q=0.9,en;q=2", Locale.FR),
            ("fr;q=0.5,en;q=1.000", Locale.EN),
            # The weight's name in capitals, or after another parameter: still its weight.
            ("en;Q=0,fr;q=0.1", Locale.FR),
            ("en; q = 0, fr;q=0.1", Locale.FR),
            ("fr;q=0.1,en;x=1;q=0.5", Locale.EN),
            ("en;x=1;q=0,fr;q=0.1", Locale.FR),
        ],
    )
    def test_accept_language_picks_the_best_supported_language(
        self, header: str | None, expected: Locale
    ) -> None:
        assert negotiate(header, default=Locale.FR) == expected

    def test_catalogues_have_the_same_keys(self) -> None:
        assert catalogue(Locale.FR).keys() == catalogue(Locale.EN).keys()


BROWSER_ACCEPT = (
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
)


class TestAccept:
    @pytest.mark.parametrize(
        ("header", "page_route", "api_route"),
        [
            # What browsers, API clients and curl send.
            (BROWSER_ACCEPT, True, True),
            ("text/html,application/xhtml+xml", True, True),
            ("application/json", False, False),
            ("*/*", True, False),
            (None, True, False),
            ("", True, False),
            # q=0 is "not acceptable"; the higher weight wins.
            ("text/html;q=0, application/json", False, False),
            ("application/json, text/html;q=0.1", False, False),
            ("text/html;q=0.5, application/json;q=0.4", True, True),
            ("application/json;q=0, */*", True, True),
            ("text/html;q=0, */*", False, False),
            # The most specific range counts, whatever its place.
            ("*/*;q=0.1, text/*;q=0.9, application/*;q=0.5", True, True),
            ("text/*;q=0.2, text/html;q=1, application/json;q=0.5", True, True),
            ("application/*, text/*;q=0.1", False, False),
            # A tie, or neither named, keeps the route's own kind of answer.
            ("text/html, application/json", True, False),
            ("text/html;q=0.3, application/json;q=0.3", True, False),
            ("text/plain", True, False),
            ("text/html;q=0", True, False),
            # Case and spaces as anyone writes them; parameters and extensions ignored.
            ("TEXT/HTML ; Q = 0.2 , Application/JSON;q=0.1", True, True),
            ("text/html;level=1;q=0.3, */*;q=0.2", True, True),
            ("application/json;charset=utf-8, text/html;q=0.9;ext=1", False, False),
        ],
    )
    def test_html_only_when_weighed_above_json_or_tied_on_a_page_route(
        self, header: str | None, page_route: bool, api_route: bool
    ) -> None:
        assert prefers_html(header, default=True) is page_route
        assert prefers_html(header, default=False) is api_route

    @pytest.mark.parametrize(
        "header",
        [
            "text/html;q=high, application/json;q=0.5",
            "text/html;q=1.5, application/json;q=0.5",
            "text/html;q=-1, application/json;q=0.5",
            "text/html;q=nan, application/json;q=0.5",
            "text/html;q=1e0, application/json;q=0.5",
            "text, html, /html, */html, text/, text/h tml, application/json;q=0.5",
        ],
    )
    def test_a_range_that_cannot_be_read_is_left_out(self, header: str) -> None:
        assert accept_ranges(header) == [("application", "json", 0.5)]
        assert prefers_html(header, default=True) is False

    def test_a_hostile_header_is_read_only_as_far_as_its_first_ranges(self) -> None:
        header = ",".join(["image/png"] * 100_000 + ["text/html"])
        assert len(accept_ranges(header)) == MAX_ACCEPT_RANGES
        assert prefers_html(header, default=False) is False
        long_parameters = "text/html;" + "a=b;" * 100_000 + "q=0"
        assert accept_ranges(long_parameters) == [("text", "html", 1.0)]


def _compose(kind: MailKind = MailKind.CONFIRM, **overrides: Any) -> OutgoingMail:
    values: dict[str, Any] = {
        "locale": Locale.FR,
        "list_name": "Gazette BlueHats",
        "to": "camille@example.org",
        "mail_from": "BlueHats <bluehats@code.gouv.fr>",
        "message_key": "42.20261128.newsletter",
        "link": "https://example.org/v1/confirm/abc",
    }
    values.update(overrides)
    return compose(kind, **values)


class TestMails:
    def test_confirmation_mail_has_the_expected_headers_and_parts(self) -> None:
        mail = _compose(locale=Locale.EN)
        message = mail.message
        assert message["Message-ID"] == "<42.20261128.newsletter@code.gouv.fr>"
        assert message["Auto-Submitted"] == "auto-generated"
        assert message["Content-Language"] == "en"
        assert message["Date"]
        assert "List-Unsubscribe" not in message
        text = message.get_body(preferencelist=("plain",))
        html = message.get_body(preferencelist=("html",))
        assert text is not None
        assert html is not None
        assert "https://example.org/v1/confirm/abc" in text.get_content()
        assert 'href="https://example.org/v1/confirm/abc"' in html.get_content()

    @pytest.mark.parametrize(
        "mail_from",
        ["Gazette BlueHats, DINUM <bluehats@code.gouv.fr>", "not an address"],
    )
    def test_a_sender_that_is_not_one_address_is_not_composed(self, mail_from: str) -> None:
        # The settings refuse it at start; before, the mail went out from MAIL FROM:<Gazette>
        # (or <not>), with a Message-ID <...@Gazette>.
        with pytest.raises(addresses.InvalidAddress, match="not one address"):
            _compose(mail_from=mail_from)

    def test_the_envelope_sender_is_the_from_address(self) -> None:
        mail = _compose(mail_from='"Gazette BlueHats, DINUM" <bluehats@code.gouv.fr>')
        assert mail.sender == "bluehats@code.gouv.fr"
        assert mail.message["Message-ID"] == "<42.20261128.newsletter@code.gouv.fr>"

    def test_a_list_name_with_line_breaks_cannot_add_headers(self) -> None:
        mail = _compose(list_name="News\r\nBcc: victim@example.org", message_key="1.x")
        assert "Bcc" not in mail.message
        assert "\n" not in mail.message["Subject"]

    @pytest.mark.parametrize("locale", list(Locale))
    def test_a_list_name_that_looks_like_an_encoded_word_is_shown_as_it_is(
        self, locale: Locale
    ) -> None:
        # Parsed, the name read as RFC 2047 words hiding a line break, and the subject was
        # written as two header lines, the second one `Bcc: victim@example.org`.
        name = "=?utf-8?q?News=0D=0ABcc:_victim@example.org?="
        raw = mailer_module._as_sent(_compose(locale=locale, list_name=name))
        head = raw.split(b"\n\n", 1)[0]
        assert not any(line.startswith(b"Bcc") for line in head.splitlines())
        assert max(len(line) for line in head.splitlines()) <= 78
        read = email.message_from_bytes(raw, policy=email.policy.default)
        assert "Bcc" not in read
        assert read["Subject"].endswith(" " + name)

    @pytest.mark.parametrize(
        "to",
        [
            # Valid letters before an @-sign, which the header's parser read as words.
            "=?utf-8?q?ab?=" + "c" * 50 + "@example-long-domain.org",
            "=?utf-8?q?=0D=0ABcc:_x?=" + "c" * 40 + "@example-long-domain.org",
            "=?utf-8?q?jos=C3=A9?=@exämple.fr",
        ],
    )
    def test_the_to_header_is_the_address_as_it_is(self, to: str) -> None:
        # Before, the first went out with `To: abccc...` (not the envelope's recipient), and
        # the second failed with an internal error at every attempt.
        mail = _compose(to=to)
        assert mail.recipient == addresses.deliverable(to)
        raw = mailer_module._as_sent(mail)
        (to_line,) = [line for line in raw.splitlines() if line.startswith(b"To: ")]
        assert to_line == b"To: " + mail.recipient.encode()

    # \x0b (and \x0c, \x1c-\x1e) split a header's lines as \r\n do when it is written.
    @pytest.mark.parametrize("brk", ["\r\n", "\n", "\x0b", "\x0c", "\x1e"])
    def test_a_recipient_with_line_breaks_is_refused(self, brk: str) -> None:
        with pytest.raises(ValueError, match=r"linefeed|carriage return|newline"):
            _compose(
                list_name="News",
                to=f"camille@example.org{brk}Bcc: victim@example.org",
                message_key="1.x",
            )

    @pytest.mark.parametrize("kind", list(MailKind))
    @pytest.mark.parametrize("locale", list(Locale))
    @pytest.mark.parametrize(
        ("to", "written"),
        [
            ("camille@example.org", "camille@example.org"),
            ("a" * 62 + "@b.fr", "a" * 62 + "@b.fr"),
            # An internationalized domain in its ASCII form, which any relay carries;
            ("camille@exämple.fr", "camille@xn--exmple-cua.fr"),
            # letters beyond ASCII before the @-sign have none: that mail needs SMTPUTF8.
            ("josé@exämple.fr", "josé@exämple.fr"),
        ],
    )
    def test_every_mail_reads_back_whole_with_short_lines(
        self, kind: MailKind, locale: Locale, to: str, written: str
    ) -> None:
        link = "https://newsletter.code.gouv.fr/v1/confirm/" + "x" * 43
        mail = _compose(
            kind,
            locale=locale,
            to=to,
            list_name="Gazette BlueHats à l'été",
            mail_from="L'équipe BlueHats <bluehats@code.gouv.fr>",
            link=None if kind == MailKind.GOODBYE else link,
        )
        assert mail.recipient == written
        raw = mailer_module._as_sent(mail)  # as the SMTP server gets it, or the mail file
        assert max(len(line) for line in raw.splitlines()) <= 78
        (to_line,) = [line for line in raw.splitlines() if line.startswith(b"To: ")]
        assert to_line == b"To: " + written.encode()  # no RFC 2047 word in an address
        read = email.message_from_bytes(raw, policy=email.policy.default)
        assert read["To"] == written
        assert read["From"] == "L'équipe BlueHats <bluehats@code.gouv.fr>"
        assert "Gazette BlueHats à l'été" in read["Subject"]
        assert read.get_content_type() == "multipart/alternative"
        parts = [read.get_body(preferencelist=(subtype,)) for subtype in ("plain", "html")]
        for part in parts:
            assert part is not None
            content = part.get_content()
            assert content.endswith("\n")
            assert to in content
            if kind != MailKind.GOODBYE:
                assert link in content

    @pytest.mark.parametrize(
        ("ttl", "locale", "said"),
        [
            (timedelta(hours=48), Locale.EN, "This link is valid for 48 hours."),
            (timedelta(minutes=90), Locale.EN, "This link is valid for 1 hour."),
            (timedelta(minutes=20), Locale.EN, "This link is valid for 20 minutes."),
            (timedelta(seconds=20), Locale.EN, "This link is valid for 1 minute."),
            (timedelta(hours=48), Locale.FR, "Ce lien est valable 48 heures."),
            (timedelta(hours=1), Locale.FR, "Ce lien est valable 1 heure."),
        ],
    )
    def test_the_confirmation_mail_says_how_long_its_link_lasts(
        self, ttl: timedelta, locale: Locale, said: str
    ) -> None:
        mail = _compose(locale=locale, confirm_ttl=ttl)
        for subtype in ("plain", "html"):
            part = mail.message.get_body(preferencelist=(subtype,))
            assert part is not None
            assert said in part.get_content(), subtype

    @pytest.mark.parametrize(
        ("locale", "stays", "nothing_else"),
        [
            (Locale.FR, "votre inscription à Gazette BlueHats reste active", "rien d'autre"),
            (Locale.EN, "your subscription to Gazette BlueHats stays active", "nothing else"),
        ],
    )
    def test_the_unsubscribe_mail_says_ignoring_it_keeps_the_subscription(
        self, locale: Locale, stays: str, nothing_else: str
    ) -> None:
        # It said, as the confirmation mail, "you will receive nothing else": to a subscriber
        # who did not ask, who goes on receiving the newsletter.
        mail = _compose(MailKind.UNSUBSCRIBE, locale=locale)
        for subtype in ("plain", "html"):
            part = mail.message.get_body(preferencelist=(subtype,))
            assert part is not None
            content = part.get_content()
            assert stays in content, subtype
            assert nothing_else not in content, subtype

    def test_the_unsubscribe_header_is_the_url_as_it_is(self) -> None:
        # Longer than a line of 78, with nowhere to fold: still a URL clients can read
        # (RFC 2369, RFC 8058), not RFC 2047 words.
        link = "https://newsletter.code.gouv.fr/v1/unsubscribe/" + "v41Iis0Bbq-eeyuGIGg_" * 3
        mail = _compose(MailKind.ALREADY_SUBSCRIBED, unsubscribe_link=link)
        raw = mail.message.as_bytes().splitlines()
        assert b"List-Unsubscribe: <" + link.encode() + b">" in raw
        assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in raw
        read = email.message_from_bytes(b"\n".join(raw), policy=email.policy.default)
        assert read["List-Unsubscribe"] == f"<{link}>"

    def test_a_text_part_with_a_control_character_is_not_7bit(self) -> None:
        # RFC 2045 2.7: 7bit data holds no NUL nor other controls besides its line ends.
        part = mails._text_part("plain", "Hello\x00,\nsee\x1b you.")
        assert part["Content-Transfer-Encoding"] == "quoted-printable"
        assert "Hello=00," in str(part.get_payload())
        assert part.get_content() == "Hello\x00,\nsee\x1b you.\n"

    def test_the_file_mailer_writes_what_smtp_would_send(self, tmp_path: Path) -> None:
        mail = _compose(to="josé@exämple.fr")
        FileMailer(FileMailerSettings(directory=tmp_path)).send(mail)
        (path,) = tmp_path.glob("*.eml")
        assert "To: josé@exämple.fr".encode() in path.read_bytes().splitlines()

    @pytest.mark.parametrize(
        ("body", "encoding"),
        [
            ("Hello,\nsee you.", "7bit"),
            # Never 8bit: smtplib declares no BODY=8BITMIME for it (RFC 6152).
            ("Bonjour,\nà bientôt.\r\n", "quoted-printable"),
            ("Bonjour, " + "é" * 80 + "\n=.\n", "quoted-printable"),
        ],
    )
    def test_a_text_part_is_encoded_as_set_content_would(self, body: str, encoding: str) -> None:
        part = mails._text_part("plain", body)
        assert part["Content-Transfer-Encoding"] == encoding
        expected = EmailMessage(policy=mails.POLICY)
        expected.set_content(body)
        if encoding != "quoted-printable":  # for long lines set_content may take base64
            assert expected["Content-Transfer-Encoding"] == encoding
        read = email.message_from_bytes(part.as_bytes(), policy=email.policy.default)
        assert read.get_content() == expected.get_content()
        assert max(len(line) for line in part.as_bytes().splitlines()) <= 78

    def test_html_part_escapes_what_it_shows(self) -> None:
        mail = _compose(MailKind.GOODBYE, list_name="<b>News</b>", message_key="1.x", link=None)
        html = mail.message.get_body(preferencelist=("html",))
        assert html is not None
        assert "<b>News</b>" not in html.get_content()
        assert "&lt;b&gt;News&lt;/b&gt;" in html.get_content()

    def test_a_mail_of_short_lines_beyond_ascii_is_sent_in_7_bits(self) -> None:
        # A list's own short wording left every line of the text part under 78: it went
        # as 8bit, which smtplib sends without BODY=8BITMIME to an ASCII address.
        strings = {"mail.goodbye.intro": "Au revoir, à bientôt.", "mail.signature": "L'équipe"}
        mail = _compose(MailKind.GOODBYE, link=None, strings=strings)
        raw = mailer_module._as_sent(mail)
        assert raw.isascii()
        read = email.message_from_bytes(raw, policy=email.policy.default)
        text = read.get_body(preferencelist=("plain",))
        assert text is not None
        assert "Au revoir, à bientôt." in text.get_content()

    @pytest.mark.parametrize("locale", list(Locale))
    def test_the_goodbye_mail_links_the_landing_page_with_its_address_as_the_words(
        self, locale: Locale
    ) -> None:
        # The goodbye mail has a link and no button label: its HTML part showed an empty
        # blue button, and the address below it was not a link.
        landing = "https://code.gouv.fr/fr/bluehats/"
        mail = _compose(MailKind.GOODBYE, locale=locale, link=landing)
        html = mail.message.get_body(preferencelist=("html",))
        assert html is not None
        anchors = re.findall(r"<a\b[^>]*>(.*?)</a>", html.get_content(), re.DOTALL)
        assert anchors == [landing]


class TestTokens:
    def _subscription(self, session: Session) -> Subscription:
        mailing_list = MailingList(
            slug="t", name="T", default_locale="fr", consent_version="1", confirm_ttl_seconds=60
        )
        session.add(mailing_list)
        session.flush()
        assert mailing_list.id is not None
        subscription = Subscription(
            list_id=mailing_list.id,
            email="a@example.org",
            email_key="a@example.org",
            status="pending",
            locale="fr",
            consent_version="1",
        )
        session.add(subscription)
        session.flush()
        return subscription

    def test_only_a_hash_is_stored_and_the_link_finds_the_token(self, engine: object) -> None:
        key = Settings(secret_key=SECRET).token_key()
        now = utcnow()
        with Session(engine) as session:  # type: ignore[call-overload]
            subscription = self._subscription(session)
            token = tokens.issue(
                session,
                subscription=subscription,
                purpose=TokenPurpose.CONFIRM,
                key=key,
                now=now,
                ttl=timedelta(hours=1),
            )
            session.flush()
            secret = tokens.secret_for(token, key=key)
            assert secret not in token.token_hash
            assert token.token_hash == tokens.hash_of(secret)
            found = tokens.lookup(session, secret=secret, purpose=TokenPurpose.CONFIRM, now=now)
            assert found.id == token.id
            # The same secret is no unsubscribe token, and another key gives another link.
            with pytest.raises(TokenNotFound):
                tokens.lookup(session, secret=secret, purpose=TokenPurpose.UNSUBSCRIBE, now=now)
            assert tokens.secret_for(token, key=b"other") != secret
            with pytest.raises(TokenNotFound):
                tokens.lookup(session, secret="x" * 65, purpose=TokenPurpose.CONFIRM, now=now)
            with pytest.raises(TokenExpired):
                tokens.lookup(
                    session,
                    secret=secret,
                    purpose=TokenPurpose.CONFIRM,
                    now=now + timedelta(hours=2),
                )
            token.used_at = now
            with pytest.raises(TokenUsed):
                tokens.lookup(session, secret=secret, purpose=TokenPurpose.CONFIRM, now=now)
            session.rollback()

    def test_using_a_token_retires_its_siblings_and_a_used_one_changes_nothing(
        self, engine: object
    ) -> None:
        key = Settings(secret_key=SECRET).token_key()
        now = utcnow()
        with Session(engine) as session:  # type: ignore[call-overload]
            subscription = self._subscription(session)
            assert subscription.id is not None

            def issue(purpose: TokenPurpose) -> Token:
                return tokens.issue(
                    session, subscription=subscription, purpose=purpose, key=key, now=now, ttl=None
                )

            first, second = issue(TokenPurpose.CONFIRM), issue(TokenPurpose.CONFIRM)
            leave = issue(TokenPurpose.UNSUBSCRIBE)
            session.flush()

            def use(token: Token) -> bool:
                assert token.id is not None
                return tokens.use(
                    session,
                    token_id=token.id,
                    subscription_id=subscription.id,
                    purpose=TokenPurpose.CONFIRM,
                    now=now,
                )

            def used(*named: Token) -> list[bool]:
                session.expire_all()
                return [token.used_at is not None for token in named]

            assert use(second)
            assert used(first, second, leave) == [True, True, False]
            # A link mailed later: a press of a spent one leaves it be.
            third = issue(TokenPurpose.CONFIRM)
            session.flush()
            assert not use(first)
            assert not use(second)
            assert used(third) == [False]
            assert use(third)
            session.rollback()

    def test_token_rows_never_hold_the_link_secret(self) -> None:
        assert {column.name for column in Token.__table__.columns} == {  # type: ignore[attr-defined]
            "id",
            "subscription_id",
            "purpose",
            "token_hash",
            "created_at",
            "expires_at",
            "used_at",
        }


class TestLogs:
    def test_token_paths_are_redacted_from_access_log_lines(self) -> None:
        import logging

        from app.logs import RedactTokens

        record = logging.LogRecord(
            "uvicorn.access",
            logging.INFO,
            __file__,
            1,
            '%s - "%s %s HTTP/%s" %d',
            ("127.0.0.1:1", "POST", "/v1/confirm/AbC-_123?lang=fr", "1.1", 200),
            None,
        )
        RedactTokens().filter(record)
        line = record.getMessage()
        assert "AbC-_123" not in line
        assert "/v1/confirm/<redacted>?lang=fr" in line

    @pytest.mark.parametrize(
        "path",
        [
            "/v1/Confirm/AbC-_123",
            "/V1/UNSUBSCRIBE/AbC-_123",
            "//v1//confirm/AbC-_123",
            # Dot segments a browser resolves, sent unresolved by another client.
            "/v1/./confirm/AbC-_123",
            "/v1/lists/bluehats/../../unsubscribe/AbC-_123",
        ],
    )
    def test_a_token_path_in_another_case_or_with_doubled_slashes_is_redacted(
        self, path: str
    ) -> None:
        from app.logs import redact

        assert "AbC-_123" not in redact(f'"GET {path} HTTP/1.1" 404')
        assert "<redacted>" in redact(path)

    def test_the_unsubscribe_request_pages_hold_no_token_and_stay_readable(self) -> None:
        from app.logs import redact

        for path in (
            "/v1/lists/bluehats/unsubscribe/sent?lang=fr",
            "/v1/lists/bluehats/unsubscribe",
        ):
            assert redact(f'"GET {path} HTTP/1.1" 200') == f'"GET {path} HTTP/1.1" 200'
