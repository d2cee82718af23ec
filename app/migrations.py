"""Alembic, driven from code: `newsletter migrate` and the embedded mode's start-up.

Alembic (with mako) is only imported to migrate. Checking that a database is at head, at
every start and every /readyz, reads the revision ids from the migration scripts and the
`alembic_version` table directly, so that a server whose schema is current never holds
alembic's ~10 MB of modules.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Engine

if TYPE_CHECKING:
    from alembic.config import Config

ALEMBIC_DIR = Path(__file__).resolve().parent.parent / "alembic"
VERSIONS_DIR = ALEMBIC_DIR / "versions"
# Alembic's default, which alembic/env.py keeps.
VERSION_TABLE = "alembic_version"


def config(database_url: str) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(ALEMBIC_DIR))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    from alembic import command

    command.downgrade(config(database_url), revision)


class BadRevision(ValueError):
    """A revision alembic cannot go to: unknown to this release's scripts, or not reachable."""


class SchemaNotAtHead(RuntimeError):
    """The database's schema is not the one this release's code expects."""

    def __init__(self, current: str | None) -> None:
        self.current = current
        self.head = head_revision()
        super().__init__(
            f"database schema is at {current or 'no revision (empty database)'}, this "
            f"release needs {self.head}: run `newsletter migrate`"
        )


def require_head(engine: Engine) -> None:
    """Raises SchemaNotAtHead unless the database is at this release's head."""
    current = current_revision(engine)
    if current != head_revision():
        raise SchemaNotAtHead(current)


def migrate(database_url: str, engine: Engine, revision: str = "head") -> str | None:
    """Upgrade, or downgrade when `revision` is older than the database's, and return the
    revision the database is at afterwards.

    `alembic upgrade` to an ancestor of the current revision does nothing; a target among
    the current revision's ancestors (or `base`, or `-N`) is a downgrade.
    """
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    cfg = config(database_url)
    current = current_revision(engine)
    try:
        if revision == "base" or revision.startswith("-"):
            older = True
        else:
            script = ScriptDirectory.from_config(cfg)
            targets = script.get_revisions(revision)
            ancestors = (
                {item.revision for item in script.iterate_revisions(current, "base")}
                if current is not None
                else set()
            )
            older = bool(targets) and all(
                item is not None and item.revision in ancestors and item.revision != current
                for item in targets
            )
        if older:
            downgrade(database_url, revision)
        else:
            upgrade(database_url, revision)
    except CommandError as e:
        raise BadRevision(str(e)) from e
    return current_revision(engine)


def _script_revision(path: Path) -> tuple[str, set[str]] | None:
    """`revision` and the revisions it follows (`down_revision`) of one migration script,
    read without running it."""
    names: dict[str, object] = {}
    for node in ast.parse(path.read_text("utf-8"), filename=str(path)).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
            names[node.target.id] = ast.literal_eval(node.value)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name):
                names[target.id] = ast.literal_eval(node.value)
    revision, down = names.get("revision"), names.get("down_revision")
    if not isinstance(revision, str):
        return None
    if isinstance(down, str):
        return revision, {down}
    if isinstance(down, list | tuple):
        return revision, {str(item) for item in down}
    return revision, set()


@cache
def _scripts() -> dict[str, set[str]]:
    """Each migration script's revision, and the revisions it follows."""
    scripts: dict[str, set[str]] = {}
    for path in VERSIONS_DIR.glob("*.py"):
        read = _script_revision(path)
        if read is not None:
            scripts[read[0]] = read[1]
    return scripts


def known(revision: str) -> bool:
    """Whether this release has a migration script of that revision (a database at one it
    does not know was migrated by a later release)."""
    return revision in _scripts()


@cache
def head_revision() -> str | None:
    """The latest revision among the migration scripts (read once: they ship with the code).

    The one revision no script names as its `down_revision`; with several heads (or none),
    alembic's own answer, which says what is wrong.
    """
    scripts = _scripts()
    revisions = set(scripts)
    followed = set().union(*scripts.values())
    heads = revisions - followed
    if len(heads) == 1:
        return heads.pop()
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(config("sqlite://")).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The database's revision, None before the first migration (as alembic reads it)."""
    with engine.connect() as connection:
        if not sa.inspect(connection).has_table(VERSION_TABLE):
            return None
        version = sa.table(VERSION_TABLE, sa.column("version_num"))
        rows = connection.execute(sa.select(version.c.version_num)).all()
    if len(rows) > 1:
        # Branches merged by hand: let alembic say what it makes of them.
        from alembic.runtime.migration import MigrationContext

        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    return rows[0][0] if rows else None


def pending(engine: Engine) -> bool:
    """Whether the database is not at this release's head (behind it, or unknown to it)."""
    return current_revision(engine) != head_revision()
