"""Hostile input against every public operation: no server error, nothing stored, no mail.

The operations come from the app's own OpenAPI document (everything not under
/v1/admin), so a new public route is covered the day it is added. Each hostile value goes
into every path parameter, into the query string, into every body field (JSON and form),
and into the request headers; bodies also come as invalid UTF-8, in wrong content types
and as oversized JSON. Every value is one the service must refuse (a hostile address is
never a valid one), so "nothing stored" is exact: the row count of every table is
unchanged, and the SMTP sink received nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest
from fastapi.testclient import TestClient
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, Router

from app.config import Settings
from app.main import create_app
from app.middleware import SlashRedirect, relative_location
from tests.conftest import TABLES, SmtpSink, count_rows, make_settings

HOSTILE: dict[str, str] = {
    "crlf": "camille@example.org\r\nBcc: victim@example.org",
    "lf-header": "x\nSet-Cookie: a=b",
    "nul": "camille\x00@example.org",
    "overlong": "a" * 5000 + "@example.org",
    "cyrillic-homoglyph": "\u0441\u0430mille@example.org",
    "cyrillic-domain": "camille@ex\u0430mple.org",
    "greek-homoglyph": "\u03bfscar@example.org",
    "rtl-override": "camille\u202e@example.org",
    "zero-width": "cam\u200bille@example.org",
    "bom": "\ufeffcamille@example.org",
    "sql-quote": "a' OR '1'='1'--@example.org",
    "sql-drop": "x'); DROP TABLE subscription;--",
    "sql-quoted-local": '"\'; DROP TABLE subscription;--"@example.org',
    "html-script": "<script>alert(1)</script>@example.org",
    "html-attribute": '"><img src=x onerror=alert(1)>',
    "path-traversal": "../../../etc/passwd",
    "format-string": "%s%s%n{0}{email}",
    "lone-surrogate-escape": "\\ud800",
    "emoji": "\U0001f4a5@\U0001f4a5.org",
    "special-use-domain": "camille@example.test",
    "empty": "",
}
INVALID_UTF8 = (b"\xff\xfe", b"\xed\xa0\x80", b"\xc0\xaf")
WRONG_TYPES = (
    "text/plain",
    "application/xml",
    "text/html",
    "multipart/form-data; boundary=xyz",
    "application/json; charset=utf-7",
    "application/x-www-form-urlencoded; charset=latin-1",
    "image/png",
    "*/*",
    ";;;",
)
HEADERS = (
    "accept-language",
    "user-agent",
    "referer",
    "origin",
    "x-forwarded-for",
    "accept",
    "cookie",
    "authorization",
)


@dataclass
class Operation:
    method: str
    path: str
    params: list[str] = field(default_factory=list)
    query: list[str] = field(default_factory=list)
    body_fields: list[str] = field(default_factory=list)
    has_body: bool = False

    def url(self, **values: str) -> str:
        url = self.path
        for name in self.params:
            url = url.replace("{" + name + "}", quote(values.get(name, "bluehats"), safe=""))
        return url


def public_operations(document: dict[str, Any]) -> list[Operation]:
    operations = []
    for path, methods in document["paths"].items():
        if path.startswith("/v1/admin"):
            continue
        for method, spec in methods.items():
            parameters = spec.get("parameters", [])
            body = spec.get("requestBody", {}).get("content", {})
            fields: set[str] = set()
            for media in body.values():
                fields.update(media.get("schema", {}).get("properties", {}))
            operations.append(
                Operation(
                    method=method.upper(),
                    path=path,
                    params=[p["name"] for p in parameters if p["in"] == "path"],
                    query=[p["name"] for p in parameters if p["in"] == "query"],
                    body_fields=sorted(fields) or ["email"],
                    has_body=method.upper() in ("POST", "PUT", "PATCH"),
                )
            )
    return operations


@dataclass
class Probe:
    client: TestClient
    settings: Settings
    smtp: SmtpSink
    before: dict[str, int]
    server_errors: list[str] = field(default_factory=list)
    sent: int = 0

    def send(self, label: str, method: str, url: str, **kwargs: Any) -> httpx.Response:
        response = self.client.request(method, url, follow_redirects=False, **kwargs)
        self.sent += 1
        if response.status_code >= 500:
            self.server_errors.append(f"{label}: {method} {url[:120]} -> {response.status_code}")
        return response

    def assert_nothing_happened(self) -> None:
        assert self.server_errors == []
        after = {table: count_rows(self.settings.database_url, table) for table in TABLES}
        assert after == self.before
        assert self.smtp.messages == []


@pytest.fixture
def probe(database_url: str, smtp: SmtpSink) -> Iterator[Probe]:
    # The origin check on, so its parsing meets the corpus too. Proof of work stays off: it
    # would refuse a request the corpus wrongly let through, hiding what it stored.
    settings = make_settings(
        database_url,
        smtp_port=smtp.port,
        allowed_origins=["https://code.gouv.fr"],
    )
    with TestClient(create_app(settings)) as client:
        before = {table: count_rows(database_url, table) for table in TABLES}
        assert before["mailing_list"] >= 1
        yield Probe(client=client, settings=settings, smtp=smtp, before=before)


@pytest.fixture
def operations(probe: Probe) -> list[Operation]:
    found = public_operations(probe.client.app.openapi())  # type: ignore[attr-defined]
    paths = {operation.path for operation in found}
    # The enumeration is real: the public routes this corpus was written against are in it.
    assert {
        "/v1/lists/{slug}/subscriptions",
        "/v1/lists/{slug}/unsubscriptions",
        "/v1/confirm/{token}",
        "/v1/unsubscribe/{token}",
        "/v1/webhooks/mailgun",
        "/v1/challenge",
    } <= paths
    assert not any(path.startswith("/v1/admin") for path in paths)
    return found


def json_body(operation: Operation, value: object) -> bytes:
    return json.dumps(dict.fromkeys(operation.body_fields, value)).encode()


class TestHostileInput:
    def test_path_parameters(self, probe: Probe, operations: list[Operation]) -> None:
        for operation in operations:
            for name in operation.params:
                for label, value in HOSTILE.items():
                    probe.send(
                        f"path {name}={label}", operation.method, operation.url(**{name: value})
                    )
                for raw in ("%FF%FE", "%00", "%0D%0A", "..%2F..%2Fhealthz", "%E2%80%AE"):
                    url = operation.path.replace("{" + name + "}", raw)
                    for other in operation.params:
                        url = url.replace("{" + other + "}", "bluehats")
                    probe.send(f"raw path {name}={raw}", operation.method, url)
        probe.assert_nothing_happened()

    def test_query_strings(self, probe: Probe, operations: list[Operation]) -> None:
        for operation in operations:
            names = [*operation.query, "lang", "email", "token"]
            for label, value in HOSTILE.items():
                query = urlencode(dict.fromkeys(names, value))
                probe.send(f"query {label}", operation.method, f"{operation.url()}?{query}")
            for raw in ("lang=%FF", "lang=%00&lang=%0D%0A", "&&&==", "a=" + "b" * 8000):
                probe.send(f"raw query {raw[:10]}", operation.method, f"{operation.url()}?{raw}")
        probe.assert_nothing_happened()

    def test_json_and_form_bodies(self, probe: Probe, operations: list[Operation]) -> None:
        for operation in [op for op in operations if op.has_body]:
            url = operation.url()
            for label, value in HOSTILE.items():
                probe.send(
                    f"json {label}",
                    "POST",
                    url,
                    content=json_body(operation, value),
                    headers={"content-type": "application/json"},
                )
                form = urlencode(dict.fromkeys(operation.body_fields, value)).encode()
                probe.send(
                    f"form {label}",
                    "POST",
                    url,
                    content=form,
                    headers={"content-type": "application/x-www-form-urlencoded"},
                )
                # The address in a nested structure, where a string is expected.
                for nested in ([value], {"email": value}, {"$ne": None}):
                    probe.send(
                        f"json nested {label}",
                        "POST",
                        url,
                        content=json_body(operation, nested),
                        headers={"content-type": "application/json"},
                    )
        probe.assert_nothing_happened()

    def test_invalid_utf8_and_wrong_content_types(
        self, probe: Probe, operations: list[Operation]
    ) -> None:
        for operation in [op for op in operations if op.has_body]:
            url = operation.url()
            for raw in INVALID_UTF8:
                for kind in ("application/json", "application/x-www-form-urlencoded"):
                    if kind == "application/json":
                        body = b'{"email": "' + raw + b'@example.org"}'
                    else:
                        body = b"email=" + raw + b"%40example.org"
                    probe.send(
                        f"utf8 {kind}", "POST", url, content=body, headers={"content-type": kind}
                    )
            valid_looking = b'{"email": "camille@example.org"}'
            for kind in WRONG_TYPES:
                probe.send(
                    f"type {kind}",
                    "POST",
                    url,
                    content=valid_looking,
                    headers={"content-type": kind},
                )
            probe.send("no type", "POST", url, content=valid_looking)
        probe.assert_nothing_happened()

    def test_huge_json(self, probe: Probe, operations: list[Operation]) -> None:
        limit = probe.settings.max_body_bytes
        bodies = {
            "deep nesting under the size cap": b"[" * 6000 + b"]" * 6000,
            "deep nesting inside the address": b'{"email": '
            + b"{" * 0
            + b"[" * 5000
            + b"]" * 5000
            + b"}",
            "deep nesting over the size cap": b"[" * (limit + 10),
            "long array": b'{"email": [' + b"0," * (limit // 2 - 20) + b"0]}",
            "big integer": b'{"email": ' + b"9" * 5000 + b"}",
            "big float": b'{"email": 1e999999}',
            "nan": b'{"email": NaN}',
            "many keys": b"{" + b",".join(b'"k%d": 1' % i for i in range(limit // 12)) + b"}",
            "duplicate keys": b'{"email": "a@example.test", "email": "<x>"}',
        }
        for operation in [op for op in operations if op.has_body]:
            for label, body in bodies.items():
                response = probe.send(
                    f"huge {label}",
                    "POST",
                    operation.url(),
                    content=body,
                    headers={"content-type": "application/json"},
                )
                assert response.status_code in (400, 403, 404, 406, 413, 415, 422), (
                    label,
                    operation.path,
                    response.status_code,
                )
        probe.assert_nothing_happened()

    def test_headers(self, probe: Probe, operations: list[Operation]) -> None:
        def header_value(value: str) -> bytes:
            # An HTTP client cannot put CR, LF or NUL in a header; the rest goes as UTF-8.
            return value.replace("\r", "").replace("\n", " ").replace("\x00", "").encode()

        for operation in operations:
            # A body the service refuses, so the headers meet every step before that one.
            body = json_body(operation, HOSTILE["crlf"]) if operation.has_body else None
            for label, value in [*HOSTILE.items(), ("latin-1", "")]:
                raw = header_value(value) if label != "latin-1" else b"\xff\xfe\xe9"
                headers: dict[str, str | bytes] = {"content-type": "application/json"}
                headers.update(dict.fromkeys(HEADERS, raw))
                probe.send(
                    f"headers {label}",
                    operation.method,
                    operation.url(),
                    content=body,
                    headers=headers,
                )
        # One header at a time, where each is read: the subscribe route.
        subscribe = next(op for op in operations if op.path.endswith("/subscriptions"))
        body = json_body(subscribe, HOSTILE["crlf"])
        for name in HEADERS:
            for label, value in HOSTILE.items():
                probe.send(
                    f"header {name} {label}",
                    "POST",
                    subscribe.url(),
                    content=body,
                    headers={"content-type": "application/json", name: header_value(value)},
                )
        probe.assert_nothing_happened()

    def test_a_browser_sees_hostile_input_escaped(self, probe: Probe) -> None:
        response = probe.send(
            "page",
            "POST",
            "/v1/lists/bluehats/subscriptions",
            content=urlencode({"email": HOSTILE["html-script"]}).encode(),
            headers={
                "content-type": "application/x-www-form-urlencoded",
                "accept": "text/html",
                "accept-language": '"><script>alert(1)</script>',
            },
        )
        assert response.status_code == 422
        assert response.headers["content-type"].startswith("text/html")
        assert "<script>" not in response.text
        probe.assert_nothing_happened()


class TestWhatTheCorpusFound:
    def test_a_body_declared_in_another_charset_is_415(self, probe: Probe) -> None:
        response = probe.send(
            "utf-7",
            "POST",
            "/v1/lists/bluehats/subscriptions",
            content=b'{"email": "camille@example.org"}',
            headers={"content-type": "application/json; charset=utf-7"},
        )
        assert response.status_code == 415
        assert response.json()["detail"] == "Send the body in UTF-8 (or without a charset)."
        utf8 = probe.send(
            "utf-8",
            "POST",
            "/v1/lists/bluehats/subscriptions",
            content=b'{"email": "camille@example.org"}',
            headers={"content-type": 'application/json; charset="UTF-8"'},
        )
        assert utf8.status_code == 202

    def test_look_alike_addresses_are_refused_and_single_script_ones_accepted(
        self, probe: Probe
    ) -> None:
        for email in (HOSTILE["cyrillic-homoglyph"], HOSTILE["cyrillic-domain"]):
            response = probe.send(
                "homoglyph", "POST", "/v1/lists/bluehats/subscriptions", json={"email": email}
            )
            assert response.status_code == 422
            assert "look alike" in response.json()["detail"]
        for email in (
            "\u0438\u0432\u0430\u043d@example.org",
            "ivan.\u0438\u0432\u0430\u043d@example.org",
        ):
            response = probe.send(
                "cyrillic", "POST", "/v1/lists/bluehats/subscriptions", json={"email": email}
            )
            assert response.status_code == 202, response.text

    def test_a_list_name_with_a_nul_is_an_unknown_list(self, probe: Probe) -> None:
        response = probe.send(
            "nul slug",
            "POST",
            "/v1/lists/blue%00hats/subscriptions",
            json={"email": "a@example.org"},
        )
        assert response.status_code == 404
        assert response.json()["error"] == "list_not_found"


FORGED_HOST = {"host": "evil.example"}


class TestTrailingSlashRedirect:
    """A path with a trailing slash too many (or too few) is redirected to the route's own
    path by a relative Location, never by one built from the Host header, which the client
    chooses (RFC 9110 §7.2: a forged Host meant a redirect to that host, cached for all)."""

    def test_a_forged_host_is_not_written_into_the_redirect(self, client: TestClient) -> None:
        redirect = client.post(
            "/v1/lists/bluehats/subscriptions/?source=site&next=%2Fa%20b",
            json={"email": "slash@example.org"},
            headers=FORGED_HOST,
            follow_redirects=False,
        )
        assert redirect.status_code == 307  # method and body kept
        assert redirect.headers["location"] == (
            "/v1/lists/bluehats/subscriptions?source=site&next=%2Fa%20b"
        )
        health = client.get("/healthz/", headers=FORGED_HOST, follow_redirects=False)
        assert (health.status_code, health.headers["location"]) == (307, "/healthz")

    def test_the_redirect_leads_to_the_route_with_the_same_post(
        self, client: TestClient, smtp: SmtpSink
    ) -> None:
        answer = client.post(
            "/v1/lists/bluehats/subscriptions/",
            json={"email": "slash@example.org"},
            headers=FORGED_HOST,
        )
        assert [step.status_code for step in answer.history] == [307]
        assert answer.status_code == 202
        assert smtp.wait_for(1)[0]["To"] == "slash@example.org"

    def test_a_doubled_leading_slash_leads_nowhere_else(self, client: TestClient) -> None:
        # httpx would read "//evil.example/" alone as another host: the full URL keeps it a path.
        answer = client.get(
            "http://testserver//evil.example/", headers=FORGED_HOST, follow_redirects=False
        )
        assert answer.status_code == 404
        assert "location" not in answer.headers

    def test_a_routed_path_with_a_doubled_leading_slash_is_not_another_host_s(self) -> None:
        # No route of the service matches a path starting with `//`; one that takes any path
        # would, and its redirect must stay on this host.
        def echo(request: Request) -> PlainTextResponse:
            return PlainTextResponse(request.path_params["rest"])

        router = Router(routes=[Route("/{rest:path}/end", echo)], redirect_slashes=False)
        router.default = SlashRedirect(router.routes, fallback=router.default)
        with TestClient(router) as client:
            answer = client.get(
                "http://testserver//evil.example/end/?q=1",
                headers=FORGED_HOST,
                follow_redirects=False,
            )
            assert answer.status_code == 307
            assert answer.headers["location"] == "/%2Fevil.example/end?q=1"
            followed = client.get("http://testserver" + answer.headers["location"])
            assert followed.text == "/evil.example"

    @pytest.mark.parametrize(
        ("path", "query", "location"),
        [
            ("/v1/lists/bluehats", b"", "/v1/lists/bluehats"),
            ("/v1/lists/bluehats", b"a=1&b=%2F", "/v1/lists/bluehats?a=1&b=%2F"),
            ("//evil.example", b"", "/%2Fevil.example"),
            ("///evil.example", b"", "/%2F/evil.example"),
            ("/\\evil.example", b"", "/%5Cevil.example"),
            ("/a b/%/é", b'x=<"y">#', "/a%20b/%25/%C3%A9?x=%3C%22y%22%3E%23"),
        ],
    )
    def test_the_location_is_a_path_on_this_host(
        self, path: str, query: bytes, location: str
    ) -> None:
        assert relative_location(path, query) == location
