"""Bad input gets a clear 4xx in the one error shape `{"error", "detail"}` and stores nothing.

"Stores nothing" is measured on the rows a request can cause: subscriptions, consent-ledger
events and outbox jobs. The unsubscribe-by-address endpoint is aimed at a confirmed member,
the one case where a valid request would record an event and queue a mail.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlencode

import httpx
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.conftest import LiveServer, SmtpSink, count_rows, link_in, make_settings

SUBSCRIBE = "/v1/lists/bluehats/subscriptions"
UNSUBSCRIBE = "/v1/lists/bluehats/unsubscriptions"
STORED = ("subscription", "consent_event", "outbox_job")
JSON_TYPE = {"content-type": "application/json"}
FORM_TYPE = {"content-type": "application/x-www-form-urlencoded"}
MULTIPART = "multipart/form-data"
WANTS_JSON = {"accept": "application/json"}
MEMBER = "member@example.org"


def stored_rows(url: str) -> dict[str, int]:
    return {table: count_rows(url, table) for table in STORED}


def error_of(response: httpx.Response, status: int, code: str) -> str:
    """Check the status and the one error shape; return the detail for further checks."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    assert body["error"] == code, body
    assert isinstance(body["detail"], str)
    assert body["detail"].strip()
    detail: str = body["detail"]
    return detail


def confirm_member(client: TestClient, smtp: SmtpSink, email: str) -> None:
    assert client.post(SUBSCRIBE, json={"email": email}).status_code == 202
    link = link_in(smtp.mail_to(email, link="confirm"), "confirm")
    assert client.post(link, headers=WANTS_JSON).json()["status"] == "confirmed"


@dataclass
class Endpoint:
    """A body-reading endpoint, the address a good request would act on, and the rows
    stored before the bad request."""

    path: str
    email: str
    url: str
    before: dict[str, int]

    def assert_nothing_stored(self) -> None:
        assert stored_rows(self.url) == self.before


@pytest.fixture(params=["subscribe", "unsubscribe"])
def endpoint(
    request: pytest.FixtureRequest, client: TestClient, smtp: SmtpSink, settings: Settings
) -> Endpoint:
    url = settings.database_url
    if request.param == "subscribe":
        assert stored_rows(url) == dict.fromkeys(STORED, 0)
        return Endpoint(path=SUBSCRIBE, email="new@example.org", url=url, before=stored_rows(url))
    confirm_member(client, smtp, MEMBER)
    return Endpoint(path=UNSUBSCRIBE, email=MEMBER, url=url, before=stored_rows(url))


@pytest.fixture
def empty_database(settings: Settings) -> Iterator[str]:
    """For subscribe-only cases: the database is empty before, and must be after."""
    url = settings.database_url
    assert stored_rows(url) == dict.fromkeys(STORED, 0)
    yield url
    assert stored_rows(url) == dict.fromkeys(STORED, 0)


class TestTheCheckIsMeaningful:
    def test_a_well_formed_request_to_the_same_endpoint_is_recorded(
        self, client: TestClient, endpoint: Endpoint
    ) -> None:
        response = client.post(endpoint.path, json={"email": endpoint.email})
        assert response.status_code == 202
        after = stored_rows(endpoint.url)
        assert after["consent_event"] == endpoint.before["consent_event"] + 1
        assert after["outbox_job"] == endpoint.before["outbox_job"] + 1


class TestUnreadableBodies:
    def test_malformed_json_is_400_invalid_body(
        self, client: TestClient, endpoint: Endpoint
    ) -> None:
        body = f'{{"email": "{endpoint.email}"'.encode()
        response = client.post(endpoint.path, content=body, headers=JSON_TYPE)
        detail = error_of(response, 400, "invalid_body")
        assert "not valid JSON" in detail
        endpoint.assert_nothing_stored()

    def test_json_that_is_not_an_object_is_400(
        self, client: TestClient, endpoint: Endpoint, subtests: pytest.Subtests
    ) -> None:
        bodies = {
            "array": f'["{endpoint.email}"]',
            "string": f'"{endpoint.email}"',
            "number": "42",
            "null": "null",
            "boolean": "true",
        }
        for kind, body in bodies.items():
            with subtests.test(kind):
                response = client.post(endpoint.path, content=body, headers=JSON_TYPE)
                detail = error_of(response, 400, "invalid_body")
                assert "must be a JSON object" in detail
                endpoint.assert_nothing_stored()

    def test_json_naming_a_field_twice_is_400_whichever_comes_first(
        self, client: TestClient, endpoint: Endpoint, subtests: pytest.Subtests
    ) -> None:
        bodies = {
            "good-last": f'{{"email": "not an address", "email": "{endpoint.email}"}}',
            "good-first": f'{{"email": "{endpoint.email}", "email": "not an address"}}',
            "nested": f'{{"email": "{endpoint.email}", "attributes": {{"a": "x", "a": "y"}}}}',
        }
        for kind, body in bodies.items():
            with subtests.test(kind):
                response = client.post(endpoint.path, content=body, headers=JSON_TYPE)
                detail = error_of(response, 400, "invalid_body")
                assert "more than once" in detail
                endpoint.assert_nothing_stored()

    def test_json_nested_thousands_deep_is_400_not_a_crash(
        self, client: TestClient, endpoint: Endpoint
    ) -> None:
        # Fits under the body limit, but would exhaust the parser's recursion limit.
        body = b'{"email": ' + b"[" * 5000 + b"]" * 5000 + b"}"
        response = client.post(endpoint.path, content=body, headers=JSON_TYPE)
        detail = error_of(response, 400, "invalid_body")
        assert "nested too deeply" in detail
        endpoint.assert_nothing_stored()

    def test_form_body_that_is_not_utf8_is_400(
        self, client: TestClient, endpoint: Endpoint, subtests: pytest.Subtests
    ) -> None:
        bodies = {
            "raw-byte": b"email=\xff@example.org",
            "percent-encoded": b"email=%FF%FE@example.org",
            "encoded-surrogate": b"email=%ED%A0%80@example.org",
        }
        for kind, body in bodies.items():
            with subtests.test(kind):
                response = client.post(endpoint.path, content=body, headers=FORM_TYPE)
                detail = error_of(response, 400, "invalid_body")
                assert "UTF-8" in detail
                endpoint.assert_nothing_stored()

    def test_form_with_too_many_fields_is_400(self, client: TestClient, endpoint: Endpoint) -> None:
        fields = [f"email={endpoint.email}"] + [f"f{i}=x" for i in range(60)]
        response = client.post(endpoint.path, content="&".join(fields), headers=FORM_TYPE)
        detail = error_of(response, 400, "invalid_body")
        assert "more than 50 fields" in detail
        endpoint.assert_nothing_stored()


