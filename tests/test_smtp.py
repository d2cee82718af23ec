"""The SMTP mailer against real aiosmtpd servers: plain, STARTTLS with AUTH, implicit TLS."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socketserver
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.header import decode_header, make_header
from email.message import EmailMessage
from pathlib import Path
from typing import Any, AnyStr

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from pydantic import SecretStr

from app import addresses, logs, privacy
from app import mailer as mailer_module
from app.config import FileMailerSettings, Locale, SmtpMailerSettings
from app.mailer import (
    FileMailer,
    OutgoingMail,
    PermanentMailError,
    RetryableMailError,
    SmtpMailer,
    helo_name,
    make_mailer,
)
from app.mails import MailKind, compose
from tests.conftest import PeerSink, SmtpSink, TricklingSmtp, free_port
from tests.processes import start_login_smtp

USER, PASSWORD = "relay-user", "relay-password"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made with the openssl command."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def _authenticator(
    server: Any, session: Any, envelope: Any, mechanism: str, data: Any
) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
        USER.encode(),
        PASSWORD.encode(),
    )
    return AuthResult(success=ok, handled=False)


def _mail(
    to: str = "camille@example.org", mail_from: str = "BlueHats <bluehats@code.gouv.fr>"
) -> OutgoingMail:
    return compose(
        MailKind.CONFIRM,
        locale=Locale.FR,
        list_name="Gazette BlueHats",
        to=to,
        mail_from=mail_from,
        message_key="1.test",
        link="http://testserver/v1/confirm/abc",
    )


@contextlib.contextmanager
def _refusing_at_rcpt(reply: str) -> Iterator[tuple[SmtpSink, SmtpMailer]]:
    """A real SMTP server answering every RCPT with `reply`, and a mailer for it."""

    class Refusing(SmtpSink):
        async def handle_RCPT(
            self, server: Any, session: Any, envelope: Any, address: str, options: Any
        ) -> str:
            return reply

    sink = Refusing(host="127.0.0.1", port=free_port())
    controller = Controller(sink, hostname=sink.host, port=sink.port)
    controller.start()
    try:
        yield (
            sink,
            SmtpMailer(
                SmtpMailerSettings(host="127.0.0.1", port=sink.port, security="none", timeout=5)
            ),
        )
    finally:
        controller.stop()


class _GreetingSmtp(SMTP):
    """aiosmtpd's server greeting with `banner` in place of its 220; after a 421 it hangs
    up at once (RFC 5321 3.8), after a 554 it waits for QUIT (3.1)."""

    banner = ""
    _greeted = False

    async def push(self, status: AnyStr) -> None:
        if self._greeted:
            await super().push(status)
            return
        self._greeted = True
        await super().push(self.banner)
        if self.banner.startswith("421") and self.transport is not None:
            self.transport.close()


class _GreetingController(Controller):
    def __init__(self, handler: Any, *, banner: str, **options: Any) -> None:
        super().__init__(handler, **options)
        self.banner = banner

    def factory(self) -> SMTP:
        server = _GreetingSmtp(self.handler, **self.SMTP_kwargs)
        server.banner = self.banner
        return server


class _RecordingSmtpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.lines: list[str] = []


class _RecordingSmtpHandler(socketserver.StreamRequestHandler):
    """An SMTP server that accepts everything and keeps each command line as it came."""

    server: _RecordingSmtpServer
    greeting = b"220 recorder ESMTP\r\n"

    def handle(self) -> None:
        self.wfile.write(self.greeting)
        in_data = False
        while raw := self._next_line():
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if in_data:
                if line == ".":
                    in_data = False
                    self._accepted()
                    self.wfile.write(b"250 queued\r\n")
                continue
            self._command(line)
            verb = line[:4].upper()
            if verb == "DATA":
                in_data = True
                self.wfile.write(b"354 go on\r\n")
            elif verb == "QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            else:
                self.wfile.write(b"250 ok\r\n")

    def _next_line(self) -> bytes:
        """The client's next line; empty when it is gone."""
        return self.rfile.readline()

    def _command(self, line: str) -> None:
        self.server.lines.append(line)

    def _accepted(self) -> None:
        """A message received in full."""


class _HangingUpSmtpHandler(_RecordingSmtpHandler):
    """An SMTP server that hangs up on a client idle for 0.2 s as Postfix and Exim do:
    `421 4.4.2 ... timeout exceeded` first, then the connection closed. It keeps which
    connection (the client's port) carried each message accepted."""

    greeting = b"220 hanging-up ESMTP\r\n"
    timeout = 0.2  # socketserver sets it on the connection

    def _next_line(self) -> bytes:
        try:
            return self.rfile.readline()
        except TimeoutError:
            self.wfile.write(b"421 4.4.2 hanging-up Error: timeout exceeded\r\n")
            return b""

    def _command(self, line: str) -> None:
        pass

    def _accepted(self) -> None:
        self.server.lines.append(f"accepted on {self.client_address[1]}")


@contextlib.contextmanager
def _recording(
    handler: type[socketserver.BaseRequestHandler] = _RecordingSmtpHandler,
) -> Iterator[_RecordingSmtpServer]:
    """A recording SMTP server on loopback for the block's time (its `lines` kept after)."""
    server = _RecordingSmtpServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _serve(certificate: tuple[Path, Path], **options: Any) -> tuple[SmtpSink, Controller]:
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    sink = SmtpSink(host="127.0.0.1", port=free_port())
    controller = Controller(
        sink,
        hostname=sink.host,
        port=sink.port,
        authenticator=_authenticator,
        auth_required=True,
        **dict.fromkeys(options.pop("contexts"), context),
        **options,
    )
    controller.start()
    return sink, controller


@pytest.fixture
def tls_server(certificate: tuple[Path, Path]) -> Iterator[SmtpSink]:
    """STARTTLS required, then AUTH."""
    sink, controller = _serve(certificate, contexts=["tls_context"], require_starttls=True)
    yield sink
    controller.stop()


@pytest.fixture
def implicit_tls_server(certificate: tuple[Path, Path]) -> Iterator[SmtpSink]:
    """TLS from the first byte (port 465 style), then AUTH."""
    # The whole connection is TLS; aiosmtpd's own check only knows about STARTTLS.
    sink, controller = _serve(certificate, contexts=["ssl_context"], auth_require_tls=False)
    yield sink
    controller.stop()


def _recorded(mail: OutgoingMail, *, public_host: str | None = None, **settings: Any) -> list[str]:
    """The command lines an SMTP server without extensions got for `mail`."""
    with _recording() as server:
        mailer = make_mailer(
            SmtpMailerSettings(
                host="127.0.0.1",
                port=server.server_address[1],
                security="none",
                timeout=5,
                **settings,
            ),
            public_host=public_host,
        )
        assert "accepted" in mailer.send(mail)
    return server.lines


