"""Liveness and readiness."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from app import db, lists, migrations, readiness
from app.config import Settings
from app.main import create_app
from app.models import MailingList, utcnow
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

    def test_healthz_answers_while_every_thread_of_the_pool_is_taken(
        self, client: TestClient
    ) -> None:
        """Liveness is the event loop's own answer: a process whose pool threads all wait
        (on a slow database, say) still serves, and is not restarted for it."""
        release = threading.Event()

        async def take_the_pool() -> None:
            limiter = anyio.to_thread.current_default_thread_limiter()
            limiter.total_tokens = 1
            await anyio.to_thread.run_sync(release.wait)

        assert client.portal is not None
        held = client.portal.start_task_soon(take_the_pool)
        with ThreadPoolExecutor(1) as asking:
            answer = asking.submit(client.get, "/healthz")
            try:
                response = answer.result(timeout=5)
            finally:
                release.set()
                held.result(timeout=5)
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


def test_a_list_created_by_another_process_meanwhile_is_taken_up_on_a_second_try(
    engine: sa.Engine, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two uvicorn workers starting on a new database (PostgreSQL): the other one created
    # the list after this one looked, so this one's insert collides with it.
    original = lists.sync_from_settings
    with db.session_scope(engine) as other:
        original(other, declared=settings.lists, now=utcnow())
    attempts = []

    def racing(session: Session, **kwargs: Any) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            session.add(
                MailingList(
                    slug=settings.lists[0].slug,
                    name="as the other process wrote it",
                    default_locale="fr",
                    consent_version="v",
                    confirm_ttl_seconds=0,
                )
            )
            session.flush()
        original(session, **kwargs)

    monkeypatch.setattr(lists, "sync_from_settings", racing)
    lists.sync_declared(engine, declared=settings.lists)
    assert len(attempts) == 2
    with Session(engine) as session:
        found = session.exec(
            select(MailingList).where(MailingList.slug == settings.lists[0].slug)
        ).all()
    assert [row.name for row in found] == [settings.lists[0].name]


class TestReadinessProbe:
    """Checks run one at a time (app.readiness.Probe): probes that come while one waits on
    a silent database share it, and each answers at the deadline."""

    def test_probes_during_a_silent_check_share_it_and_answer_at_the_deadline(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(readiness, "DEADLINE_S", 0.2)
        answer = threading.Event()
        calls: list[int] = []
        ready = readiness.Report(None, "ready", readiness.WorkerState.FRESH, 1.0)

        def work() -> readiness.Report:
            calls.append(1)
            answer.wait(10)
            return ready

        async def probes() -> tuple[list[object], int, object, object]:
            probe = readiness.Probe()
            silent = await asyncio.gather(
                *(probe.check(work) for _ in range(3)), return_exceptions=True
            )
            # The check still waits: a later probe waits on it too, not on a new one.
            silent += await asyncio.gather(probe.check(work), return_exceptions=True)
            checks_while_silent = len(calls)
            answer.set()
            answered = await probe.check(work)  # the one under way, answered at last
            after = await probe.check(work)  # a check of its own, now that it ended
            return silent, checks_while_silent, answered, after

        silent, checks_while_silent, answered, after = asyncio.run(probes())

        assert [type(result) for result in silent] == [readiness.DatabaseSilent] * 4
        assert checks_while_silent == 1
        assert answered is ready
        assert after is ready
        assert len(calls) == 2
