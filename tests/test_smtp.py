"""The SMTP mailer against real aiosmtpd servers: plain, STARTTLS with AUTH, implicit TLS."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from app.config import Locale, SmtpMailerSettings
from app.mailer import OutgoingMail, PermanentMailError, RetryableMailError, SmtpMailer
from app.mails import MailKind, compose
from tests.conftest import SmtpSink, free_port

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


def _mail() -> OutgoingMail:
    return compose(
        MailKind.CONFIRM,
        locale=Locale.FR,
        list_name="Gazette BlueHats",
        to="camille@example.org",
        mail_from="BlueHats <bluehats@code.gouv.fr>",
        message_key="1.test",
        link="http://testserver/v1/confirm/abc",
    )


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
        with pytest.raises(RetryableMailError, match="SMTPAuthenticationError"):
            mailer.send(_mail())
        assert tls_server.messages == []

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

    def test_a_server_down_is_retryable(self) -> None:
        mailer = SmtpMailer(
            SmtpMailerSettings(host="127.0.0.1", port=free_port(), security="none", timeout=2)
        )
        with pytest.raises(RetryableMailError):
            mailer.send(_mail())

    def test_a_refused_recipient_is_permanent(self) -> None:
        class Refusing(SmtpSink):
            async def handle_RCPT(
                self, server: Any, session: Any, envelope: Any, address: str, options: Any
            ) -> str:
                return "550 5.1.1 No such user"

        sink = Refusing(host="127.0.0.1", port=free_port())
        controller = Controller(sink, hostname=sink.host, port=sink.port)
        controller.start()
        try:
            mailer = SmtpMailer(
                SmtpMailerSettings(host="127.0.0.1", port=sink.port, security="none", timeout=5)
            )
            with pytest.raises(PermanentMailError, match="550"):
                mailer.send(_mail())
        finally:
            controller.stop()
