"""Generated artifacts stay honest: openapi.json matches the app, migrations match models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlmodel import SQLModel

from app import migrations
from app.config import Settings
from app.main import create_app
from tests.conftest import POSTGRES_URL

ROOT = Path(__file__).resolve().parent.parent


def test_openapi_json_matches_the_app() -> None:
    committed = json.loads((ROOT / "openapi.json").read_text("utf-8"))
    generated = create_app(Settings()).openapi()
    assert committed == generated, "openapi.json is stale: run `make openapi`"


def test_every_operation_has_a_stable_id_and_a_description() -> None:
    document = create_app(Settings()).openapi()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert operation.get("operationId"), f"{method} {path} has no operationId"
            assert operation.get("description") or operation.get("summary"), (method, path)


def test_the_admin_api_and_the_metrics_name_their_own_credentials() -> None:
    document = create_app(Settings()).openapi()
    schemes = document["components"]["securitySchemes"]

    def described(path: str, method: str) -> set[str]:
        names = {name for option in document["paths"][path][method]["security"] for name in option}
        return {schemes[name]["description"] for name in names}

    admin_key = "An API key made with `newsletter keys create`."
    for path, operations in document["paths"].items():
        if path.startswith("/v1/admin/"):
            for method in operations:
                assert described(path, method) == {admin_key}, (method, path)
    assert described("/metrics", "get") == {"NEWSLETTER_METRICS_TOKEN, when it is set."}


@pytest.mark.database
class TestMigrations:
    def _url(self, tmp_path: Path) -> str:
        return POSTGRES_URL or f"sqlite:///{tmp_path / 'roundtrip.db'}"

    def test_upgrade_downgrade_upgrade_round_trip(self, tmp_path: Path) -> None:
        url = self._url(tmp_path)
        migrations.upgrade(url)
        migrations.downgrade(url, "base")
        engine = sa.create_engine(url)
        tables = set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
        engine.dispose()
        assert tables == set()
        migrations.upgrade(url)
        engine = sa.create_engine(url)
        assert migrations.current_revision(engine) == migrations.head_revision()
        engine.dispose()

    def test_the_head_read_from_the_scripts_is_alembics(self) -> None:
        head = ScriptDirectory.from_config(migrations.config("sqlite://")).get_current_head()
        assert migrations.head_revision() == head

    def test_the_revision_read_from_the_database_is_alembics(self, tmp_path: Path) -> None:
        url = self._url(tmp_path)
        engine = sa.create_engine(url)
        migrations.downgrade(url, "base")
        assert migrations.current_revision(engine) is None
        assert migrations.pending(engine)
        migrations.upgrade(url, "0008")
        with engine.connect() as connection:
            assert MigrationContext.configure(connection).get_current_revision() == "0008"
        assert migrations.current_revision(engine) == "0008"
        assert migrations.pending(engine)
        migrations.upgrade(url)
        assert migrations.current_revision(engine) == migrations.head_revision()
        assert not migrations.pending(engine)
        engine.dispose()

    def test_the_ascii_spelling_of_the_subscriptions_there_is_filled_in(
        self, tmp_path: Path
    ) -> None:
        # Before 0010, a search found them by the Unicode spelling only.
        url = self._url(tmp_path)
        migrations.downgrade(url, "base")
        migrations.upgrade(url, "0009")
        engine = sa.create_engine(url)
        now = "2026-11-30 12:00:00+00:00"
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "INSERT INTO mailing_list (id, slug, name, default_locale, consent_version, "
                    "confirm_ttl_seconds, created_at, updated_at) "
                    "VALUES (1, 'bluehats', 'B', 'fr', 'v1', 3600, :now, :now)"
                ),
                {"now": now},
            )
            for row_id, email in enumerate(
                ("Jean@café.fr", "anne@straße.de", "ann@example.org", "zoé@exämple.org"), 1
            ):
                connection.execute(
                    sa.text(
                        "INSERT INTO subscription (id, list_id, email, email_key, status, "
                        "locale, attributes, consent_version, created_at, updated_at) VALUES "
                        "(:id, 1, :email, :key, 'confirmed', 'fr', '{}', 'v1', :now, :now)"
                    ),
                    {"id": row_id, "email": email, "key": email.casefold(), "now": now},
                )
        migrations.upgrade(url)
        with engine.connect() as connection:
            spelled = connection.execute(
                sa.text("SELECT email_ascii_key FROM subscription ORDER BY id")
            ).scalars()
            assert list(spelled) == [
                "jean@xn--caf-dma.fr",
                "anne@xn--strae-oqa.de",
                None,
                "zoé@xn--exmple-cua.org",
            ]
        engine.dispose()
        migrations.downgrade(url, "0009")
        migrations.downgrade(url, "base")
        migrations.upgrade(url)

    def test_models_and_migrations_do_not_differ(self, tmp_path: Path) -> None:
        url = self._url(tmp_path)
        migrations.upgrade(url)
        engine = sa.create_engine(url)
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            differences = compare_metadata(context, SQLModel.metadata)
        engine.dispose()
        assert differences == []