class TestContentTypes:
    def test_a_body_in_another_content_type_is_415(
        self, client: TestClient, endpoint: Endpoint, subtests: pytest.Subtests
    ) -> None:
        body = f'{{"email": "{endpoint.email}"}}'.encode()
        for content_type in ("text/plain", "application/xml"):
            with subtests.test(content_type):
                headers = {"content-type": content_type}
                response = client.post(endpoint.path, content=body, headers=headers)
                detail = error_of(response, 415, "unsupported_media_type")
                # Every type the route reads, multipart forms (a form's enctype) included.
                for kind in ("application/json", "application/x-www-form-urlencoded", MULTIPART):
                    assert kind in detail
                endpoint.assert_nothing_stored()
        with subtests.test("no content type"):
            response = client.post(endpoint.path, content=body)
            assert "content-type" not in response.request.headers
            error_of(response, 415, "unsupported_media_type")
            endpoint.assert_nothing_stored()

    def test_a_form_declared_in_another_charset_is_415_as_json_is(
        self, client: TestClient, endpoint: Endpoint, subtests: pytest.Subtests
    ) -> None:
        # Plain ASCII, the same bytes in every one of these charsets: only the declaration
        # differs, and a body declared in one is not what the form path reads (UTF-8).
        body = urlencode({"email": endpoint.email}).encode()
        for charset in ("utf-7", "iso-8859-1", '"ISO-8859-1"'):
            with subtests.test(charset):
                headers = {"content-type": f"{FORM_TYPE['content-type']}; charset={charset}"}
                response = client.post(
                    endpoint.path, content=body, headers=headers, follow_redirects=False
                )
                detail = error_of(response, 415, "unsupported_media_type")
                assert detail == "Send the body in UTF-8 (or without a charset)."
                endpoint.assert_nothing_stored()
        with subtests.test("utf-8"):
            headers = {"content-type": f"{FORM_TYPE['content-type']}; charset=UTF-8"}
            response = client.post(
                endpoint.path, content=body, headers=headers, follow_redirects=False
            )
            assert response.status_code == 303, response.text
            after = stored_rows(endpoint.url)
            assert after["outbox_job"] == endpoint.before["outbox_job"] + 1

    def test_a_multipart_form_is_read_as_a_form(
        self, client: TestClient, endpoint: Endpoint, subtests: pytest.Subtests
    ) -> None:
        # A site's form with enctype="multipart/form-data": its text fields are the form.
        with subtests.test("text fields"):
            response = client.post(
                endpoint.path,
                files={"email": (None, endpoint.email), "locale": (None, "en")},
                follow_redirects=False,
            )
            assert response.request.headers["content-type"].startswith("multipart/form-data")
            assert response.status_code == 303, response.text
            after = stored_rows(endpoint.url)
            assert after["outbox_job"] == endpoint.before["outbox_job"] + 1
            endpoint.before = after
        for name, files in {
            "a file": {"email": (None, endpoint.email), "cv": ("cv.txt", b"x", "text/plain")},
            "not multipart": None,
        }.items():
            with subtests.test(name):
                if files is None:  # the declared type, a JSON body
                    response = client.post(
                        endpoint.path,
                        content=f'{{"email": "{endpoint.email}"}}'.encode(),
                        headers={"content-type": "multipart/form-data; boundary=x"},
                        follow_redirects=False,
                    )
                else:
                    response = client.post(endpoint.path, files=files, follow_redirects=False)
                assert response.status_code == 400, response.text
                endpoint.assert_nothing_stored()

    def test_a_multipart_form_that_is_not_utf8_is_400_as_an_url_encoded_one_is(
        self, client: TestClient, endpoint: Endpoint
    ) -> None:
        # A page served in windows-1252 without accept-charset="UTF-8" posts its fields in
        # that encoding: read as Latin-1, its apostrophe (0x92) became a control character.
        body = (
            b"--b\r\n"
            b'Content-Disposition: form-data; name="email"\r\n\r\n'
            + endpoint.email.encode()
            + b"\r\n--b\r\n"
            b'Content-Disposition: form-data; name="organisation"\r\n\r\n'
            b"Pr\xe9fecture de l\x92H\xe9rault\r\n--b--\r\n"
        )
        response = client.post(
            endpoint.path,
            content=body,
            headers={"content-type": "multipart/form-data; boundary=b"},
            follow_redirects=False,
        )
        assert "UTF-8" in error_of(response, 400, "invalid_body")
        endpoint.assert_nothing_stored()

    def test_a_compressed_body_is_415_naming_identity(
        self, client: TestClient, endpoint: Endpoint, subtests: pytest.Subtests
    ) -> None:
        # Bodies are read as sent: gzipped JSON was "not valid JSON", and a body labelled
        # `br` but sent plain was taken, its label ignored.
        plain = f'{{"email": "{endpoint.email}"}}'.encode()
        form = urlencode({"email": endpoint.email}).encode()
        bodies = {
            "gzipped json": (JSON_TYPE, gzip.compress(plain), "gzip"),
            "gzipped form": (FORM_TYPE, gzip.compress(form), "gzip"),
            "plain json labelled br": (JSON_TYPE, plain, "br"),
            "plain form labelled gzip after identity": (FORM_TYPE, form, "identity, gzip"),
        }
        for name, (headers, body, coding) in bodies.items():
            with subtests.test(name):
                response = client.post(
                    endpoint.path,
                    content=body,
                    headers={**headers, "content-encoding": coding},
                    follow_redirects=False,
                )
                detail = error_of(response, 415, "unsupported_media_type")
                assert "Content-Encoding" in detail
                assert response.headers["accept-encoding"] == "identity"
                endpoint.assert_nothing_stored()
        with subtests.test("multipart, gzipped"):
            response = client.post(
                endpoint.path,
                content=gzip.compress(
                    b'--b\r\nContent-Disposition: form-data; name="email"\r\n\r\n'
                    + endpoint.email.encode()
                    + b"\r\n--b--\r\n"
                ),
                headers={
                    "content-type": "multipart/form-data; boundary=b",
                    "content-encoding": "gzip",
                },
                follow_redirects=False,
            )
            error_of(response, 415, "unsupported_media_type")
            endpoint.assert_nothing_stored()
        with subtests.test("identity"):
            response = client.post(
                endpoint.path, content=plain, headers={**JSON_TYPE, "content-encoding": "Identity"}
            )
            assert response.status_code == 202, response.text

    def test_json_with_a_charset_parameter_is_read(
        self, client: TestClient, settings: Settings
    ) -> None:
        response = client.post(
            SUBSCRIBE,
            content=b'{"email": "charset@example.org"}',
            headers={"content-type": "Application/JSON; charset=utf-8"},
        )
        assert response.status_code == 202
        assert count_rows(settings.database_url, "subscription") == 1

    def test_a_body_behind_a_utf8_byte_order_mark_is_read_as_a_form_and_as_json(
        self, client: TestClient, settings: Settings, subtests: pytest.Subtests
    ) -> None:
        bom = b"\xef\xbb\xbf"
        bodies = {
            "form": (FORM_TYPE, bom + b"email=bom-form%40example.org"),
            "json": (JSON_TYPE, bom + b'{"email": "bom-json@example.org"}'),
        }
        for n, (kind, (headers, body)) in enumerate(bodies.items(), start=1):
            with subtests.test(kind):
                response = client.post(
                    SUBSCRIBE, content=body, headers=headers, follow_redirects=False
                )
                assert response.status_code in (202, 303), response.text
                assert count_rows(settings.database_url, "subscription") == n


