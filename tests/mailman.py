"""A real GNU Mailman 3 core for the tests: install, configure, start, stop, plus REST helpers.

Use it as a pytest plugin from a test module (`pytest_plugins = ("tests.mailman",)`) or from
the root conftest, then ask for the session-scoped `mailman_core` fixture:

    def test_something(mailman_core: MailmanCore) -> None:
        list_id = create_list(mailman_core)             # "bluehats-<hex>.example.org"
        with rest_client(mailman_core) as client: ...
        flush_outgoing_mail(mailman_core)               # then assert on mailman_core.smtp

Installation. Mailman 3.3.10 needs `sqlalchemy<2.1` and the project uses SQLAlchemy 2.1, so it
lives in its own virtualenv, `<repo>/.cache/mailman-venv` (git-ignored; `MAILMAN_VENV`
overrides the path). It is created on first use with `python -m venv` + `pip install` of
`MAILMAN_REQUIREMENTS` (every distribution pinned, as resolved and tested on Python 3.11),
under a file lock, and skipped while `<venv>/.harness-installed` holds the same list. It
took 9-12 s here with pip's cache warm, 14 s with an empty one. Nothing beyond PyPI is fetched.

Running. Each session gets a temp var dir with a generated mailman.cfg: REST on
127.0.0.1:<free port> (admin `restadmin`/`restpass`, one gunicorn worker), SQLite in the var
dir, outgoing SMTP to the caller's sink (aiosmtpd from tests/conftest.py), LMTP on
127.0.0.1:<free port>, the null MTA (no postfix maps; the postfix default fails without
/usr/sbin/postmap), and only the runners in/lmtp/pipeline/virgin/out/retry/rest. Start is
`mailman --run-as-root -C <cfg> start` (NB: `--run-as-root` is an option of the top-level
`mailman` command; `mailman -C cfg start --run-as-root` is rejected) with stdout and stderr
of the daemon going to `<tmp>/mailman-start.log`; it answers REST 3-6 s later. Stop is
`mailman --run-as-root -C <cfg> stop`; then the master's process group (the master is a
session leader; runners and gunicorn share its group) is waited for and killed if needed,
and any process whose command line names this session's config file is killed as a last
resort. `MAILMAN_TESTS=skip` skips the fixture.

REST calls a sync adapter needs (Mailman 3.3.10, API 3.1; observed against this harness).
All need HTTP basic auth with the admin user; JSON bodies work for POST/PATCH; a 201 has an
empty body and the new resource's URL in `Location`; errors are JSON
`{"title": ..., "description": ...}`.

- Domain: `POST /3.1/domains {"mail_host": "example.org"}` -> 201;
  again -> 400 "Duplicate email host: example.org". `GET /3.1/domains/{host}` -> 200 / 404.
- List: `POST /3.1/lists {"fqdn_listname": "name@example.org"}` -> 201, Location
  `.../lists/name.example.org` (lower-cased); again -> 400 "Mailing list exists"; unknown
  domain -> 400 "Domain does not exist: x.org".
- List settings: `GET /3.1/lists/{list_id}/config` -> 200; defaults: send_welcome_message
  true, send_goodbye_message true, admin_notify_mchanges false, subscription_policy and
  unsubscription_policy "confirm". `PATCH /3.1/lists/{list_id}/config
  {"send_goodbye_message": false}` -> 204.
- Add a member with no mail at all: `POST /3.1/members {"list_id": L, "subscriber": EMAIL,
  "display_name": NAME, "pre_verified": true, "pre_confirmed": true, "pre_approved": true,
  "send_welcome_message": false}` -> 201, empty body, Location `.../3.1/members/<member_id>`
  (32 hex digits). `send_welcome_message` is a per-request override of the list's setting;
  without it (list default true) a "Welcome to the ... mailing list" mail IS sent. Without
  the pre_* flags the answer is 202 `{"token": ..., "token_owner": "subscriber"}` and a
  confirmation mail is sent. The SMTP sink received nothing for the quiet add.
- Duplicate add of a member -> 409 `{"title": "409 Conflict", "description": "Member
  already subscribed"}`; add while a confirmation is pending -> 409 "Subscription request
  already pending"; unknown list -> 400 "No such list"; malformed address -> 400 "Invalid
  Parameter \\"subscriber\\": ." (sic).
- Find a member: `GET /3.1/lists/{list_id}/member/{email}` -> 200 member JSON (keys include
  member_id, email, display_name, list_id, role, delivery_mode, self_link), matching the
  address case-insensitively; not a member -> 404 `{"title": "404 Not Found"}`.
  Or `GET /3.1/members/find?list_id=L&subscriber=EMAIL` -> 200 always, `{"start": 0,
  "total_size": 0}` (no "entries" key!) when not found.
- Remove: `DELETE /3.1/members/{member_id}` -> 204 (no body options needed: pre_confirmed
  defaults to true for DELETE); again, or an unknown/garbled id -> 404. Also
  `DELETE /3.1/lists/{list_id}/member/{email}` -> 204. Removal sends "You have been
  unsubscribed from the ... mailing list" whenever the list's send_goodbye_message is true;
  there is no per-request override, so turn it off with the PATCH above (then no mail).
  Re-adding a removed address works (201).
- Page through members: `GET /3.1/lists/{list_id}/roster/member?count=N&page=P` (P from 1)
  -> 200 `{"start", "total_size", "entries": [...]}`, ordered by email; a page past the end
  has no "entries" key; page=0 -> 400; `count` without `page` or `page` without `count`
  -> 500 (a Mailman bug: always send both). `fields=email&fields=member_id` trims entries.
  Unknown list -> 404.

Measured here (2 cores): about 85-90 quiet member adds per second with one keep-alive
httpx client in a loop (300 and 1000 adds), about 190 lookups/s and 135 deletes/s; paging
1000 members with count=100 took 0.2 s.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SmtpSink, free_port, start_smtp

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_DIR = Path(os.environ.get("MAILMAN_VENV") or REPO_ROOT / ".cache" / "mailman-venv")

# Everything pip resolved for mailman==3.3.10 + sqlalchemy<2.1 on Python 3.11, and tested.
MAILMAN_REQUIREMENTS = (
    "mailman==3.3.10",
    "SQLAlchemy==2.0.58",
    "aiosmtpd==1.4.6",
    "alembic==1.20.1",
    "atpublic==9.0.0",
    "attrs==26.1.0",
    "authheaders==0.16.3",
    "authres==1.2.0",
    "certifi==2026.10.19.post1",
    "charset-normalizer==3.5.3",
    "click==8.5.1",
    "dkimpy==1.1.8",
    "dnspython==2.9.2",
    "falcon==4.4.0",
    "flufl.bounce==6.0.0",
    "flufl.i18n==8.0.0",
    "flufl.lock==10.0.0",
    "greenlet==3.5.6",
    "gunicorn==27.0.1",
    "idna==3.20",
    "lazr.config==4.0.0",
    "lazr.delegates==4.0.0",
    "Mako==1.4.3",
    "MarkupSafe==3.0.4",
    "passlib==1.7.4",
    "psutil==7.2.2",
    "publicsuffix2==2.20191221",
    "python-dateutil==4.0.0",
    "requests==2.34.2",
    "typing_extensions==4.16.0",
    "tzdata==2026.6",
    "urllib3==2.8.0",
    "zope.component==7.1",
    "zope.configuration==7.1",
    "zope.event==6.2",
    "zope.hookable==8.4",
    "zope.i18nmessageid==8.4",
    "zope.interface==8.7",
    "zope.schema==8.1",
)
ADMIN_USER = "restadmin"
ADMIN_PASSWORD = "restpass"
DOMAIN = "example.org"
INSTALL_TIMEOUT = 900.0
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
MAIL_TIMEOUT = 30.0

# Filled in as the session goes, shown at the end of the run.
TIMINGS: dict[str, str] = {}


def _marker_text() -> str:
    python = f"python {sys.version_info.major}.{sys.version_info.minor}"
    return "\n".join((python, *MAILMAN_REQUIREMENTS)) + "\n"


def _clean_env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.pop("PYTHONHOME", None)
    env.pop("MAILMAN_CONFIG_FILE", None)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    # Falcon 4 warns about Mailman's use of it once per REST worker; keep the log readable.
    env["PYTHONWARNINGS"] = "ignore:The RequestOptions.auto_parse_form_urlencoded option"
    return env


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        return f"({path}: {error})"
    return "\n".join(text.splitlines()[-lines:])


def _installed(venv: Path) -> bool:
    marker = venv / ".harness-installed"
    python = venv / "bin" / "python"
    return (
        marker.is_file()
        and marker.read_text() == _marker_text()
        and (venv / "bin" / "mailman").is_file()
        and python.resolve().is_file()
    )


def ensure_mailman(venv: Path = VENV_DIR, *, timeout: float = INSTALL_TIMEOUT) -> Path:
    """The `mailman` executable of the harness's virtualenv, installing it if needed."""
    if _installed(venv):
        TIMINGS.setdefault("install", f"cached in {venv}")
        return venv / "bin" / "mailman"
    venv.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    with (venv.parent / f"{venv.name}.lock").open("w") as lock:
        # Another pytest run may be installing: wait for it (bounded), then look again.
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{lock.name} held for over {timeout}s") from None
                time.sleep(0.5)
        if _installed(venv):
            TIMINGS["install"] = f"installed by another run into {venv}"
            return venv / "bin" / "mailman"
        started = time.monotonic()
        log = venv.parent / f"{venv.name}-install.log"
        _install(venv, log, deadline)
        seconds = time.monotonic() - started
        TIMINGS["install"] = f"installed in {seconds:.1f}s into {venv} (log {log})"
    return venv / "bin" / "mailman"


