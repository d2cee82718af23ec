"""Liveness and readiness."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from app import migrations
from app.main import create_app
from tests.conftest import SmtpSink, make_settings


def _set_revision(url: str, revision: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
    engine.dispose()


class TestHealth:
    def test_healthz_answers_while_the_process_lives(self, client: TestClient) -> None:
        response = client.get("/healthz")
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}

    def test_readyz_is_200_at_the_latest_migration_and_503_otherwise(
        self, client: TestClient, database_url: str
    ) -> None:
        ready = client.get("/readyz").json()
        assert (ready["status"], ready["worker"]) == ("ready", "fresh")
        _set_revision(database_url, "0000")
        try:
            response = client.get("/readyz")
            assert response.status_code == 503
            assert response.json()["error"] == "migrations_pending"
        finally:
            _set_revision(database_url, str(migrations.head_revision()))
        assert client.get("/readyz").status_code == 200

    def test_the_app_refuses_to_start_on_a_schema_it_does_not_know(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        _set_revision(database_url, "0000")
        try:
            settings = make_settings(database_url, smtp_port=smtp.port)
            with (
                pytest.raises(RuntimeError, match="newsletter migrate"),
                TestClient(create_app(settings)),
            ):
                pass
        finally:
            _set_revision(database_url, str(migrations.head_revision()))