class TestHeloName:
    """The name in EHLO: relays that check it (Postfix's reject_non_fqdn_helo_hostname)
    refuse every mail from a bare one, such as a container's id."""

    @pytest.mark.parametrize(
        ("machine", "public_host", "expected"),
        [
            ("mail-1.dinum.gouv.fr", "newsletter.code.gouv.fr", "mail-1.dinum.gouv.fr"),
            # A container's name is its id; a laptop's, a bare name.
            ("3f2a1b9c0d4e", "newsletter.code.gouv.fr", "newsletter.code.gouv.fr"),
            ("localhost.localdomain", "newsletter.code.gouv.fr", "newsletter.code.gouv.fr"),
            ("camille-laptop.local", "newsletter.code.gouv.fr", "newsletter.code.gouv.fr"),
            # An address is written as an address literal (RFC 5321 4.1.3).
            ("3f2a1b9c0d4e", "127.0.0.1", "[127.0.0.1]"),
            ("3f2a1b9c0d4e", "[::1]", "[IPv6:::1]"),
            ("3f2a1b9c0d4e", None, "3f2a1b9c0d4e"),
        ],
    )
    def test_a_bare_machine_name_gives_way_to_the_public_host(
        self, machine: str, public_host: str | None, expected: str
    ) -> None:
        assert helo_name(machine, public_host) == expected

    def test_the_relay_is_greeted_with_the_public_host_from_a_container(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(mailer_module.socket, "getfqdn", lambda: "3f2a1b9c0d4e")
        lines = _recorded(_mail(to="camille@example.org"), public_host="newsletter.code.gouv.fr")
        assert lines[0] == "ehlo newsletter.code.gouv.fr"

    def test_the_setting_names_it(self) -> None:
        lines = _recorded(
            _mail(to="camille@example.org"),
            public_host="newsletter.code.gouv.fr",
            helo_name="relay-client.dinum.gouv.fr",
        )
        assert lines[0] == "ehlo relay-client.dinum.gouv.fr"

    @pytest.mark.parametrize("name", ["two words", "name_with_underscore", "-leading.example", ""])
    def test_a_name_smtp_cannot_carry_is_refused_at_start(self, name: str) -> None:
        with pytest.raises(ValueError, match="helo_name"):
            SmtpMailerSettings(host="127.0.0.1", helo_name=name)


class TestSmtpMailer:
    def test_starttls_with_authentication_delivers(
        self, tls_server: SmtpSink, certificate: tuple[Path, Path]
    ) -> None:
        mailer = SmtpMailer(
            SmtpMailerSettings(
                host="127.0.0.1",
                port=tls_server.port,
                security="starttls",
                username=USER,
                password=PASSWORD,
                ca_file=certificate[0],
                timeout=5,
            )
        )
        assert "accepted" in mailer.send(_mail())
        [message] = tls_server.wait_for(1)
        assert isinstance(message, EmailMessage)
        assert message["To"] == "camille@example.org"

    def test_implicit_tls_with_authentication_delivers(
        self, implicit_tls_server: SmtpSink, certificate: tuple[Path, Path]
    ) -> None:
        mailer = SmtpMailer(
            SmtpMailerSettings(
                host="127.0.0.1",
                port=implicit_tls_server.port,
                security="ssl",
                username=USER,
                password=PASSWORD,
                ca_file=certificate[0],
                timeout=5,
            )
        )
        mailer.send(_mail())
        assert len(implicit_tls_server.wait_for(1)) == 1

    def test_wrong_password_is_retryable_so_nothing_is_lost_while_misconfigured(
        self, tls_server: SmtpSink, certificate: tuple[Path, Path]
    ) -> None:
        mailer = SmtpMailer(
            SmtpMailerSettings(
                host="127.0.0.1",
                port=tls_server.port,
                security="starttls",
                username=USER,
                password="wrong",
                ca_file=certificate[0],
                timeout=5,
            )
        )
        with pytest.raises(RetryableMailError, match=r"login refused by 127\.0\.0\.1:\d+: 535 "):
            mailer.send(_mail())
        assert tls_server.messages == []

    def test_a_refused_login_holds_off_the_next_logins_and_says_until_when(self) -> None:
        # Each queued mail logged in again with the refused password (smtplib tries each
        # mechanism): hundreds of refused logins a minute, for which relays lock the account.
        attempts: list[str] = []
        password = ["relay-password-before-the-change"]

        def authenticator(
            server: Any, session: Any, envelope: Any, mechanism: str, data: Any
        ) -> AuthResult:
            attempts.append(mechanism)
            ok = isinstance(data, LoginPassword) and data.password == password[0].encode()
            return AuthResult(success=ok, handled=False)

        sink, controller = start_login_smtp(authenticator)
        try:
            mailer = SmtpMailer(
                SmtpMailerSettings(
                    host="127.0.0.1",
                    port=sink.port,
                    security="none",
                    username=USER,
                    password=PASSWORD,
                    timeout=5,
                ),
                login_hold_off=0.5,
            )
            with pytest.raises(RetryableMailError, match=r"login refused by .*: 535 5\.7\.8 "):
                mailer.send(_mail())
            refused = len(attempts)
            assert refused >= 1
            for _ in range(5):
                with pytest.raises(
                    RetryableMailError,
                    match=r"535 5\.7\.8 .*; no new login before \d\d:\d\d:\d\d UTC.*"
                    r"NEWSLETTER_MAILER__PASSWORD",
                ):
                    mailer.send(_mail())
            assert len(attempts) == refused  # the relay heard nothing of those
            # The relay's account fixed meanwhile: past the hold-off, a send logs in again,
            # and the next ones go at once.
            password[0] = PASSWORD
            time.sleep(0.6)
            mailer.send(_mail())
            mailer.send(_mail())
            assert len(sink.wait_for(2)) == 2
        finally:
            controller.stop()

    @pytest.mark.parametrize(
        "reply",
        [
            # RFC 4954: the relay failed to check the login (its directory down); the
            # client "SHOULD NOT prompt the user for another password".
            "454 4.7.0 Temporary authentication failure",
            # Gmail's, to a client that logs in too often.
            "454 4.7.0 Too many login attempts, please try again later",
            # A relay shutting down, hanging up after its answer.
            "421 4.3.2 Service shutting down",
        ],
    )
    def test_a_relay_failing_at_auth_for_now_holds_off_the_logins_but_blames_no_password(
        self, caplog: pytest.LogCaptureFixture, reply: str
    ) -> None:
        mechanisms: list[str] = []

        def authenticator(
            server: Any, session: Any, envelope: Any, mechanism: str, data: Any
        ) -> AuthResult:
            mechanisms.append(mechanism)
            if reply.startswith("421"):
                asyncio.get_running_loop().call_soon(server.transport.close)
            return AuthResult(success=False, handled=False, message=reply)

        sink, controller = start_login_smtp(authenticator)
        relay = f"127\\.0\\.0\\.1:{sink.port}"
        try:
            mailer = SmtpMailer(
                SmtpMailerSettings(
                    host="127.0.0.1",
                    port=sink.port,
                    security="none",
                    username=USER,
                    password=PASSWORD,
                    timeout=5,
                )
            )
            with pytest.raises(
                RetryableMailError,
                match=rf"^SMTP login put off by {relay}: {re.escape(reply)}; no new login for "
                r"300s \(the relay fails for now; the login was not refused\)$",
            ):
                mailer.send(_mail())
            with pytest.raises(
                RetryableMailError,
                match=rf"^SMTP login put off by {relay}: {re.escape(reply)}; no new login "
                r"before \d\d:\d\d:\d\d UTC \(the relay fails for now",
            ):
                mailer.send(_mail())
        finally:
            controller.stop()
        # One mechanism, not the next on a relay failing or gone (after the 421, the
        # record said only `Connection unexpectedly closed`); none during the hold-off.
        assert mechanisms == ["PLAIN"]
        assert "login_refused" not in caplog.text
        [put_off] = [r for r in caplog.records if r.getMessage().startswith("mailer.login_put_off")]
        assert put_off.levelname == "WARNING"
        assert sink.messages == []

    def test_a_password_beyond_ascii_is_a_retryable_mail_error_not_a_crash(
        self, tls_server: SmtpSink, certificate: tuple[Path, Path]
    ) -> None:
        # The settings refuse it at start; a mailer made otherwise still keeps the promise
        # that only mail errors leave it (smtplib raised UnicodeEncodeError, and the worker
        # logged job.crashed and let jobs die of "internal error").
        settings = SmtpMailerSettings(
            host="127.0.0.1",
            port=tls_server.port,
            security="starttls",
            username=USER,
            password=PASSWORD,
            ca_file=certificate[0],
            timeout=5,
        ).model_copy(update={"password": SecretStr("s3cré t p@ss")})
        mailer = SmtpMailer(settings)
        with pytest.raises(RetryableMailError, match="beyond ASCII") as raised:
            mailer.send(_mail())
        assert "s3cr" not in str(raised.value)
        assert isinstance(raised.value.__cause__, UnicodeEncodeError)
        assert tls_server.messages == []

    def test_starttls_to_a_port_of_implicit_tls_says_to_set_ssl(
        self, implicit_tls_server: SmtpSink, certificate: tuple[Path, Path]
    ) -> None:
        # NEWSLETTER_MAILER__PORT=465 alone, STARTTLS by default: the relay waits for the
        # TLS handshake and says nothing, and each send waited its whole timeout to be
        # recorded as too slow, with nothing of why.
        settings = SmtpMailerSettings(
            host="127.0.0.1",
            port=implicit_tls_server.port,
            security="starttls",
            username=USER,
            password=PASSWORD,
            ca_file=certificate[0],
            timeout=0.5,
        )
        hint = r"no greeting .* TLS from the first byte .*NEWSLETTER_MAILER__SECURITY=ssl"
        # Said whether the read's timeout or the send's deadline came first.
        with pytest.raises(RetryableMailError, match=hint):
            SmtpMailer(settings).send(_mail())
        with pytest.raises(RetryableMailError, match=rf"\(starttls\): .*{hint}"):
            SmtpMailer(settings).check()
        assert implicit_tls_server.messages == []

    @pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1 is deprecated:DeprecationWarning")
    def test_a_failed_starttls_handshake_is_retryable_and_sends_nothing_in_clear(
        self, certificate: tuple[Path, Path]
    ) -> None:
        # The relay offers STARTTLS and answers it with 220, then speaks only TLS 1.0,
        # which the mailer's TLS (1.2 at least) refuses: the handshake fails.
        cert, key = certificate
        old_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        old_tls.load_cert_chain(cert, key)
        old_tls.maximum_version = ssl.TLSVersion.TLSv1

        class Watching(SmtpSink):
            commands: list[str]

            async def handle_MAIL(
                self, server: Any, session: Any, envelope: Any, address: str, options: Any
            ) -> str:
                self.commands.append("MAIL")
                return "250 OK"

        sink = Watching(host="127.0.0.1", port=free_port())
        sink.commands = []
        controller = Controller(
            sink, hostname=sink.host, port=sink.port, tls_context=old_tls, require_starttls=True
        )
        controller.start()
        try:
            mailer = SmtpMailer(
                SmtpMailerSettings(
                    host="127.0.0.1",
                    port=sink.port,
                    security="starttls",
                    ca_file=cert,
                    timeout=5,
                )
            )
            # Which the mailer sees, a TLS alert or the connection reset, is a matter of
            # timing: either way the record says where it broke.
            with pytest.raises(
                RetryableMailError,
                match=rf"^127\.0\.0\.1:{sink.port} \(starttls\): .* \(the TLS handshake "
                r"after STARTTLS failed: ",
            ):
                mailer.send(_mail())
        finally:
            controller.stop()
        assert sink.commands == []
        assert sink.messages == []

    def test_an_untrusted_certificate_is_refused(self, tls_server: SmtpSink) -> None:
        mailer = SmtpMailer(
            SmtpMailerSettings(
                host="127.0.0.1",
                port=tls_server.port,
                security="starttls",
                username=USER,
                password=PASSWORD,
                timeout=5,
            )
        )
        with pytest.raises(RetryableMailError, match=r"CERTIFICATE_VERIFY_FAILED|SSL"):
            mailer.send(_mail())
        assert tls_server.messages == []

    def test_authentication_configured_but_not_offered_is_retryable(self, smtp: SmtpSink) -> None:
        mailer = SmtpMailer(
            SmtpMailerSettings(
                host="127.0.0.1",
                port=smtp.port,
                security="none",
                username=USER,
                password=PASSWORD,
                timeout=5,
            )
        )
        with pytest.raises(RetryableMailError, match="AUTH"):
            mailer.send(_mail())

    def test_starttls_configured_but_not_offered_sends_nothing_in_clear(
        self, smtp: SmtpSink
    ) -> None:
        mailer = SmtpMailer(
            SmtpMailerSettings(host="127.0.0.1", port=smtp.port, security="starttls", timeout=5)
        )
        with pytest.raises(RetryableMailError, match="STARTTLS"):
            mailer.send(_mail())
        time.sleep(0.2)
        assert smtp.messages == []

    def test_a_server_down_is_retryable(self) -> None:
        mailer = SmtpMailer(
            SmtpMailerSettings(host="127.0.0.1", port=free_port(), security="none", timeout=2)
        )
        with pytest.raises(RetryableMailError):
            mailer.send(_mail())

    def test_a_failure_s_record_names_the_relay(self) -> None:
        # `ConnectionRefusedError: [Errno 111] Connection refused` alone, in a job's record,
        # did not say which server.
        nobody = free_port()
        down = SmtpMailer(
            SmtpMailerSettings(host="127.0.0.1", port=nobody, security="none", timeout=2)
        )
        with pytest.raises(
            RetryableMailError,
            match=rf"^127\.0\.0\.1:{nobody} \(none\): ConnectionRefusedError: ",
        ):
            down.send(_mail())

        class Closing(SmtpSink):
            async def handle_MAIL(
                self, server: Any, session: Any, envelope: Any, address: str, options: Any
            ) -> str:
                return "421 4.3.2 System shutting down"

        sink = Closing(host="127.0.0.1", port=free_port())
        controller = Controller(sink, hostname=sink.host, port=sink.port)
        controller.start()
        try:
            closing = SmtpMailer(
                SmtpMailerSettings(host="127.0.0.1", port=sink.port, security="none", timeout=5)
            )
            with pytest.raises(
                RetryableMailError,
                match=rf"^127\.0\.0\.1:{sink.port} \(none\): SMTPSenderRefused: "
                r"421 4\.3\.2 System shutting down$",
            ):
                closing.send(_mail())
        finally:
            controller.stop()

    @pytest.mark.parametrize(
        "banner",
        [
            "421 4.3.2 relay.example.org Service not available, closing transmission channel",
            # Postfix's client takes a 5xx greeting for a relay unable to serve for now
            # (smtp_skip_5xx_greeting); ours is the only relay, its settings to fix.
            "554 5.7.1 relay.example.org ESMTP not accepting mail from this client",
        ],
    )
    def test_a_greeting_that_turns_the_mailer_away_is_retryable_and_said(self, banner: str) -> None:
        class Counting(SmtpSink):
            quits = 0

            async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
                self.quits += 1
                return "221 Bye"

        sink = Counting(host="127.0.0.1", port=free_port())
        controller = _GreetingController(sink, banner=banner, hostname=sink.host, port=sink.port)
        controller.start()
        try:
            mailer = SmtpMailer(
                SmtpMailerSettings(host="127.0.0.1", port=sink.port, security="none", timeout=5)
            )
            with pytest.raises(
                RetryableMailError,
                match=rf"^127\.0\.0\.1:{sink.port} \(none\): SMTPConnectError: "
                rf"{re.escape(banner)}$",
            ):
                mailer.send(_mail())
        finally:
            controller.stop()
        assert sink.messages == []
        if banner.startswith("554"):
            # The relay waits for it (RFC 5321 3.1), answering 503 to anything else.
            assert sink.quits == 1

    @pytest.mark.parametrize("security", ["none", "starttls"])
    def test_a_relay_putting_the_mailer_off_at_ehlo_is_said_in_its_words(
        self, certificate: tuple[Path, Path], security: str
    ) -> None:
        # Postfix's `421 4.7.0 ... Error: too many connections from ...` answers EHLO
        # (with STARTTLS, the one after the handshake), then the relay hangs up. smtplib
        # fell back to HELO on the closed connection, and the record said only
        # `SMTPServerDisconnected: Connection unexpectedly closed`.
        busy = "421 4.7.0 relay.example.org Error: too many connections from 127.0.0.1"
        cert, key = certificate
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert, key)

        class Busy(SmtpSink):
            async def handle_EHLO(
                self, server: Any, session: Any, envelope: Any, hostname: str, responses: Any
            ) -> Any:
                if security == "starttls" and not session.ssl:
                    return responses
                # Hung up once the answer is written.
                asyncio.get_running_loop().call_soon(server.transport.close)
                return [busy]

        sink = Busy(host="127.0.0.1", port=free_port())
        controller = Controller(sink, hostname=sink.host, port=sink.port, tls_context=tls)
        controller.start()
        try:
            mailer = SmtpMailer(
                SmtpMailerSettings(
                    host="127.0.0.1", port=sink.port, security=security, ca_file=cert, timeout=5
                )
            )
            with pytest.raises(
                RetryableMailError,
                match=rf"^127\.0\.0\.1:{sink.port} \({security}\): SMTPHeloError: "
                rf"{re.escape(busy)}$",
            ):
                mailer.send(_mail())
        finally:
            controller.stop()
        assert sink.messages == []

    def test_a_relay_that_does_not_know_ehlo_is_greeted_with_helo(self) -> None:
        class Old(SmtpSink):
            helos = 0

            async def handle_EHLO(
                self, server: Any, session: Any, envelope: Any, hostname: str, responses: Any
            ) -> Any:
                return ["502 5.5.2 Error: command not recognized"]

            async def handle_HELO(
                self, server: Any, session: Any, envelope: Any, hostname: str
            ) -> str:
                self.helos += 1
                session.host_name = hostname
                return "250 relay.example.org"

        sink = Old(host="127.0.0.1", port=free_port())
        controller = Controller(sink, hostname=sink.host, port=sink.port)
        controller.start()
        try:
            mailer = SmtpMailer(
                SmtpMailerSettings(host="127.0.0.1", port=sink.port, security="none", timeout=5)
            )
            assert mailer.send(_mail()) == f"accepted by 127.0.0.1:{sink.port}"
        finally:
            controller.stop()
        assert (sink.helos, len(sink.messages)) == (1, 1)

    @pytest.mark.parametrize("step", ["RCPT", "DATA"])
    def test_a_refusal_quoting_an_address_beyond_ascii_is_recorded_in_its_letters(
        self, step: str
    ) -> None:
        # smtplib's replies are bytes, whose repr wrote `j\xc3\xa9r\xc3\xb4me@...` in the
        # job's record: an erasure of the address looked for `jérôme@...` and left it there.
        address = "jérôme@example.org"
        # On two lines, as Gmail's: the record keeps one.
        refusal = f"550-5.1.1 <{address}>: Recipient address rejected:\r\n550 5.1.1 User unknown"

        async def refuse(self: SmtpSink, server: Any, session: Any, envelope: Any, *_: Any) -> str:
            return refusal

        sink = type("Refusing", (SmtpSink,), {f"handle_{step}": refuse})(
            host="127.0.0.1", port=free_port()
        )
        controller = Controller(sink, hostname=sink.host, port=sink.port, enable_SMTPUTF8=True)
        controller.start()
        try:
            mailer = SmtpMailer(
                SmtpMailerSettings(host="127.0.0.1", port=sink.port, security="none", timeout=5)
            )
            with pytest.raises(PermanentMailError) as refused:
                mailer.send(_mail(to=address))
        finally:
            controller.stop()
        record = str(refused.value)
        assert f"550 5.1.1 <{address}>: Recipient address rejected: 5.1.1 User unknown" in record
        assert "\n" not in record
        assert privacy.scrub_text(record, address=address) == record.replace(
            address, privacy.ERASED
        )
        assert "j*****@example.org" in logs.mask_addresses(record)

    def test_a_refused_recipient_is_permanent(self) -> None:
        with (
            _refusing_at_rcpt("550 5.1.1 No such user") as (_sink, mailer),
            pytest.raises(PermanentMailError, match="550"),
        ):
            mailer.send(_mail())

    @pytest.mark.parametrize(
        "reply",
        [
            # RFC 5321 4.5.3.1.10: too many recipients, or no room for now, at RCPT; a
            # client SHOULD take it as 452. A full mailbox (RFC 3463 X.2.2) is a
            # "persistent transient" failure: it may be emptied.
            "552 5.5.3 Too many recipients",
            "552 5.2.2 Mailbox full",
        ],
    )
    def test_552_at_rcpt_is_taken_as_452_and_retried(self, reply: str) -> None:
        with (
            _refusing_at_rcpt(reply) as (sink, mailer),
            pytest.raises(RetryableMailError, match=f"recipient deferred: {reply}"),
        ):
            mailer.send(_mail())
        assert sink.messages == []

    @pytest.mark.parametrize(
        ("step", "reply", "error", "said"),
        [
            # The sender: the settings or the relay's to fix, nothing of the recipient's.
            ("MAIL", "550 5.7.1 Sender address rejected", RetryableMailError, "550"),
            ("DATA", "451 4.3.0 Try again later", RetryableMailError, "message deferred: 451"),
            ("DATA", "554 5.6.0 Message rejected", PermanentMailError, "message refused: 554"),
            # This client or its sender, for every mail until the settings are fixed
            # (Microsoft 365's answer to a sender the account may not send as).
            (
                "DATA",
                "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
                RetryableMailError,
                r"does not take mail from this client or sender as configured: 550 5\.7\.60 "
                r"SMTP; Client does not have permissions to send as this sender "
                r"\(NEWSLETTER_MAIL_FROM",
            ),
            ("DATA", "530 Authentication required", RetryableMailError, "as configured: 530"),
            # Too big for the relay: the same mail would be refused again.
            (
                "DATA",
                "552 5.3.4 Message size exceeds fixed limit",
                PermanentMailError,
                "message refused: 552",
            ),
            # A relay closing the session (RFC 5321 3.8): smtplib closes the connection.
            ("RCPT", "421 4.7.0 Too many errors, closing", RetryableMailError, "deferred: 421"),
            ("DATA", "421 4.3.2 System shutting down", RetryableMailError, "deferred: 421"),
            # A connection closed mid-session, before the mail was taken.
            ("RCPT", None, RetryableMailError, "SMTPServerDisconnected"),
            ("DATA", None, RetryableMailError, "SMTPServerDisconnected"),
        ],
    )
    def test_each_step_s_refusal_is_retried_or_given_up_as_it_says(
        self, step: str, reply: str | None, error: type[Exception], said: str
    ) -> None:
        async def answer(self: SmtpSink, server: Any, session: Any, envelope: Any, *_: Any) -> str:
            if reply is None:
                server.transport.close()
                return "250 OK"  # never read
            return reply

        refusing = type("Refusing", (SmtpSink,), {f"handle_{step}": answer})
        sink = refusing(host="127.0.0.1", port=free_port())
        controller = Controller(sink, hostname=sink.host, port=sink.port)
        controller.start()
        try:
            mailer = SmtpMailer(
                SmtpMailerSettings(host="127.0.0.1", port=sink.port, security="none", timeout=5)
            )
            with pytest.raises(error, match=said):
                mailer.send(_mail())
        finally:
            controller.stop()
        assert sink.messages == []

    @pytest.mark.parametrize(
        "reply",
        [
            # Postfix's reject_unauth_destination, to a client neither authenticated nor
            # among its networks.
            "554 5.7.1 <camille@example.org>: Relay access denied",
            "530 5.7.0 Authentication required",
            "530 Authentication required",
        ],
    )
    def test_a_relay_refusing_this_client_at_rcpt_is_retryable_so_nothing_is_lost(
        self, reply: str
    ) -> None:
        # Every mail gets this answer until the relay or the settings are fixed: each
        # confirmation was dead at its first attempt, as if the address did not exist.
        with (
            _refusing_at_rcpt(reply) as (sink, mailer),
            pytest.raises(RetryableMailError, match="does not take mail from this client"),
        ):
            mailer.send(_mail())
        assert sink.messages == []

    def test_the_envelope_goes_to_the_validated_address_not_to_a_reading_of_the_header(
        self,
    ) -> None:
        # A valid dot-atom that a header parser (and aiosmtpd's) decodes as an RFC 2047
        # word, "victim": the RCPT line is read raw, by a server that only records.
        address = addresses.parse("=?utf-8?q?victim?=@example.org", new=True).email
        lines = _recorded(_mail(to=address))
        recipients = [line[4:] for line in lines if line[:4].upper() == "RCPT"]
        assert recipients == [f" TO:<{address}>"]

    def test_an_internationalized_domain_goes_in_ascii_to_a_server_without_smtputf8(
        self,
    ) -> None:
        # The recording server offers no extension: SMTPUTF8 would be refused. The domain's
        # ASCII form (IDNA) needs none, in the envelope as in the header.
        address = addresses.parse("camille@exämple.fr", new=True).email
        assert address == "camille@exämple.fr"  # stored as typed
        lines = _recorded(_mail(to=address))
        assert [line for line in lines if line[:4].upper() in ("MAIL", "RCPT")] == [
            "mail FROM:<bluehats@code.gouv.fr>",  # as smtplib writes them
            "rcpt TO:<camille@xn--exmple-cua.fr>",
        ]

    def test_letters_beyond_ascii_before_the_at_sign_go_with_smtputf8(self, smtp: SmtpSink) -> None:
        address = addresses.parse("chloé@exämple.fr", new=True).email
        mailer = SmtpMailer(
            SmtpMailerSettings(host="127.0.0.1", port=smtp.port, security="none", timeout=5)
        )
        assert "accepted" in mailer.send(_mail(to=address))
        smtp.wait_for(1)
        [envelope] = smtp.envelopes
        assert "SMTPUTF8" in envelope.mail_options
        assert envelope.rcpt_tos == ["chloé@exämple.fr"]
        # The header in UTF-8 (RFC 6532), not RFC 2047 words, which no address may hold.
        assert "To: chloé@exämple.fr".encode() in envelope.original_content.splitlines()

    def test_letters_beyond_ascii_before_the_at_sign_fail_for_good_without_smtputf8(
        self,
    ) -> None:
        # The recording server announces no SMTPUTF8: the mail can never go through that
        # relay, so it is not retried for hours; nothing of it reaches the server.
        address = addresses.parse("chloé@exämple.fr", new=True).email
        with _recording() as server:
            mailer = SmtpMailer(
                SmtpMailerSettings(
                    host="127.0.0.1", port=server.server_address[1], security="none", timeout=5
                )
            )
            with pytest.raises(PermanentMailError, match="SMTPUTF8"):
                mailer.send(_mail(to=address))
        assert not [line for line in server.lines if line[:4].upper() in ("MAIL", "RCPT", "DATA")]