def _install(venv: Path, log: Path, deadline: float) -> None:
    pip = [
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "--no-input",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        *MAILMAN_REQUIREMENTS,
    ]
    failed: str | None = "not tried"
    with log.open("w") as output:
        for attempt in (1, 2):  # a second try for a passing network fault
            shutil.rmtree(venv, ignore_errors=True)
            steps = {"venv": [sys.executable, "-m", "venv", str(venv)], "pip install": pip}
            failed = None
            for name, step in steps.items():
                output.write(f"$ {' '.join(step)}\n")
                output.flush()
                remaining = deadline - time.monotonic()
                try:
                    code = subprocess.run(
                        step,
                        stdout=output,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        env=_clean_env(venv),
                        timeout=max(remaining, 1.0),
                        check=False,
                    ).returncode
                except subprocess.TimeoutExpired:
                    code = -1
                if code != 0:
                    failed = f"{name} exited {code} on attempt {attempt}"
                    break
            if failed is None:
                (venv / ".harness-installed").write_text(_marker_text())
                return
            output.write(f"!! {failed}\n")
            output.flush()
            if time.monotonic() > deadline:
                break
    shutil.rmtree(venv, ignore_errors=True)
    raise RuntimeError(f"installing Mailman failed: {failed}; log {log}:\n{_tail(log)}")