class TestBodyLimit:
    def test_a_body_over_the_limit_with_content_length_is_413(
        self, client: TestClient, endpoint: Endpoint, settings: Settings
    ) -> None:
        padding = "x" * settings.max_body_bytes
        response = client.post(endpoint.path, json={"email": endpoint.email, "pad": padding})
        assert int(response.request.headers["content-length"]) > settings.max_body_bytes
        detail = error_of(response, 413, "payload_too_large")
        assert detail == (
            f"The request body is larger than {settings.max_body_bytes} bytes, the most this "
            "route takes."
        )
        endpoint.assert_nothing_stored()

    def test_a_streamed_body_over_the_limit_without_content_length_is_413(
        self, client: TestClient, endpoint: Endpoint, settings: Settings
    ) -> None:
        def chunks() -> Iterator[bytes]:
            yield f'{{"email": "{endpoint.email}", "pad": "'.encode()
            for _ in range(settings.max_body_bytes // 1024 + 2):
                yield b"x" * 1024
            yield b'"}'

        response = client.post(endpoint.path, content=chunks(), headers=JSON_TYPE)
        assert "content-length" not in response.request.headers
        assert response.request.headers["transfer-encoding"] == "chunked"
        error_of(response, 413, "payload_too_large")
        endpoint.assert_nothing_stored()

    def test_a_streamed_body_over_the_limit_is_413_over_a_real_server(
        self, settings: Settings, empty_database: str
    ) -> None:
        def chunks() -> Iterator[bytes]:
            yield b'{"email": "stream@example.org", "pad": "'
            for _ in range(settings.max_body_bytes // 1024 + 2):
                yield b"x" * 1024
            yield b'"}'

        with (
            LiveServer(create_app(settings)) as base_url,
            httpx.Client(base_url=base_url, timeout=10, trust_env=False) as http,
        ):
            response = http.post(SUBSCRIBE, content=chunks(), headers=JSON_TYPE)
        assert "content-length" not in response.request.headers
        error_of(response, 413, "payload_too_large")


CONTROL_CHARACTERS = {
    "email-crlf-header-injection": {"email": "new@example.org\r\nBcc: victim@example.org"},
    "email-lf": {"email": "new@example.org\n"},
    "email-nul": {"email": "new\x00@example.org"},
    "email-tab-inside": {"email": "new\t@example.org"},
    "locale-crlf": {"email": "new@example.org", "locale": "fr\r\n"},
    "locale-nul": {"email": "new@example.org", "locale": "fr\x00"},
    "attribute-value-crlf": {"email": "new@example.org", "attributes": {"org": "DINUM\r\nX: y"}},
    "attribute-value-nul": {"email": "new@example.org", "attributes": {"org": "DI\x00NUM"}},
    "attribute-name-crlf": {"email": "new@example.org", "attributes": {"org\r\nx": "DINUM"}},
    "attribute-name-nul": {"email": "new@example.org", "attributes": {"org\x00": "DINUM"}},
}


class TestSubscribeValidation:
    def test_line_breaks_and_nul_in_any_field_are_422(
        self, client: TestClient, empty_database: str, subtests: pytest.Subtests
    ) -> None:
        for name, payload in CONTROL_CHARACTERS.items():
            with subtests.test(name):
                detail = error_of(client.post(SUBSCRIBE, json=payload), 422, "validation_error")
                field = name.split("-")[0]
                assert detail.startswith(field), detail

    def test_line_breaks_and_nul_in_a_form_post_are_422(
        self, client: TestClient, empty_database: str, subtests: pytest.Subtests
    ) -> None:
        bodies = {
            "email-crlf": "email=new%40example.org%0D%0ABcc%3A+victim%40example.org",
            "email-nul": "email=new%00%40example.org",
            "locale-crlf": "email=new%40example.org&locale=fr%0D%0A",
        }
        for name, body in bodies.items():
            with subtests.test(name):
                response = client.post(SUBSCRIBE, content=body, headers=FORM_TYPE)
                detail = error_of(response, 422, "validation_error")
                assert detail.startswith(name.split("-")[0]), detail

    def test_an_unknown_locale_is_422(self, client: TestClient, empty_database: str) -> None:
        response = client.post(SUBSCRIBE, json={"email": "new@example.org", "locale": "de"})
        detail = error_of(response, 422, "validation_error")
        assert detail.startswith("locale:")
        assert "'fr'" in detail
        assert "'en'" in detail

    def test_a_language_tag_with_a_region_is_read_as_its_language(
        self, client: TestClient, smtp: SmtpSink, subtests: pytest.Subtests
    ) -> None:
        # Sites write their page's tag (`<html lang="fr-FR">`) into the form's locale; the
        # list is French, so an English mail shows the tag was read, not ignored.
        for tag in ("en-GB", "en_US", "EN"):
            email = f"{tag.lower().replace('_', '-')}@example.org"
            with subtests.test(f"json {tag}"):
                response = client.post(SUBSCRIBE, json={"email": email, "locale": tag})
                assert response.status_code == 202, response.text
                mail = smtp.mail_to(email, link="confirm")
                assert mail["Subject"] == "Confirm your subscription to Gazette BlueHats"
            with subtests.test(f"form {tag}"):
                form_email = f"form-{email}"
                response = client.post(
                    SUBSCRIBE,
                    content=urlencode({"email": form_email, "locale": tag}),
                    headers={**FORM_TYPE, "accept": "text/html"},
                    follow_redirects=False,
                )
                assert response.status_code == 303, response.text
                assert response.headers["location"].endswith("/thanks?lang=en")
                mail = smtp.mail_to(form_email, link="confirm")
                assert mail["Subject"] == "Confirm your subscription to Gazette BlueHats"

    def test_a_tag_of_a_language_not_spoken_is_still_422(
        self, client: TestClient, empty_database: str
    ) -> None:
        for tag in ("de-DE", "fr-", "french", " fr"):
            response = client.post(SUBSCRIBE, json={"email": "new@example.org", "locale": tag})
            assert error_of(response, 422, "validation_error").startswith("locale:"), tag
        assert stored_rows(empty_database) == dict.fromkeys(STORED, 0)

    def test_too_many_attributes_is_422(self, client: TestClient, empty_database: str) -> None:
        attributes = {f"a{i}": "x" for i in range(21)}
        response = client.post(
            SUBSCRIBE, json={"email": "new@example.org", "attributes": attributes}
        )
        detail = error_of(response, 422, "validation_error")
        assert detail.startswith("attributes:")
        assert "20" in detail

    def test_twenty_attributes_are_accepted(self, client: TestClient, settings: Settings) -> None:
        attributes = {f"a{i}": "x" for i in range(20)}
        response = client.post(
            SUBSCRIBE, json={"email": "new@example.org", "attributes": attributes}
        )
        assert response.status_code == 202
        assert count_rows(settings.database_url, "subscription") == 1

    def test_badly_named_or_oversized_attributes_are_422(
        self, client: TestClient, empty_database: str, subtests: pytest.Subtests
    ) -> None:
        cases = {
            "uppercase": {"Org": "x"},
            "leading-digit": {"1org": "x"},
            "dash": {"o-rg": "x"},
            "name-too-long": {"a" * 64: "x"},
            "value-too-long": {"org": "x" * 501},
            "value-not-a-string": {"org": 1},
            "not-an-object": ["org"],
        }
        for name, attributes in cases.items():
            with subtests.test(name):
                response = client.post(
                    SUBSCRIBE, json={"email": "new@example.org", "attributes": attributes}
                )
                detail = error_of(response, 422, "validation_error")
                assert detail.startswith("attributes")


class TestAddressValidation:
    """Both endpoints that take an address."""

    def test_a_10000_character_address_is_422_too_long(
        self, client: TestClient, endpoint: Endpoint
    ) -> None:
        address = "a" * (10_000 - len("@example.org")) + "@example.org"
        response = client.post(endpoint.path, json={"email": address})
        detail = error_of(response, 422, "validation_error")
        assert detail.startswith("email:")
        assert "at most 1000 characters" in detail
        endpoint.assert_nothing_stored()

    def test_an_address_over_254_characters_is_422_too_long(
        self, client: TestClient, endpoint: Endpoint
    ) -> None:
        address = "a" * 243 + "@example.org"
        assert len(address) == 255
        response = client.post(endpoint.path, json={"email": address})
        detail = error_of(response, 422, "validation_error")
        assert detail == "email: The address is longer than 254 characters."
        endpoint.assert_nothing_stored()

    def test_an_address_over_64_octets_before_the_at_sign_is_422(
        self, client: TestClient, endpoint: Endpoint, subtests: pytest.Subtests
    ) -> None:
        cases = {
            "ascii": ("a" * 65 + "@example.org", "64 characters."),
            "utf-8": ("\u00e9" * 33 + "@example.org", "64 bytes in UTF-8"),
        }
        for name, (address, limit) in cases.items():
            with subtests.test(name):
                response = client.post(endpoint.path, json={"email": address})
                detail = error_of(response, 422, "validation_error")
                assert detail.startswith("email: The part before the @-sign is longer than ")
                assert limit in detail
                endpoint.assert_nothing_stored()

    def test_control_characters_in_a_valid_address_are_422(
        self, client: TestClient, endpoint: Endpoint, subtests: pytest.Subtests
    ) -> None:
        local, domain = endpoint.email.split("@")
        cases = {
            "crlf-header-injection": f"{endpoint.email}\r\nBcc: victim@example.org",
            "trailing-lf": f"{endpoint.email}\n",
            "trailing-nul": f"{endpoint.email}\x00",
            "nul-inside": f"{local}\x00@{domain}",
            "del-inside": f"{local}\x7f@{domain}",
        }
        for name, email in cases.items():
            with subtests.test(name):
                response = client.post(endpoint.path, json={"email": email})
                detail = error_of(response, 422, "validation_error")
                assert detail == "email: The address contains control characters."
                endpoint.assert_nothing_stored()
        with subtests.test("form-crlf"):
            body = f"email={local}%40{domain}%0D%0ABcc%3A+victim%40example.org"
            response = client.post(endpoint.path, content=body, headers=FORM_TYPE)
            error_of(response, 422, "validation_error")
            endpoint.assert_nothing_stored()

    def test_a_missing_email_is_422(
        self, client: TestClient, endpoint: Endpoint, subtests: pytest.Subtests
    ) -> None:
        cases = {
            "empty-json": (JSON_TYPE, b"{}"),
            "json-without-email": (JSON_TYPE, b'{"locale": "fr", "mail": "member@example.org"}'),
            "empty-form": (FORM_TYPE, b""),
            "form-without-email": (FORM_TYPE, b"locale=fr"),
        }
        for name, (headers, body) in cases.items():
            with subtests.test(name):
                response = client.post(endpoint.path, content=body, headers=headers)
                detail = error_of(response, 422, "validation_error")
                assert detail == "email: Field required"
                endpoint.assert_nothing_stored()

    def test_an_empty_or_blank_email_is_422_saying_it_is_empty(
        self, client: TestClient, endpoint: Endpoint, subtests: pytest.Subtests
    ) -> None:
        cases = {
            "json-empty": (JSON_TYPE, b'{"email": ""}'),
            "json-spaces": (JSON_TYPE, b'{"email": "   "}'),
            "form-empty": (FORM_TYPE, b"email="),
            "form-spaces": (FORM_TYPE, b"email=+++"),
        }
        for name, (headers, body) in cases.items():
            with subtests.test(name):
                response = client.post(endpoint.path, content=body, headers=headers)
                detail = error_of(response, 422, "validation_error")
                assert detail == "email: The address is empty."
                endpoint.assert_nothing_stored()

    def test_an_email_that_is_not_an_address_is_422(
        self, client: TestClient, endpoint: Endpoint, subtests: pytest.Subtests
    ) -> None:
        cases: dict[str, object] = {
            "number": 42,
            "null": None,
            "list": [endpoint.email],
            "object": {"address": endpoint.email},
            "empty": "",
            "no-at-sign": endpoint.email.replace("@", ""),
            "two-at-signs": f"a@{endpoint.email}",
        }
        for name, email in cases.items():
            with subtests.test(name):
                response = client.post(endpoint.path, json={"email": email})
                detail = error_of(response, 422, "validation_error")
                assert detail.startswith("email:")
                endpoint.assert_nothing_stored()

    def test_a_browser_form_post_with_a_bad_address_gets_a_page_saying_why(
        self, client: TestClient, empty_database: str
    ) -> None:
        response = client.post(
            SUBSCRIBE,
            content=b"email=not-an-address",
            headers={**FORM_TYPE, "accept": "text/html,application/xhtml+xml"},
            follow_redirects=False,
        )
        assert response.status_code == 422
        assert response.headers["content-type"].startswith("text/html")
        # The form comes back with what was typed and the error tied to the address field.
        assert 'value="not-an-address"' in response.text
        assert 'aria-invalid="true"' in response.text
        assert 'id="field-email-error"' in response.text
        assert "Saisissez une adresse électronique valide" in response.text

    @pytest.mark.parametrize(
        ("typed", "meant"),
        [
            ("Camille Dupont <Camille.Dupont@Example.ORG>", "Camille.Dupont@example.org"),
            ("camille@example.org.", "camille@example.org"),
            ("mailto:camille@example.org", "camille@example.org"),
            ("camille @example.org", "camille@example.org"),
            # Typed with an input method in full-width mode, wholly or in part.
            ("\uff43\uff41\uff4d\uff49\uff4c\uff4c\uff45@example.org", "camille@example.org"),
            (
                "\uff43\uff41\uff4d\uff49\uff4c\uff4c\uff45\uff20\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45\uff0e\uff4f\uff52\uff47",
                "camille@example.org",
            ),
        ],
    )
    def test_an_address_pasted_with_something_around_it_is_named_on_the_page_and_not_stored(
        self, client: TestClient, empty_database: str, typed: str, meant: str
    ) -> None:
        for lang, said in (
            ("fr", f"Vouliez-vous écrire {meant} ? Saisissez l&#39;adresse seule."),
            ("en", f"Did you mean {meant}? Enter the address alone."),
        ):
            response = client.post(
                f"{SUBSCRIBE}?lang={lang}",
                content=urlencode({"email": typed, "locale": lang}).encode(),
                headers={**FORM_TYPE, "accept": "text/html"},
                follow_redirects=False,
            )
            assert response.status_code == 422
            assert said in response.text
            assert 'id="field-email-error"' in response.text
        assert count_rows(empty_database, "subscription") == 0
        assert count_rows(empty_database, "outbox_job") == 0

    def test_an_address_with_nothing_to_suggest_gets_the_plain_message(
        self, client: TestClient
    ) -> None:
        for typed in ("camille@example", "Camille <nobody>", "Camille Dupont camille@example.org"):
            response = client.post(
                SUBSCRIBE,
                content=urlencode({"email": typed}).encode(),
                headers={**FORM_TYPE, "accept": "text/html"},
                follow_redirects=False,
            )
            assert response.status_code == 422
            assert "Saisissez une adresse électronique valide" in response.text
            assert "Vouliez-vous" not in response.text


ODD_TOKENS = {
    "overlong": "A" * 65,
    "very-long": "A" * 4000,
    "nul": "%00",
    "nul-inside": "abc%00def",
    "crlf-header-injection": "abc%0D%0ASet-Cookie:%20x=1",
    "invalid-utf8": "%FF%FE",
    "encoded-surrogate": "%ED%A0%80",
    "rtl-override": "%E2%80%AEabc",
    "emoji": "%F0%9F%92%A5",
    "markup": "%3Cscript%3Ealert(1)%3C%2Fscript%3E",
    "sql": "'%20OR%20'1'='1",
    "dot-dot": "..",
    "encoded-slash": "..%2F..%2Fhealthz",
    "space": "a%20b",
}


class TestOddTokens:
    @pytest.mark.parametrize("link", ["confirm", "unsubscribe"])
    def test_an_odd_token_is_404_for_every_method_and_format(
        self, client: TestClient, empty_database: str, link: str, subtests: pytest.Subtests
    ) -> None:
        for name, token in ODD_TOKENS.items():
            path = f"/v1/{link}/{token}"
            for method in ("GET", "POST"):
                with subtests.test(name, method=method):
                    answer = client.request(method, path, headers=WANTS_JSON)
                    assert answer.status_code == 404, answer.text
                    assert answer.json()["error"] in ("token_not_found", "not_found")
                    page = client.request(method, path, headers={"accept": "text/html"})
                    assert page.status_code == 404, page.text
                    assert page.headers["content-type"].startswith("text/html")
                    assert "<script>" not in page.text
            with subtests.test(name, method="one-click POST"):
                one_click = client.post(
                    path, content=b"List-Unsubscribe=One-Click", headers=FORM_TYPE
                )
                assert one_click.status_code == 404

    def test_the_language_switch_of_an_odd_link_s_page_is_a_clean_url(
        self, client: TestClient, empty_database: str
    ) -> None:
        for raw, encoded in (("%00", "%00"), ("%C3%A9t%C3%A9%20x", "%C3%A9t%C3%A9%20x")):
            page = client.get(f"/v1/confirm/{raw}", headers={"accept": "text/html"})
            assert page.status_code == 404
            assert "\x00" not in page.text
            assert f'href="/v1/confirm/{encoded}?lang=en"' in page.text

    def test_odd_tokens_are_404_over_a_real_server(
        self, settings: Settings, empty_database: str
    ) -> None:
        with (
            LiveServer(create_app(settings)) as base_url,
            httpx.Client(base_url=base_url, timeout=10, trust_env=False) as http,
        ):
            answers = {
                (name, link, method): http.request(method, f"/v1/{link}/{token}").status_code
                for name, token in ODD_TOKENS.items()
                for link in ("confirm", "unsubscribe")
                for method in ("GET", "POST")
            }
        assert {key: status for key, status in answers.items() if status != 404} == {}

    def test_a_confirm_token_does_not_unsubscribe(
        self, client: TestClient, smtp: SmtpSink, settings: Settings
    ) -> None:
        assert client.post(SUBSCRIBE, json={"email": "swap@example.org"}).status_code == 202
        token = link_in(smtp.mail_to("swap@example.org", link="confirm"), "confirm").rsplit("/")[-1]
        response = client.post(f"/v1/unsubscribe/{token}", headers=WANTS_JSON)
        error_of(response, 404, "token_not_found")
        assert count_rows(settings.database_url, "subscription WHERE status = 'pending'") == 1

    def test_a_one_click_post_with_too_many_fields_is_not_a_crash(
        self, client: TestClient, empty_database: str
    ) -> None:
        body = "&".join(["List-Unsubscribe=One-Click"] + [f"f{i}=x" for i in range(60)])
        response = client.post("/v1/unsubscribe/abc", content=body, headers=FORM_TYPE)
        assert response.status_code == 404


class TestMethods:
    @pytest.mark.parametrize(
        ("path", "allowed"),
        [
            ("/healthz", "GET, HEAD"),
            (SUBSCRIBE, "POST"),
            # Two routes at one path: each names the other's method too.
            ("/v1/confirm/abc", "GET, HEAD, POST"),
            ("/v1/lists/bluehats", "GET, HEAD"),
            ("/v1/admin/blocks", "GET, HEAD, POST"),
            ("/v1/admin/blocks/1", "DELETE"),
            # A mounted app's own 405.
            ("/static/style.css", "GET, HEAD"),
        ],
    )
    def test_a_method_not_allowed_names_the_allowed_ones(
        self, client: TestClient, empty_database: str, path: str, allowed: str
    ) -> None:
        response = client.request("PATCH", path, headers=WANTS_JSON)
        error_of(response, 405, "method_not_allowed")
        assert response.headers["allow"] == allowed

    def test_head_answers_as_get_without_a_body_over_a_real_server(
        self, settings: Settings, empty_database: str
    ) -> None:
        with (
            LiveServer(create_app(settings)) as base_url,
            httpx.Client(base_url=base_url, timeout=10, trust_env=False) as http,
        ):
            for path in ("/healthz", "/v1/lists/bluehats", "/v1/confirm/abc", "/nowhere"):
                get, head = http.get(path), http.head(path)
                assert (path, head.status_code) == (path, get.status_code)
                assert head.content == b""
                assert head.headers["content-type"] == get.headers["content-type"]
                assert get.content
            refused = http.head(SUBSCRIBE)
        assert refused.status_code == 405
        assert refused.headers["allow"] == "POST"
        assert stored_rows(settings.database_url) == dict.fromkeys(STORED, 0)


class TestSecurityHeaders:
    def _assert_page_headers(self, name: str, response: httpx.Response) -> None:
        assert response.headers["content-type"].startswith("text/html"), name
        csp = response.headers["content-security-policy"]
        for directive in ("default-src 'none'", "frame-ancestors 'none'", "base-uri 'none'"):
            assert directive in csp, (name, csp)
        assert "script-src" not in csp, (name, csp)
        assert "form-action 'self'" in csp, (name, csp)
        assert response.headers["x-content-type-options"] == "nosniff", name
        assert response.headers["referrer-policy"] == "strict-origin", name
        assert response.headers["cache-control"] == "no-store", name

    def test_every_v1_page_carries_csp_nosniff_no_referrer_and_no_store(
        self, client: TestClient, smtp: SmtpSink
    ) -> None:
        confirm_member(client, smtp, MEMBER)
        assert client.post(UNSUBSCRIBE, json={"email": MEMBER}).status_code == 202
        unsubscribe_link = link_in(smtp.mail_to(MEMBER, link="unsubscribe"), "unsubscribe")
        assert client.post(SUBSCRIBE, json={"email": "pending@example.org"}).status_code == 202
        confirm_link = link_in(smtp.mail_to("pending@example.org", link="confirm"), "confirm")

        pages = {
            "confirm page": client.get(confirm_link),
            "confirmed page": client.post(confirm_link, headers={"accept": "text/html"}),
            "unsubscribe page": client.get(unsubscribe_link),
            "unsubscribed page": client.post(unsubscribe_link, headers={"accept": "text/html"}),
            "thanks page": client.get("/v1/lists/bluehats/thanks?lang=en"),
            "unknown token page": client.get("/v1/confirm/unknown"),
            "used token page": client.post(confirm_link, headers={"accept": "text/html"}),
        }
        statuses = {name: response.status_code for name, response in pages.items()}
        assert statuses == {
            "confirm page": 200,
            "confirmed page": 200,
            "unsubscribe page": 200,
            "unsubscribed page": 200,
            "thanks page": 200,
            "unknown token page": 404,
            "used token page": 409,
        }
        for name, response in pages.items():
            self._assert_page_headers(name, response)

    def test_the_forms_may_be_shown_again_on_back_but_are_never_kept_by_a_proxy(
        self, client: TestClient
    ) -> None:
        """A form sent back after a post was `no-store`: Back to it from the next page was
        a "Confirm Form Resubmission" dead end in Chrome. None of them holds a token."""
        html = {"accept": "text/html"}
        pages = {
            "subscription form": client.get("/v1/lists/bluehats", headers=html),
            "form sent back": client.post(SUBSCRIBE, data={"email": "typo@exemple"}, headers=html),
            "unsubscribe form": client.get("/v1/lists/bluehats/unsubscribe", headers=html),
            "unsubscribe form sent back": client.post(
                "/v1/lists/bluehats/unsubscriptions", data={"email": "nope"}, headers=html
            ),
        }
        statuses = {name: response.status_code for name, response in pages.items()}
        assert statuses == {
            "subscription form": 200,
            "form sent back": 422,
            "unsubscribe form": 200,
            "unsubscribe form sent back": 422,
        }
        for name, response in pages.items():
            assert response.headers["cache-control"] == "private, no-cache", name

    def test_a_service_published_over_https_tells_browsers_to_keep_to_https(
        self, database_url: str, smtp: SmtpSink, client: TestClient
    ) -> None:
        # A link typed or followed as http:// would cross the network in clear, token
        # included, before any redirect to HTTPS could help.
        settings = make_settings(
            database_url, smtp_port=smtp.port, public_url="https://newsletter.example.org"
        )
        with TestClient(create_app(settings), base_url="https://newsletter.example.org") as tls:
            for path in ("/v1/lists/bluehats", "/v1/confirm/unknown", "/healthz", "/nowhere"):
                response = tls.get(path)
                assert response.headers["strict-transport-security"] == "max-age=31536000", path
        # Published over plain HTTP (a laptop's `make run`): no promise it could not keep.
        assert "strict-transport-security" not in client.get("/v1/lists/bluehats").headers

    def test_json_answers_under_v1_are_not_cached_or_sniffed(
        self, client: TestClient, empty_database: str
    ) -> None:
        response = client.post(SUBSCRIBE, json={"email": "bad"})
        assert response.status_code == 422
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "strict-origin"


class TestAdminBodies:
    """The admin routes' JSON bodies, which FastAPI parses: the same answers as the public
    routes' for an unreadable body or another content type, not a 422 about a field."""

    BLOCKS = "/v1/admin/blocks"
    BLOCK = b'{"kind": "domain", "value": "example.net", "reason": "spam"}'

    def test_unreadable_json_is_400_invalid_body(
        self, client: TestClient, write_key: dict[str, str], subtests: pytest.Subtests
    ) -> None:
        bodies = {
            "truncated": (self.BLOCK[:-1], "not valid JSON"),
            "not UTF-8": (self.BLOCK.replace(b"spam", b"sp\xe9m"), "not valid JSON in UTF-8"),
            "nested": (b'{"reason": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
        }
        for kind, (body, message) in bodies.items():
            with subtests.test(kind):
                response = client.post(
                    self.BLOCKS, content=body, headers={**write_key, **JSON_TYPE}
                )
                assert message in error_of(response, 400, "invalid_body")
        assert client.get(self.BLOCKS, headers=write_key).json() == []

    def test_no_body_or_json_that_is_not_an_object_is_400_as_on_the_public_routes(
        self, client: TestClient, write_key: dict[str, str], subtests: pytest.Subtests
    ) -> None:
        # FastAPI said 422 "Field required" naming no field, or "Input should be a valid
        # dictionary": a payload's validation, of a body that has no fields at all.
        bodies = {
            "no body": (b"", {}, "The body is empty: send a JSON object."),
            "null": (b"null", JSON_TYPE, "The body must be a JSON object."),
            "array": (b"[" + self.BLOCK + b"]", JSON_TYPE, "The body must be a JSON object."),
            "string": (b'"spam"', JSON_TYPE, "The body must be a JSON object."),
            "number": (b"1", JSON_TYPE, "The body must be a JSON object."),
        }
        for kind, (body, headers, message) in bodies.items():
            with subtests.test(kind):
                response = client.post(self.BLOCKS, content=body, headers={**write_key, **headers})
                assert error_of(response, 400, "invalid_body") == message
        assert client.get(self.BLOCKS, headers=write_key).json() == []

    def test_a_body_in_another_content_type_is_415(
        self, client: TestClient, write_key: dict[str, str], subtests: pytest.Subtests
    ) -> None:
        # curl's `-d` sends a form, whatever the body holds.
        for content_type in (FORM_TYPE["content-type"], "text/plain", None):
            with subtests.test(str(content_type)):
                headers = {**write_key}
                if content_type is not None:
                    headers["content-type"] = content_type
                response = client.post(self.BLOCKS, content=self.BLOCK, headers=headers)
                detail = error_of(response, 415, "unsupported_media_type")
                assert detail == "Send the body as application/json."
        with subtests.test("another charset"):
            headers = {**write_key, "content-type": "application/json; charset=iso-8859-1"}
            response = client.post(self.BLOCKS, content=self.BLOCK, headers=headers)
            error_of(response, 415, "unsupported_media_type")
        assert client.get(self.BLOCKS, headers=write_key).json() == []
        response = client.post(self.BLOCKS, content=self.BLOCK, headers={**write_key, **JSON_TYPE})
        assert response.status_code == 201, response.text

    def test_a_compressed_body_is_415_naming_identity(
        self, client: TestClient, write_key: dict[str, str]
    ) -> None:
        headers = {**write_key, **JSON_TYPE, "content-encoding": "gzip"}
        response = client.post(self.BLOCKS, content=gzip.compress(self.BLOCK), headers=headers)
        assert "Content-Encoding" in error_of(response, 415, "unsupported_media_type")
        assert response.headers["accept-encoding"] == "identity"
        assert client.get(self.BLOCKS, headers=write_key).json() == []

    def test_every_admin_route_with_a_json_body_documents_the_415(self, client: TestClient) -> None:
        document = client.get("/openapi.json").json()
        routes = [
            (path, method)
            for path, operations in document["paths"].items()
            for method, operation in operations.items()
            if path.startswith("/v1/admin/")
            and "application/json" in operation.get("requestBody", {}).get("content", {})
        ]
        assert len(routes) == 5, routes
        for path, method in routes:
            assert "415" in document["paths"][path][method]["responses"], (path, method)