# Each form NEWSLETTER_MAIL_FROM takes, with the name a mail client shows.
SENDERS = [
    ("bluehats@code.gouv.fr", ""),
    ("BlueHats <bluehats@code.gouv.fr>", "BlueHats"),
    ('"Gazette BlueHats, DINUM" <bluehats@code.gouv.fr>', "Gazette BlueHats, DINUM"),
    ("L'équipe BlueHats <bluehats@code.gouv.fr>", "L'équipe BlueHats"),
]


class TestSender:
    @pytest.mark.parametrize(("mail_from", "name"), SENDERS)
    def test_the_envelope_sender_is_the_from_address_alone(self, mail_from: str, name: str) -> None:
        lines = _recorded(_mail(mail_from=mail_from))
        assert [line for line in lines if line[:4].upper() == "MAIL"] == [
            "mail FROM:<bluehats@code.gouv.fr>"
        ]

    @pytest.mark.parametrize(("mail_from", "name"), SENDERS)
    def test_the_from_header_reads_back_as_one_mailbox_with_its_name(
        self, smtp: SmtpSink, mail_from: str, name: str
    ) -> None:
        mailer = SmtpMailer(
            SmtpMailerSettings(host="127.0.0.1", port=smtp.port, security="none", timeout=5)
        )
        mailer.send(_mail(mail_from=mail_from))
        [message] = smtp.wait_for(1)
        [envelope] = smtp.envelopes
        assert envelope.mail_from == "bluehats@code.gouv.fr"
        assert [(a.display_name, a.addr_spec) for a in message["From"].addresses] == [
            (name, "bluehats@code.gouv.fr")
        ]
        assert message["Message-ID"] == "<1.test@code.gouv.fr>"


