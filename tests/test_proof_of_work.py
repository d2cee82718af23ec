"""Optional proof of work: off by default; when on, subscribe and unsubscribe-by-address
need a fresh challenge from GET /v1/challenge, solved, used once."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session

from app import errors, proofofwork
from app.config import Settings
from app.main import create_app
from app.models import utcnow
from tests.conftest import SmtpSink, count_rows, make_settings

SUBSCRIBE = "/v1/lists/bluehats/subscriptions"
UNSUBSCRIBE = "/v1/lists/bluehats/unsubscriptions"
FORM = {"content-type": "application/x-www-form-urlencoded", "accept": "application/json"}
BITS = 8
POW_JS = Path(__file__).resolve().parent.parent / "app" / "static" / "pow.js"


@pytest.fixture
def pow_settings(database_url: str, smtp: SmtpSink) -> Settings:
    return make_settings(database_url, smtp_port=smtp.port, proof_of_work_bits=BITS)


@pytest.fixture
def pow_client(pow_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(pow_settings)) as client:
        yield client


def solved(client: TestClient) -> dict[str, str]:
    issued = client.get("/v1/challenge").json()
    assert issued["bits"] == BITS
    return {
        "pow_challenge": issued["challenge"],
        "pow_nonce": proofofwork.solve(issued["challenge"], issued["bits"]),
    }


def error_code(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]


class TestOffByDefault:
    def test_the_setting_is_off_and_requests_need_no_proof(
        self, client: TestClient, settings: Settings
    ) -> None:
        assert Settings().proof_of_work_bits == 0
        assert client.post(SUBSCRIBE, json={"email": "plain@example.org"}).status_code == 202
        assert count_rows(settings.database_url, "subscription") == 1
        issued = client.get("/v1/challenge").json()
        assert issued["bits"] == 0
        assert set(issued) == {"challenge", "bits", "expires_at"}


class TestRequired:
    @pytest.mark.parametrize("path", [SUBSCRIBE, UNSUBSCRIBE])
    def test_missing_proof_is_400_and_nothing_is_stored(
        self, pow_client: TestClient, pow_settings: Settings, path: str
    ) -> None:
        response = pow_client.post(path, json={"email": "bot@example.org"})
        assert error_code(response) == (400, "proof_of_work_required")
        assert "/v1/challenge" in response.json()["detail"]
        only_challenge = {"pow_challenge": solved(pow_client)["pow_challenge"]}
        response = pow_client.post(path, json={"email": "bot@example.org", **only_challenge})
        assert error_code(response) == (400, "proof_of_work_required")
        for table in ("subscription", "consent_event", "outbox_job", "webhook_nonce"):
            assert count_rows(pow_settings.database_url, table) == 0, table

    @pytest.mark.parametrize(
        ("language", "title", "why"),
        [
            ("fr", "Erreur - JavaScript nécessaire", "Activez JavaScript, puis envoyez"),
            ("en", "Error - JavaScript needed", "Turn JavaScript on, then send the form again"),
        ],
    )
    def test_a_browser_without_javascript_is_told_why_its_form_was_refused(
        self, pow_client: TestClient, language: str, title: str, why: str
    ) -> None:
        browser = {"accept": "text/html", "accept-language": language}
        for page in ("/v1/lists/bluehats", "/v1/lists/bluehats/unsubscribe"):
            # The form's page warns before anything is typed (shown only without scripts).
            shown = pow_client.get(page, headers=browser).text
            assert "<noscript>" in shown
        response = pow_client.post(
            SUBSCRIBE,
            content=b"email=nojs%40example.org",
            headers={**FORM, **browser},
        )
        assert response.status_code == 400
        # Not the generic "try again in a moment": without JavaScript, again fails again.
        assert f"<title>{title}" in response.text
        assert why in response.text

    def test_a_real_solution_subscribes_as_json_and_as_a_form(
        self, pow_client: TestClient, pow_settings: Settings
    ) -> None:
        proof = solved(pow_client)
        digest = proofofwork._digest(proof["pow_challenge"], proof["pow_nonce"])
        assert proofofwork.leading_zero_bits(digest) >= BITS
        response = pow_client.post(SUBSCRIBE, json={"email": "json@example.org", **proof})
        assert response.status_code == 202, response.text
        form = solved(pow_client)
        body = (
            "email=form%40example.org"
            f"&pow_challenge={form['pow_challenge']}&pow_nonce={form['pow_nonce']}"
        )
        response = pow_client.post(SUBSCRIBE, content=body, headers=FORM, follow_redirects=False)
        assert response.status_code == 303, response.text
        assert count_rows(pow_settings.database_url, "subscription") == 2
        unsubscribe = pow_client.post(
            UNSUBSCRIBE, json={"email": "json@example.org", **solved(pow_client)}
        )
        assert unsubscribe.status_code == 202

    def test_a_wrong_nonce_is_400(self, pow_client: TestClient, pow_settings: Settings) -> None:
        proof = solved(pow_client)
        wrong = next(
            str(n)
            for n in range(1000)
            if proofofwork.leading_zero_bits(proofofwork._digest(proof["pow_challenge"], str(n)))
            < BITS
        )
        response = pow_client.post(
            SUBSCRIBE, json={"email": "x@example.org", **proof, "pow_nonce": wrong}
        )
        assert error_code(response) == (400, "proof_of_work_invalid")
        assert "does not solve" in response.json()["detail"]
        assert count_rows(pow_settings.database_url, "subscription") == 0

    def test_a_reused_challenge_is_409(
        self, pow_client: TestClient, pow_settings: Settings
    ) -> None:
        proof = solved(pow_client)
        assert (
            pow_client.post(SUBSCRIBE, json={"email": "a@example.org", **proof}).status_code == 202
        )
        again = pow_client.post(SUBSCRIBE, json={"email": "b@example.org", **proof})
        assert error_code(again) == (409, "proof_of_work_used")
        other_route = pow_client.post(UNSUBSCRIBE, json={"email": "a@example.org", **proof})
        assert error_code(other_route) == (409, "proof_of_work_used")
        assert count_rows(pow_settings.database_url, "subscription") == 1

    def test_a_request_to_an_unknown_list_leaves_the_challenge_unspent(
        self, pow_client: TestClient, pow_settings: Settings
    ) -> None:
        proof = solved(pow_client)
        for path in ("/v1/lists/nope/subscriptions", "/v1/lists/nope/unsubscriptions"):
            wrong = pow_client.post(path, json={"email": "a@example.org", **proof})
            assert error_code(wrong) == (404, "list_not_found")
        right = pow_client.post(SUBSCRIBE, json={"email": "a@example.org", **proof})
        assert right.status_code == 202, right.text
        assert count_rows(pow_settings.database_url, "subscription") == 1

    def test_an_expired_challenge_is_410(
        self, pow_client: TestClient, pow_settings: Settings
    ) -> None:
        old = proofofwork.issue(
            key=pow_settings.token_key(),
            bits=BITS,
            ttl=pow_settings.proof_of_work_ttl,
            now=utcnow() - pow_settings.proof_of_work_ttl - timedelta(seconds=2),
        )
        proof = {
            "pow_challenge": old.challenge,
            "pow_nonce": proofofwork.solve(old.challenge, BITS),
        }
        response = pow_client.post(SUBSCRIBE, json={"email": "late@example.org", **proof})
        assert error_code(response) == (410, "proof_of_work_expired")
        assert count_rows(pow_settings.database_url, "subscription") == 0

    def test_forged_altered_or_easier_challenges_are_400(
        self, pow_client: TestClient, pow_settings: Settings
    ) -> None:
        now = utcnow()
        ttl = pow_settings.proof_of_work_ttl
        genuine = solved(pow_client)["pow_challenge"]
        _bits, issued_at, rest = genuine.split(".", 2)
        candidates = {
            # Our format, another key: not ours.
            "forged": proofofwork.issue(key=b"another key", bits=BITS, ttl=ttl, now=now).challenge,
            # Ours, with fewer bits written in: the tag no longer matches.
            "altered bits": f"0.{issued_at}.{rest}",
            # Ours and genuine, but issued when the service asked for less.
            "easier": proofofwork.issue(
                key=pow_settings.token_key(), bits=BITS - 4, ttl=ttl, now=now
            ).challenge,
            "garbage": "not-a-challenge",
            "non-ascii tag": genuine[:-1] + "é",
        }
        for name, challenge in candidates.items():
            nonce = proofofwork.solve(challenge, BITS)
            response = pow_client.post(
                SUBSCRIBE,
                json={"email": "x@example.org", "pow_challenge": challenge, "pow_nonce": nonce},
            )
            assert error_code(response) == (400, "proof_of_work_invalid"), name
        assert count_rows(pow_settings.database_url, "subscription") == 0


class TestBrowserSolver:
    def test_pow_js_solves_a_challenge_the_service_accepts(
        self, pow_client: TestClient, pow_settings: Settings
    ) -> None:
        issued = pow_client.get("/v1/challenge").json()
        script = (
            f"require({json.dumps(str(POW_JS))});"
            f"BlueHatsPow.solve({json.dumps(issued['challenge'])}, {issued['bits']})"
            ".then(nonce => process.stdout.write(nonce));"
        )
        nonce = subprocess.run(
            ["node", "-e", script], check=True, capture_output=True, text=True, timeout=60
        ).stdout
        assert nonce
        response = pow_client.post(
            SUBSCRIBE,
            json={
                "email": "js@example.org",
                "pow_challenge": issued["challenge"],
                "pow_nonce": nonce,
            },
        )
        assert response.status_code == 202, response.text


class TestUsedChallenges:
    def test_used_challenges_are_forgotten_once_expired(
        self, engine: sa.Engine, pow_settings: Settings
    ) -> None:
        ttl = pow_settings.proof_of_work_ttl
        now = utcnow()
        with Session(engine) as session:
            proofofwork.spend(session, challenge="first", ttl=ttl, now=now)
            with pytest.raises(errors.ProofOfWorkUsed):
                proofofwork.spend(session, challenge="first", ttl=ttl, now=now)
            later = now + ttl + proofofwork.CLOCK_SKEW + timedelta(seconds=1)
            proofofwork.spend(session, challenge="second", ttl=ttl, now=later)
            session.commit()
        assert count_rows(pow_settings.database_url, "webhook_nonce") == 1
