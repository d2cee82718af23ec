"""The Mailman harness works: a real core answers, lists are made, quiet adds stay quiet."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

# Before the import below, so tests.mailman gets assertion rewriting like a plugin should.
pytest.register_assert_rewrite("tests.mailman")

from tests.conftest import start_smtp  # noqa: E402
from tests.mailman import (  # noqa: E402
    MailmanCore,
    MailmanServer,
    create_list,
    ensure_mailman,
    flush_outgoing_mail,
    mails_to,
    rest_client,
)

pytest_plugins = ("tests.mailman",)

QUIET = {"pre_verified": True, "pre_confirmed": True, "pre_approved": True}


def test_core_answers_on_loopback(mailman_core: MailmanCore) -> None:
    assert mailman_core.base_url.startswith("http://127.0.0.1:")
    assert mailman_core.base_url.endswith("/3.1")
    with rest_client(mailman_core) as client:
        versions = client.get("/system/versions")
        assert versions.status_code == 200
        assert "3.3.10" in versions.json()["mailman_version"]
        anonymous = client.get("/system/versions", auth=("restadmin", "wrong"))
        assert anonymous.status_code == 401


def test_quiet_add_then_remove_sends_no_mail(mailman_core: MailmanCore) -> None:
    list_id = create_list(mailman_core, config={"send_goodbye_message": False})
    assert list_id.startswith("bluehats-")
    assert list_id.endswith(".example.org")
    address = f"ada-{uuid.uuid4().hex[:8]}@example.com"
    member = {"list_id": list_id, "subscriber": address, "display_name": "Ada", **QUIET}
    with rest_client(mailman_core) as client:
        added = client.post("/members", json={**member, "send_welcome_message": False})
        assert added.status_code == 201, added.text
        member_id = added.headers["location"].rpartition("/")[2]

        again = client.post("/members", json={**member, "send_welcome_message": False})
        assert again.status_code == 409
        assert again.json()["description"] == "Member already subscribed"

        roster = client.get(f"/lists/{list_id}/roster/member", params={"count": 10, "page": 1})
        assert roster.status_code == 200
        assert [(m["email"], m["member_id"]) for m in roster.json()["entries"]] == [
            (address, member_id)
        ]
        found = client.get(f"/lists/{list_id}/member/{address}")
        assert found.status_code == 200
        assert found.json()["display_name"] == "Ada"

        assert client.delete(f"/members/{member_id}").status_code == 204
        assert client.get(f"/lists/{list_id}/member/{address}").status_code == 404
        empty = client.get(f"/lists/{list_id}/roster/member", params={"count": 10, "page": 1})
        assert empty.json()["total_size"] == 0
        assert "entries" not in empty.json()

    flush_outgoing_mail(mailman_core)
    assert mails_to(mailman_core, address) == []


def test_sink_sees_mail_that_is_not_suppressed(mailman_core: MailmanCore) -> None:
    """The control: with the list's defaults, add and remove do send mail to the sink."""
    list_id = create_list(mailman_core)
    address = f"bob-{uuid.uuid4().hex[:8]}@example.com"
    with rest_client(mailman_core) as client:
        added = client.post("/members", json={"list_id": list_id, "subscriber": address, **QUIET})
        assert added.status_code == 201, added.text
        assert client.delete(added.headers["location"]).status_code == 204
    flush_outgoing_mail(mailman_core)
    subjects = sorted(str(message["Subject"]) for message in mails_to(mailman_core, address))
    assert len(subjects) == 2, subjects
    assert subjects[0].startswith("Welcome to the ")
    assert subjects[1].startswith("You have been unsubscribed from the ")


def test_stop_leaves_no_process(tmp_path: Path) -> None:
    sink, controller = start_smtp()
    server = MailmanServer(
        ensure_mailman(), tmp_path, smtp_host=sink.host, smtp_port=sink.port, smtp=sink
    )
    try:
        server.start()
        assert server.pids(), "no process names the config file"
    finally:
        server.stop()
        controller.stop()
    assert server.pids() == []