def _received(sink: SmtpSink, mail: OutgoingMail) -> bytes:
    """The bytes of `mail` as the real SMTP server `sink` received them (dot-unstuffed)."""
    mailer = SmtpMailer(
        SmtpMailerSettings(host="127.0.0.1", port=sink.port, security="none", timeout=5)
    )
    assert "accepted" in mailer.send(mail)
    sink.wait_for(1)
    content: bytes = sink.envelopes[-1].original_content
    return content


def _header_lines(raw: bytes) -> list[bytes]:
    return raw.partition(b"\r\n\r\n")[0].split(b"\r\n")


class TestWhatReceiversGet:
    """Each mail as a relay and a mail client read it: the bytes the SMTP server got."""

    def _unsubscribe_mail(self, link: str) -> OutgoingMail:
        return compose(
            MailKind.UNSUBSCRIBE,
            locale=Locale.FR,
            list_name="Gazette BlueHats",
            to="camille@example.org",
            mail_from="BlueHats <bluehats@code.gouv.fr>",
            message_key="1.test",
            link=link,
            unsubscribe_link=link,
        )

    def test_an_https_unsubscribe_link_offers_one_click(self, smtp: SmtpSink) -> None:
        link = "https://newsletter.code.gouv.fr/v1/unsubscribe/abc"
        lines = _header_lines(_received(smtp, self._unsubscribe_mail(link)))
        assert f"List-Unsubscribe: <{link}>".encode() in lines
        assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in lines

    def test_an_http_unsubscribe_link_is_given_without_claiming_one_click(
        self, smtp: SmtpSink
    ) -> None:
        # RFC 8058 3.1: List-Unsubscribe-Post needs an HTTPS URI in List-Unsubscribe; a
        # development URL (`make run`) claimed one-click over plain http.
        link = "http://127.0.0.1:8000/v1/unsubscribe/abc"
        lines = _header_lines(_received(smtp, self._unsubscribe_mail(link)))
        assert f"List-Unsubscribe: <{link}>".encode() in lines
        assert not [line for line in lines if line.lower().startswith(b"list-unsubscribe-post")]

    @pytest.mark.parametrize("kind", list(MailKind))
    def test_each_mail_is_a_well_formed_transactional_mail(
        self, smtp: SmtpSink, kind: MailKind
    ) -> None:
        link = "https://newsletter.code.gouv.fr/v1/unsubscribe/" + "v41Iis0Bbq-eeyuGIGg_" * 3
        mail = compose(
            kind,
            locale=Locale.FR,
            list_name="Lettre d'information « L'été à la DINUM » — numéro spécial",
            to="camille@example.org",
            mail_from="L'équipe BlueHats <bluehats@code.gouv.fr>",
            message_key="7.20261130.newsletter",
            link=link,
        )
        raw = _received(smtp, mail)
        assert raw.isascii()
        assert b"\n" not in raw.replace(b"\r\n", b"")
        assert max(map(len, raw.split(b"\r\n"))) <= 78
        [message] = smtp.messages
        assert message["Message-ID"] == "<7.20261130.newsletter@code.gouv.fr>"
        assert abs(message["Date"].datetime - datetime.now(UTC)) < timedelta(minutes=1)
        assert message["Auto-Submitted"] == "auto-generated"
        assert message["MIME-Version"] == "1.0"
        assert message.get_content_type() == "multipart/alternative"
        parts = list(message.iter_parts())
        # Plain text first: the last part is the one a client prefers (RFC 2046 5.1.4).
        assert [part.get_content_type() for part in parts] == ["text/plain", "text/html"]
        for part in parts:
            assert part.get_content_charset() == "utf-8"
            assert part["Content-Transfer-Encoding"] in ("7bit", "quoted-printable")
            assert "été à la DINUM" in part.get_content()
        assert message["Subject"].endswith(
            "Lettre d'information « L'été à la DINUM » — numéro spécial"
        )

    @pytest.mark.parametrize("kind", list(MailKind))
    def test_control_characters_in_a_stored_list_name_reach_no_header_nor_7bit_part(
        self, smtp: SmtpSink, kind: MailKind
    ) -> None:
        # A name stored before the settings refused them (NUL, escape, DEL, C1): written as
        # they were in the Subject, which RFC 5322 forbids and relays may refuse.
        mail = compose(
            kind,
            locale=Locale.EN,
            list_name="Gazette\x00Blue\x1bHats\x7f\x9b!",
            to="camille@example.org",
            mail_from="BlueHats <bluehats@code.gouv.fr>",
            message_key="1.test",
            link="https://newsletter.code.gouv.fr/v1/unsubscribe/abc",
        )
        raw = _received(smtp, mail)
        assert re.findall(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", raw) == []
        assert b"\n" not in raw.replace(b"\r\n", b"")  # no bare LF
        assert b"\r" not in raw.replace(b"\r\n", b"")  # no bare CR
        [message] = smtp.messages
        assert "Gazette Blue Hats !" in message["Subject"]

    @pytest.mark.parametrize(
        "name",
        [
            # 200 characters, the most the settings and the API take: words, and one run
            # without a space that the folder must cut.
            ("Lettre d'information de l'équipe BlueHats « L'été » " * 5)[:200].strip(),
            ("Lettre-d'information-de-l'équipe-BlueHats-" * 5)[:200],
        ],
    )
    @pytest.mark.parametrize("to", ["camille@example.org", "jérôme@example.org"])
    @pytest.mark.parametrize("locale", list(Locale))
    def test_a_list_name_of_the_longest_allowed_arrives_folded_and_whole(
        self, smtp: SmtpSink, name: str, to: str, locale: Locale
    ) -> None:
        link = "https://newsletter.code.gouv.fr/v1/unsubscribe/" + "v41Iis0Bbq-eeyuGIGg_" * 3
        mail = compose(
            MailKind.UNSUBSCRIBE,
            locale=locale,
            list_name=name,
            to=to,
            mail_from="BlueHats <bluehats@code.gouv.fr>",
            message_key="1.test",
            link=link,
            unsubscribe_link=link,
        )
        raw = _received(smtp, mail)  # with SMTPUTF8 (UTF-8 headers) to jérôme
        assert b"\n" not in raw.replace(b"\r\n", b"")
        assert max(map(len, raw.split(b"\r\n"))) <= 998
        lines = _header_lines(raw)
        # The link alone is not folded (RFC 2369: a URL on its line).
        assert f"List-Unsubscribe: <{link}>".encode() in lines
        assert max(len(line) for line in lines if not line.startswith(b"List-Unsubscribe:")) <= 78
        [message] = smtp.messages
        assert message.defects == []
        assert str(message["Subject"]).endswith(name)
        assert message["To"] == to
        for part in message.iter_parts():
            assert part.get_content_charset() == "utf-8"

    def test_a_long_sender_name_arrives_folded_and_whole(self, smtp: SmtpSink) -> None:
        name = "Lettre d'information de la Direction interministérielle du numérique " * 5
        name = name.strip()
        raw = _received(smtp, _mail(mail_from=f"{name} <bluehats@code.gouv.fr>"))
        lines = _header_lines(raw)
        assert max(map(len, lines)) <= 78
        from_value = raw.partition(b"\r\nTo:")[0].removeprefix(b"From:").decode("ascii")
        # Read as mail clients do (RFC 2047 6.2: words split inside a word join again).
        assert str(make_header(decode_header(from_value))).strip() == (
            f"{name} <bluehats@code.gouv.fr>"
        )


class TestConnectionReuse:
    def _mailer(self, sink: SmtpSink) -> SmtpMailer:
        return SmtpMailer(
            SmtpMailerSettings(host="127.0.0.1", port=sink.port, security="none", timeout=5)
        )

    def test_the_mails_of_a_batch_share_one_connection_and_it_is_closed_after(self) -> None:
        sink = PeerSink()
        controller = Controller(sink, hostname=sink.host, port=sink.port)
        controller.start()
        try:
            mailer = self._mailer(sink)
            with mailer.batch():
                for _ in range(3):
                    mailer.send(_mail())
            # Outside a batch each mail has its own connection, as before.
            mailer.send(_mail())
            sink.wait_for(4)
        finally:
            controller.stop()
        assert len(sink.messages) == 4
        first, second, third, alone = sink.peers
        assert first == second == third != alone

    def test_a_connection_the_server_closed_between_two_mails_is_replaced(self) -> None:
        sink = PeerSink()
        # The server hangs up on a client idle for 0.2 s.
        controller = Controller(sink, hostname=sink.host, port=sink.port, timeout=0.2)
        controller.start()
        try:
            mailer = self._mailer(sink)
            with mailer.batch():
                assert "accepted" in mailer.send(_mail())
                time.sleep(0.6)
                assert "accepted" in mailer.send(_mail())
            sink.wait_for(2)
        finally:
            controller.stop()
        assert len(sink.messages) == 2
        assert sink.peers[0] != sink.peers[1]

    def test_a_connection_the_server_hung_up_with_421_is_replaced(self) -> None:
        # smtplib returns the 421 that a relay sends before hanging up on an idle client;
        # the next mail of the batch then failed on the closed connection.
        with _recording(_HangingUpSmtpHandler) as server:
            mailer = SmtpMailer(
                SmtpMailerSettings(
                    host="127.0.0.1", port=server.server_address[1], security="none", timeout=5
                )
            )
            with mailer.batch():
                assert "accepted" in mailer.send(_mail())
                time.sleep(0.6)
                assert "accepted" in mailer.send(_mail())
        first, second = server.lines
        assert first != second  # each on its own connection

    def test_a_refused_mail_does_not_leave_its_connection_for_the_next(self) -> None:
        class RefusingOne(PeerSink):
            async def handle_RCPT(
                self, server: Any, session: Any, envelope: Any, address: str, options: Any
            ) -> str:
                if address == "refused@example.org":
                    return "550 5.1.1 No such user"
                envelope.rcpt_tos.append(address)
                return "250 OK"

        sink = RefusingOne()
        controller = Controller(sink, hostname=sink.host, port=sink.port)
        controller.start()
        try:
            mailer = self._mailer(sink)
            refused = _mail(to="refused@example.org")
            with mailer.batch():
                with pytest.raises(PermanentMailError, match="550"):
                    mailer.send(refused)
                assert "accepted" in mailer.send(_mail())
            sink.wait_for(1)
        finally:
            controller.stop()
        assert [message["To"] for message in sink.messages] == ["camille@example.org"]


class TestDeadline:
    """A server answering a byte at a time stays within the timeout of each read; the
    send as a whole still ends at the settings' timeout, its connection closed."""

    def _mailer(self, server: TricklingSmtp) -> SmtpMailer:
        return SmtpMailer(
            SmtpMailerSettings(host="127.0.0.1", port=server.port, security="none", timeout=1)
        )

    @pytest.mark.parametrize(
        ("step", "maybe_taken"),
        [
            # The whole mail went out, the relay's answer to it did not come: it may have
            # taken the mail, and the retry may deliver it twice. The record says so.
            ("DATA", True),
            # Cut before the data: nothing of the mail was taken.
            ("RCPT", False),
        ],
    )
    def test_a_cut_after_the_whole_mail_says_the_relay_may_have_taken_it(
        self, step: str, maybe_taken: bool
    ) -> None:
        async def slow(self: SmtpSink, server: Any, session: Any, envelope: Any, *_: Any) -> str:
            await asyncio.sleep(3)
            return "451 4.3.0 too late"

        sink = type("Slow", (SmtpSink,), {f"handle_{step}": slow})(
            host="127.0.0.1", port=free_port()
        )
        controller = Controller(sink, hostname=sink.host, port=sink.port)
        controller.start()
        try:
            mailer = SmtpMailer(
                SmtpMailerSettings(host="127.0.0.1", port=sink.port, security="none", timeout=0.5)
            )
            with pytest.raises(RetryableMailError) as cut:
                mailer.send(_mail())
        finally:
            controller.stop()
        said = str(cut.value)
        assert said.startswith(("SMTP send abandoned at its deadline", "127.0.0.1:"))
        assert ("the relay had the whole mail and may have taken it" in said) is maybe_taken

    def test_a_greeting_trickled_a_byte_at_a_time_is_abandoned_at_the_deadline(self) -> None:
        # 33 bytes, one every 0.2 s: the greeting alone would take 6.6 s.
        server = TricklingSmtp(trickle="greeting")
        try:
            started = time.monotonic()
            with pytest.raises(
                RetryableMailError,
                match=r"abandoned at its deadline: .* more than 1s in all "
                r"\(NEWSLETTER_MAILER__TIMEOUT\)",
            ):
                self._mailer(server).send(_mail())
            elapsed = time.monotonic() - started
            # The next connection is greeted at once: the retry goes through.
            assert "accepted" in self._mailer(server).send(_mail())
        finally:
            server.close()
        assert 0.9 < elapsed < 1.6
        assert server.delivered == ["camille@example.org"]

    def test_a_goodbye_trickled_at_the_end_of_a_batch_holds_it_no_longer_than_the_deadline(
        self,
    ) -> None:
        # The QUIT's answer would take 9 s; the mail was accepted before it.
        server = TricklingSmtp(trickle="quit")
        try:
            mailer = self._mailer(server)
            with mailer.batch():
                assert "accepted" in mailer.send(_mail())
                started = time.monotonic()
            elapsed = time.monotonic() - started
        finally:
            server.close()
        assert elapsed < 1.6
        assert server.delivered == ["camille@example.org"]


class TestCheck:
    """`newsletter check`'s reach of the relay: the whole way to a login, and no mail."""

    def _mailer(self, sink: SmtpSink, **settings: Any) -> SmtpMailer:
        return SmtpMailer(
            SmtpMailerSettings(
                **{
                    "host": "127.0.0.1",
                    "port": sink.port,
                    "security": "starttls",
                    "username": USER,
                    "password": PASSWORD,
                    "timeout": 5,
                    **settings,
                }
            )
        )

    def test_a_relay_that_takes_the_login_is_reached_and_sent_nothing(
        self, tls_server: SmtpSink, certificate: tuple[Path, Path]
    ) -> None:
        answer = self._mailer(tls_server, ca_file=certificate[0]).check()
        assert answer == (
            f"127.0.0.1:{tls_server.port} (starttls): the relay answered, logged in as "
            f"{USER}; nothing was sent"
        )
        assert tls_server.messages == []

    def test_a_refused_login_is_said_with_the_relay_s_answer_and_the_settings(
        self, tls_server: SmtpSink, certificate: tuple[Path, Path]
    ) -> None:
        mailer = self._mailer(tls_server, ca_file=certificate[0], password="wrong")
        with pytest.raises(
            RetryableMailError,
            match=r"\(starttls\): login refused: 535 .*\(NEWSLETTER_MAILER__USERNAME, "
            r"NEWSLETTER_MAILER__PASSWORD\)",
        ):
            mailer.check()

    def test_a_login_the_relay_puts_off_for_now_is_said_as_no_refusal(self) -> None:
        def authenticator(*_: Any) -> AuthResult:
            return AuthResult(
                success=False, handled=False, message="454 4.7.0 Temporary authentication failure"
            )

        sink, controller = start_login_smtp(authenticator)
        try:
            with pytest.raises(
                RetryableMailError,
                match=r"\(none\): login put off: 454 4\.7\.0 Temporary authentication failure "
                r"\(the relay fails for now; the login was not refused\)$",
            ):
                self._mailer(sink, security="none").check()
        finally:
            controller.stop()

    def test_an_untrusted_certificate_is_said(self, tls_server: SmtpSink) -> None:
        with pytest.raises(
            RetryableMailError,
            match=r"CERTIFICATE_VERIFY_FAILED.* \(the relay's certificate is not trusted for "
            r"this host: one signed by a private CA needs NEWSLETTER_MAILER__CA_FILE",
        ):
            self._mailer(tls_server).check()

    def test_ssl_at_a_relay_s_plain_port_says_to_take_starttls(
        self, tls_server: SmtpSink, certificate: tuple[Path, Path]
    ) -> None:
        # The relay greets in plain text (STARTTLS, port 587), where the mailer expects a
        # TLS handshake: OpenSSL's WRONG_VERSION_NUMBER alone told the operator nothing.
        mailer = self._mailer(tls_server, security="ssl", ca_file=certificate[0])
        with pytest.raises(RetryableMailError) as raised:
            mailer.check()
        assert str(raised.value).startswith(f"127.0.0.1:{tls_server.port} (ssl): SSLError: ")
        assert str(raised.value).endswith(
            " (the relay did not answer in TLS: NEWSLETTER_MAILER__SECURITY=ssl is for a port "
            "that speaks TLS from the first byte (465); a port such as 587 or 25 takes starttls)"
        )
        assert tls_server.messages == []

    def test_starttls_at_a_relay_s_tls_port_says_to_take_ssl(
        self, implicit_tls_server: SmtpSink, certificate: tuple[Path, Path]
    ) -> None:
        # The relay waits in silence for a TLS handshake (port 465) that a starttls mailer
        # never starts: the connection closed at the timeout, and nothing said why.
        mailer = self._mailer(implicit_tls_server, ca_file=certificate[0], timeout=1)
        with pytest.raises(RetryableMailError) as raised:
            mailer.check()
        said = str(raised.value)
        # Ended by the socket's read timeout or by the deadline, both the timeout.
        assert said.startswith(
            f"127.0.0.1:{implicit_tls_server.port} (starttls): SMTPServerDisconnected: "
            "no greeting from the relay within NEWSLETTER_MAILER__TIMEOUT: if this port takes "
            "TLS from the first byte (RFC 8314, usually 465), set NEWSLETTER_MAILER__SECURITY=ssl"
        )

    def test_starttls_a_relay_does_not_offer_is_said(self, smtp: SmtpSink) -> None:
        with pytest.raises(RetryableMailError, match="does not offer what is configured"):
            self._mailer(smtp, username=None, password=None).check()

    def test_a_relay_that_is_not_there_is_said(self) -> None:
        port = free_port()
        with pytest.raises(RetryableMailError, match=rf"127.0.0.1:{port} .*ConnectionRefused"):
            self._mailer(SmtpSink(host="127.0.0.1", port=port), security="none").check()

    def test_the_development_mailer_checks_its_folder(self, tmp_path: Path) -> None:
        folder = tmp_path / "mail"
        mailer = FileMailer(FileMailerSettings(directory=folder))
        assert mailer.check() == f"development mailer: mails are written to {folder}, not sent"
        assert list(folder.iterdir()) == []
        blocked = tmp_path / "a-file"
        blocked.write_text("")
        with pytest.raises(RetryableMailError, match="cannot write mail files in"):
            FileMailer(FileMailerSettings(directory=blocked / "mail")).check()