CONFIG_TEMPLATE = """\
[mailman]
site_owner: postmaster@{domain}
layout: harness

[paths.harness]
var_dir: {var_dir}

[database]
class: mailman.database.sqlite.SQLiteDatabase
url: sqlite:///{var_dir}/data/mailman.db

[webservice]
hostname: 127.0.0.1
port: {rest_port}
admin_user: {admin_user}
admin_pass: {admin_password}
workers: 1

[mta]
incoming: mailman.mta.null.NullMTA
smtp_host: {smtp_host}
smtp_port: {smtp_port}
lmtp_host: 127.0.0.1
lmtp_port: {lmtp_port}

[dmarc]
# Only fetched for lists with DMARC mitigation; never leave loopback.
org_domain_data_url: http://127.0.0.1:9/public_suffix_list.dat

[runner.archive]
start: no

[runner.bounces]
start: no

[runner.command]
start: no

[runner.digest]
start: no

[runner.task]
start: no
"""


@dataclass(frozen=True)
class MailmanCore:
    """A running Mailman core, as the tests see it."""

    base_url: str  # http://127.0.0.1:PORT/3.1
    admin_user: str
    admin_password: str
    smtp: SmtpSink  # where Mailman's outgoing mail lands
    lmtp_port: int
    config_file: Path
    var_dir: Path
    log_file: Path  # stdout/stderr of `mailman start` and of the daemon it leaves


class MailmanServer:
    """One Mailman core under `root`: `start()` it, then always `stop()` it."""

    def __init__(
        self, mailman: Path, root: Path, *, smtp_host: str, smtp_port: int, smtp: SmtpSink
    ) -> None:
        if smtp_host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"SMTP host must be loopback, not {smtp_host}")
        self.mailman = mailman
        self.venv = mailman.parent.parent
        # pytest's tmp_path exists already; a script's folder may not.
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.var_dir = root / "var"
        self.config_file = root / "mailman.cfg"
        self.log_file = root / "mailman-start.log"
        self.rest_port = free_port()
        self.lmtp_port = free_port()
        self.smtp = smtp
        self.master_pid: int | None = None
        self.config_file.write_text(
            CONFIG_TEMPLATE.format(
                domain=DOMAIN,
                var_dir=self.var_dir,
                rest_port=self.rest_port,
                admin_user=ADMIN_USER,
                admin_password=ADMIN_PASSWORD,
                smtp_host=smtp_host,
                smtp_port=smtp_port,
                lmtp_port=self.lmtp_port,
            )
        )

    @property
    def core(self) -> MailmanCore:
        return MailmanCore(
            base_url=f"http://127.0.0.1:{self.rest_port}/3.1",
            admin_user=ADMIN_USER,
            admin_password=ADMIN_PASSWORD,
            smtp=self.smtp,
            lmtp_port=self.lmtp_port,
            config_file=self.config_file,
            var_dir=self.var_dir,
            log_file=self.log_file,
        )

    def _command(self, *args: str, timeout: float) -> int:
        with self.log_file.open("a") as log:
            log.write(f"$ mailman {' '.join(args)}\n")
            log.flush()
            # The daemon inherits these descriptors: never use pipes here, they'd stay open.
            return subprocess.run(
                [str(self.mailman), "--run-as-root", "-C", str(self.config_file), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                env=_clean_env(self.venv),
                timeout=timeout,
                check=False,
            ).returncode

    def _fail(self, reason: str) -> None:
        mailman_log = self.var_dir / "logs" / "mailman.log"
        raise RuntimeError(
            f"Mailman core {reason}\n--- {self.log_file} ---\n{_tail(self.log_file)}"
            f"\n--- {mailman_log} ---\n{_tail(mailman_log)}"
        )

    def start(self, *, timeout: float = START_TIMEOUT) -> MailmanCore:
        started = time.monotonic()
        deadline = started + timeout
        code = self._command("start", timeout=timeout)
        if code != 0:
            self._fail(f"`mailman start` exited {code}")
        url = f"{self.core.base_url}/system/versions"
        with httpx.Client(auth=(ADMIN_USER, ADMIN_PASSWORD), timeout=2.0) as client:
            while True:
                if self.master_pid is None:
                    self.master_pid = self._read_master_pid()
                elif not _group_alive(self.master_pid):
                    self._fail(f"master (pid {self.master_pid}) died before REST answered")
                with contextlib.suppress(httpx.TransportError):
                    if client.get(url).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    self._fail(f"REST did not answer at {url} within {timeout}s")
                time.sleep(0.1)
        TIMINGS["start"] = f"REST answered {time.monotonic() - started:.1f}s after start"
        return self.core

    def _read_master_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.var_dir / "master.pid").read_text().strip())
        return None

    def stop(self, *, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the core and make sure none of its processes is left."""
        deadline = time.monotonic() + timeout
        pgid = self.master_pid or self._read_master_pid()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._command("stop", timeout=max(timeout / 2, 1.0))
        if pgid is not None:
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if not _group_alive(pgid):
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, sig)
                _wait(lambda: not _group_alive(pgid), timeout=5.0)
        # Last resort: anything still naming this session's own config file.
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not _wait(lambda: not self.pids(), timeout=5.0):
            raise RuntimeError(f"Mailman processes left: {self.pids()}")

    def pids(self) -> list[int]:
        """Live processes whose command line names this core's config file."""
        needle = str(self.config_file).encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if needle in (entry / "cmdline").read_bytes() and not _zombie(entry):
                    found.append(int(entry.name))
        return found


def _zombie(proc: Path) -> bool:
    stat = (proc / "stat").read_text()
    return stat[stat.rindex(")") + 2] in "ZX"


def _group_alive(pgid: int) -> bool:
    """Whether any process that is not a zombie is left in process group `pgid`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] not in "ZX":
                return True
    return False


def _wait(predicate: Any, *, timeout: float, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


@contextlib.contextmanager
def running_mailman(root: Path, smtp: SmtpSink) -> Iterator[MailmanCore]:
    """A Mailman core under `root` sending to `smtp`, stopped (for good) on exit."""
    mailman = ensure_mailman()
    server = MailmanServer(mailman, root, smtp_host=smtp.host, smtp_port=smtp.port, smtp=smtp)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mailman_core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailmanCore]:
    """A real Mailman 3 core for the whole session, with its own SMTP sink."""
    if os.environ.get("MAILMAN_TESTS", "").lower() == "skip":
        pytest.skip("MAILMAN_TESTS=skip")
    sink, controller = start_smtp()
    try:
        with running_mailman(tmp_path_factory.mktemp("mailman"), sink) as core:
            yield core
    finally:
        controller.stop()


def rest_client(core: MailmanCore, *, timeout: float = 10.0) -> httpx.Client:
    """An httpx client for the core's REST API; paths are relative to /3.1."""
    return httpx.Client(
        base_url=core.base_url,
        auth=(core.admin_user, core.admin_password),
        timeout=timeout,
    )


def create_list(
    core: MailmanCore,
    fqdn_listname: str | None = None,
    *,
    config: dict[str, Any] | None = None,
) -> str:
    """Create a list (and its domain if new); return its list_id, e.g. bluehats-x.example.org.

    Without a name it is `bluehats-<random>@example.org`. `config` is PATCHed onto the list's
    settings, e.g. {"send_goodbye_message": False}; otherwise Mailman's defaults stay.
    """
    fqdn_listname = fqdn_listname or f"bluehats-{uuid.uuid4().hex[:12]}@{DOMAIN}"
    domain = fqdn_listname.rpartition("@")[2]
    with rest_client(core) as client:
        response = client.post("/domains", json={"mail_host": domain})
        if response.status_code != 201 and "Duplicate" not in response.text:
            response.raise_for_status()
        response = client.post("/lists", json={"fqdn_listname": fqdn_listname})
        assert response.status_code == 201, response.text
        list_id = response.headers["location"].rstrip("/").rpartition("/")[2]
        if config:
            client.patch(f"/lists/{list_id}/config", json=config).raise_for_status()
    return list_id


def mails_to(core: MailmanCore, address: str) -> list[Any]:
    """What the SMTP sink received so far with `address` among the envelope recipients."""
    with core.smtp.lock:
        return [
            message
            for envelope, message in zip(core.smtp.envelopes, core.smtp.messages, strict=True)
            if address.lower() in (rcpt.lower() for rcpt in envelope.rcpt_tos)
        ]


def flush_outgoing_mail(core: MailmanCore, *, timeout: float = MAIL_TIMEOUT) -> None:
    """Return once every mail Mailman queued before this call has reached the SMTP sink.

    A barrier: subscribe a probe address with a welcome message to a list of its own and wait
    for that mail. Mailman's virgin and out queues are worked in the order queued, so anything
    queued earlier (a welcome or goodbye that should not exist) has been delivered by then.
    """
    probe = f"probe-{uuid.uuid4().hex[:12]}@{DOMAIN}"
    list_id = create_list(core, f"harness-probe-{uuid.uuid4().hex[:8]}@{DOMAIN}")
    with rest_client(core) as client:
        response = client.post(
            "/members",
            json={
                "list_id": list_id,
                "subscriber": probe,
                "pre_verified": True,
                "pre_confirmed": True,
                "pre_approved": True,
                "send_welcome_message": True,
            },
        )
        assert response.status_code == 201, response.text
    if not _wait(lambda: mails_to(core, probe), timeout=timeout):
        raise AssertionError(f"the probe's welcome mail did not arrive within {timeout}s")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TIMINGS:
        terminalreporter.write_sep("-", "mailman harness")
        for key, value in TIMINGS.items():
            terminalreporter.write_line(f"mailman {key}: {value}")
