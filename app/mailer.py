"""Mail transports. Two domain errors cover every failure:

    MailError
     +-- RetryableMailError   server down, timeout (of a read, or the whole send's
     |                        deadline), 4xx, authentication trouble (including
     |                        credentials smtplib cannot send, and a relay refusing every
     |                        recipient or message of this client or sender: 530,
     |                        5.7.x), 552 at RCPT (taken as 452, RFC 5321 4.5.3.1.10):
     |                        try later
     +-- PermanentMailError   the server refused this recipient or this message (5xx): give up

No smtplib or socket exception leaves this module.
"""

from __future__ import annotations

import contextlib
import email.policy
import ipaddress
import logging
import smtplib
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from app import logs
from app.config import FileMailerSettings, MailerSettings, SmtpMailerSettings, SmtpSecurity

if TYPE_CHECKING:
    from smtplib import _AuthObject

    from _typeshed import ReadableBuffer

log = logging.getLogger(__name__)


class MailError(Exception):
    retryable = True


class RetryableMailError(MailError):
    retryable = True


class PermanentMailError(MailError):
    retryable = False


@dataclass(frozen=True, slots=True)
class OutgoingMail:
    message: EmailMessage
    # The link the mail is about, shown by the development mailer; never logged otherwise.
    link: str | None = None
    # The validated address the mail goes to: the SMTP envelope's, not read back from the
    # To header (whose parser decodes RFC 2047 words even in an address).
    recipient: str | None = None
    # The envelope's sender (MAIL FROM): the From's address as the settings' check read it,
    # not smtplib's reading of the header (`Gazette BlueHats, DINUM <...>` gave `Gazette`).
    sender: str | None = None


class Mailer(Protocol):
    # True when a send waits on a server: the worker then runs `worker_concurrency` sends at
    # a time in its pool. A local mailer's sends run one after the other in the worker's
    # own thread, where a thread hop would only cost CPU.
    waits_on_network: bool

    def send(self, mail: OutgoingMail) -> str:
        """Deliver the mail; return the server's answer for the attempt log."""
        ...

    def batch(self) -> AbstractContextManager[None]:
        """Sends inside the block may share what costs to set up (an SMTP connection)."""
        ...

    def check(self) -> str:
        """Reach what the sends need, sending nothing; say what was reached, or raise
        MailError saying what failed (`newsletter check`)."""
        ...


# The messages' policy (app.mails.POLICY), with headers written in UTF-8.
_SMTPUTF8 = email.policy.default.clone(refold_source="none", utf8=True)


def _as_sent(mail: OutgoingMail) -> bytes:
    """The mail's bytes as an SMTP server would get them: to an address with letters
    beyond ASCII, sent with SMTPUTF8, its headers in UTF-8 (RFC 6532), as `smtplib` writes
    them; RFC 2047 words are not allowed in an address."""
    if mail.recipient is None or mail.recipient.isascii():
        return mail.message.as_bytes()
    return mail.message.as_bytes(policy=_SMTPUTF8)


class FileMailer:
    """Development mailer: one .eml file per mail, and the mail's link in the log."""

    waits_on_network = False

    def __init__(self, settings: FileMailerSettings) -> None:
        self.directory = settings.directory

    def send(self, mail: OutgoingMail) -> str:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
            message_id = str(mail.message["Message-ID"]).strip("<>").split("@")[0]
            path = Path(self.directory, f"{stamp}-{message_id}.eml")
            path.write_bytes(_as_sent(mail))
        except OSError as e:
            raise RetryableMailError(f"cannot write mail file: {e}") from e
        # Development only: the link is what a developer needs to go on. A mail without
        # one (the goodbye) was logged with `link=None`.
        subject = str(mail.message["Subject"])
        if mail.link is None:
            log.info("mail.written path=%s subject=%r", path, subject)
        else:
            log.info(
                "mail.written path=%s subject=%r link=%s",
                path,
                subject,
                mail.link,
                # The one line allowed to show a link's token (see app.logs).
                extra={"shows_link": True},
            )
        return f"written to {path}"

    def batch(self) -> AbstractContextManager[None]:
        return nullcontext()

    def check(self) -> str:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.directory):
                pass
        except OSError as e:
            raise RetryableMailError(f"cannot write mail files in {self.directory}: {e}") from e
        return f"development mailer: mails are written to {self.directory}, not sent"


class _Deadline:
    """The time a send may take as a whole, from the connection to QUIT. smtplib's timeout
    bounds each read of the socket, not the exchange: a server answering a byte at a time,
    or a greeting that never ends, held a send for as long as it liked, past the job's
    lease. At the deadline a timer shuts down the connections the send uses, which ends
    whatever read, write or TLS handshake waits on them."""

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._lock = threading.Lock()
        # Duplicates of the connections' sockets: shutting one down ends the connection
        # under smtplib's own socket too; closing it leaves smtplib's socket open.
        self._lines: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._timer.cancel()
        with self._lock:
            lines, self._lines = self._lines, []
        for line in lines:
            line.close()

    def watch(self, sock: socket.socket | None) -> None:
        """Cut this connection at the deadline (at once when it has passed)."""
        if sock is None:
            return
        line = socket.fromfd(sock.fileno(), sock.family, sock.type, sock.proto)
        with self._lock:
            self._lines.append(line)
            if self.expired:
                _cut(line)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for line in self._lines:
                _cut(line)


def _cut(line: socket.socket) -> None:
    with contextlib.suppress(OSError):
        line.shutdown(socket.SHUT_RDWR)


class _Client(smtplib.SMTP):
    """smtplib's client, its connection watched by the send's deadline from the moment it
    is made: before the greeting and, with implicit TLS, before the handshake."""

    def __init__(
        self, *, timeout: float, deadline: _Deadline, tls: ssl.SSLContext | None, helo_name: str
    ) -> None:
        super().__init__(timeout=timeout, local_hostname=helo_name)
        self._deadline = deadline
        self._implicit_tls = tls
        # The connection was made (whatever came of the greeting).
        self.reached = False
        # The mail's data went out whole, its final dot included (reset for each mail).
        self.mail_sent = False

    # smtplib writes every command, and a mail's data, with it.
    def send(self, s: ReadableBuffer | str) -> None:
        super().send(s)
        if isinstance(s, bytes) and s.endswith(b"\r\n.\r\n"):
            self.mail_sent = True

    # smtplib's login tries each mechanism the relay offers, the next after each failure.
    def auth(
        self,
        mechanism: str,
        authobject: _AuthObject,
        *,
        initial_response_ok: bool = True,
    ) -> tuple[int, bytes]:
        try:
            return super().auth(mechanism, authobject, initial_response_ok=initial_response_ok)
        except smtplib.SMTPAuthenticationError as e:
            if not 400 <= e.smtp_code <= 499:
                raise
            # No next mechanism: after a `421` it went on the closed connection, and the
            # record said only `Connection unexpectedly closed`.
            raise _LoginPutOff(e.smtp_code, e.smtp_error) from e

    # smtplib's hook for the connection (`SMTP_SSL` wraps it in TLS here, as this does).
    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        # STARTTLS checks the certificate against it (smtplib sets it with a host given to
        # the constructor, which would connect before the deadline could watch).
        self._host = host
        sock = socket.create_connection((host, port), timeout, self.source_address)
        self._deadline.watch(sock)
        self.reached = True
        if self._implicit_tls is None:
            return sock
        return self._implicit_tls.wrap_socket(sock, server_hostname=host)


# After the relay refused the login, no send of the mailer logs in again for this long
# (seconds); the sends meanwhile fail at once, retryable, saying why and until when. Each
# mail of the queue tried the refused password (smtplib tries every mechanism the relay
# offers): hundreds of refused logins a minute, which relays answer by locking the account
# or banning the client's address (Microsoft 365's lockout, fail2ban on Postfix).
LOGIN_HOLD_OFF = 300.0


class _LoginPutOff(smtplib.SMTPResponseException):
    """A 4xx in answer to AUTH: the relay fails for now, the login is not refused. RFC
    4954's `454 4.7.0 Temporary authentication failure` (its directory down), Gmail's
    `454 4.7.0 Too many login attempts, please try again later`, a `421`. A 454 was logged
    and recorded as a refused login, pointing at the password."""


@dataclass(frozen=True, slots=True)
class _RefusedLogin:
    reply: str
    # When a send may try to log in again (time.monotonic()).
    until: float
    # A 4xx (`_LoginPutOff`): the relay's trouble, not the password.
    for_now: bool = False


class SmtpMailer:
    """One SMTP transaction per mail. Inside `batch()` a connection serves several mails
    one after the other (RSET between them), sparing the connection, the TLS handshake,
    EHLO, AUTH and QUIT of each; outside, each send has its own connection."""

    waits_on_network = True

    def __init__(
        self,
        settings: SmtpMailerSettings,
        *,
        public_host: str | None = None,
        login_hold_off: float = LOGIN_HOLD_OFF,
    ) -> None:
        self.settings = settings
        self.helo_name = settings.helo_name or helo_name(socket.getfqdn(), public_host)
        self.login_hold_off = login_hold_off
        # Connections between two sends of a batch, for any thread to take; None outside.
        self._idle: list[_Client] | None = None
        # The relay's refusal of the last login, until a login goes through.
        self._refused: _RefusedLogin | None = None
        self._lock = threading.Lock()

    @property
    def _where(self) -> str:
        """The relay as every record of a failure names it: `host:port (security)`."""
        s = self.settings
        return f"{s.host}:{s.port} ({s.security.value})"

    def _tls(self) -> ssl.SSLContext:
        ca_file = self.settings.ca_file
        return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)

    def _connect(self, deadline: _Deadline) -> _Client:
        s = self.settings
        implicit_tls = self._tls() if s.security == SmtpSecurity.SSL else None
        client = _Client(
            timeout=s.timeout, deadline=deadline, tls=implicit_tls, helo_name=self.helo_name
        )
        try:
            try:
                code, greeting = client.connect(s.host, s.port)
            except (smtplib.SMTPException, OSError) as e:
                waited = deadline.expired or isinstance(e.__context__ or e, TimeoutError)
                if client.reached and waited and s.security != SmtpSecurity.SSL:
                    # A port of implicit TLS (465) waits for the client's TLS handshake and
                    # says nothing: each send waited its whole timeout, and its record said
                    # it was slow, not why.
                    raise smtplib.SMTPServerDisconnected(
                        "no greeting from the relay within NEWSLETTER_MAILER__TIMEOUT: if this "
                        "port takes TLS from the first byte (RFC 8314, usually 465), set "
                        "NEWSLETTER_MAILER__SECURITY=ssl"
                    ) from e
                raise
            if code != 220:
                # A relay greeting with 554 goes on reading commands until QUIT (RFC 5321
                # 3.1): the mailer says it, as to any relay, rather than hang up. One
                # greeting with 421 has hung up already, and the QUIT fails quietly.
                _goodbye(client)
                raise smtplib.SMTPConnectError(code, greeting)
            _hello(client)
            if s.security == SmtpSecurity.STARTTLS:
                try:
                    client.starttls(context=self._tls())
                except OSError as e:
                    if not isinstance(e, smtplib.SMTPException | ssl.SSLCertVerificationError):
                        # The relay said yes to STARTTLS, then the handshake broke off: its
                        # record read `ConnectionResetError: Connection reset by peer` or
                        # `SSLEOFError`, and did not say where. (A relay refusing STARTTLS,
                        # or a certificate not trusted, says so itself.)
                        e.add_note(
                            "the TLS handshake after STARTTLS failed: the relay broke it off, "
                            "or offers no TLS version or cipher this service accepts (TLS 1.2 "
                            "or later); nothing was sent in clear"
                        )
                    raise
                _hello(client)
        except BaseException as e:
            client.close()
            _note_security(e, s.security)
            raise
        return client

    def _open(self, deadline: _Deadline) -> _Client:
        s = self.settings
        client = self._connect(deadline)
        if s.username is not None and s.password is not None:
            try:
                client.login(s.username, s.password.get_secret_value())
            except UnicodeEncodeError as e:
                # smtplib encodes credentials in ASCII; the settings refuse any other letter
                # at start, so this is a mailer made some other way. The operator fixes it:
                # retryable, as a wrong password. The message never shows the credentials.
                _goodbye(client)
                raise RetryableMailError(
                    "SMTP user name or password has letters beyond ASCII, which smtplib "
                    "cannot send (NEWSLETTER_MAILER__USERNAME, NEWSLETTER_MAILER__PASSWORD)"
                ) from e
            except BaseException:
                _goodbye(client)
                raise
        return client

    @contextmanager
    def batch(self) -> Iterator[None]:
        with self._lock:
            self._idle = []
        try:
            yield
        finally:
            with self._lock:
                idle, self._idle = self._idle or [], None
            # One deadline for them all: the mails are sent, a slow goodbye holds nothing.
            with _Deadline(self.settings.timeout) as deadline:
                for client in idle:
                    deadline.watch(client.sock)
                    _goodbye(client)

    def _take(self, deadline: _Deadline) -> _Client | None:
        """A connection kept from an earlier send that still answers, if any."""
        while True:
            with self._lock:
                if not self._idle:
                    return None
                client = self._idle.pop()
            deadline.watch(client.sock)
            try:
                # Starts the next transaction afresh; fails on a connection the server
                # closed meanwhile, before anything of this mail was sent. A relay that
                # hangs up on an idle client says so first (Postfix's `421 4.4.2 Error:
                # timeout exceeded`), which smtplib returns rather than raises: the mail
                # then failed on the closed connection instead of going on a new one.
                code, _ = client.rset()
                if code == 250:
                    return client
            except (smtplib.SMTPException, OSError):
                pass
            client.close()

    def _keep(self, client: _Client) -> None:
        with self._lock:
            if self._idle is not None:
                self._idle.append(client)
                return
        _goodbye(client)

    def _may_log_in(self) -> None:
        """Raise while a refused login holds off the next; past it, let this send alone
        try again (the others wait for another term)."""
        with self._lock:
            refused = self._refused
            if refused is None:
                return
            now = time.monotonic()
            if now >= refused.until:
                self._refused = _RefusedLogin(
                    refused.reply, until=now + self.login_hold_off, for_now=refused.for_now
                )
                return
        s = self.settings
        retry_at = datetime.now(UTC) + timedelta(seconds=refused.until - now)
        if refused.for_now:
            raise RetryableMailError(
                f"SMTP login put off by {s.host}:{s.port}: {refused.reply}; no new login "
                f"before {retry_at:%H:%M:%S} UTC (the relay fails for now; the login was not "
                "refused; a restart tries at once)"
            )
        raise RetryableMailError(
            f"SMTP login refused by {s.host}:{s.port}: {refused.reply}; no new login before "
            f"{retry_at:%H:%M:%S} UTC, not to have the account locked "
            "(NEWSLETTER_MAILER__USERNAME, NEWSLETTER_MAILER__PASSWORD; a restart tries at once)"
        )

    def _log_in_anew(self, deadline: _Deadline) -> _Client:
        """A new connection, logged in as configured, unless a refused login holds off."""
        if self.settings.username is None:
            return self._open(deadline)
        self._may_log_in()
        try:
            client = self._open(deadline)
        except smtplib.SMTPAuthenticationError as e:
            reply = _reply(e.smtp_code, e.smtp_error)
            with self._lock:
                self._refused = _RefusedLogin(reply, until=time.monotonic() + self.login_hold_off)
            s = self.settings
            log.error(
                "mailer.login_refused relay=%s:%s reply=%s: no new login for %gs "
                "(NEWSLETTER_MAILER__USERNAME, NEWSLETTER_MAILER__PASSWORD)",
                s.host,
                s.port,
                # The relay's answer may name the account.
                logs.mask_addresses(reply),
                self.login_hold_off,
            )
            raise
        except _LoginPutOff as e:
            reply = _reply(e.smtp_code, e.smtp_error)
            with self._lock:
                self._refused = _RefusedLogin(
                    reply, until=time.monotonic() + self.login_hold_off, for_now=True
                )
            s = self.settings
            # Held off too: a relay that limits logins (Gmail's `Too many login attempts`)
            # would get one from each waiting mail.
            log.warning(
                "mailer.login_put_off relay=%s:%s reply=%s: no new login for %gs",
                s.host,
                s.port,
                logs.mask_addresses(reply),
                self.login_hold_off,
            )
            raise
        with self._lock:
            self._refused = None
        return client

    def _deliver(self, mail: OutgoingMail) -> None:
        s = self.settings
        with _Deadline(s.timeout) as deadline:
            client: _Client | None = None
            try:
                client = self._take(deadline) or self._log_in_anew(deadline)
                client.mail_sent = False
                try:
                    client.send_message(
                        mail.message,
                        from_addr=mail.sender,
                        to_addrs=[mail.recipient] if mail.recipient else None,
                    )
                except BaseException:
                    _goodbye(client)
                    raise
                self._keep(client)
            except (smtplib.SMTPException, OSError) as e:
                # The whole mail went out and no answer came back: the relay may have taken
                # it, and the retry may deliver it a second time. Said in the record, as the
                # remedy is the timeout (RFC 5321 4.5.3.2.6 gives the answer 10 minutes).
                unanswered = (
                    client is not None
                    and client.mail_sent
                    and not isinstance(e, smtplib.SMTPResponseException)
                )
                maybe_taken = (
                    "; the relay had the whole mail and may have taken it: the retry may "
                    "deliver it twice (a relay slow to answer the end of a mail needs a "
                    "longer NEWSLETTER_MAILER__TIMEOUT)"
                    if unanswered
                    else ""
                )
                if deadline.expired:
                    # Whatever the cut connection made smtplib say: the server was too slow.
                    raise RetryableMailError(
                        f"SMTP send abandoned at its deadline: {s.host}:{s.port} took more "
                        f"than {s.timeout:g}s in all (NEWSLETTER_MAILER__TIMEOUT); "
                        f"{_said(e)}{maybe_taken}"
                    ) from e
                if unanswered:
                    raise RetryableMailError(f"{self._where}: {_said(e)}{maybe_taken}") from e
                raise

    def check(self) -> str:
        s = self.settings
        where = self._where
        with _Deadline(s.timeout) as deadline:
            try:
                client = self._open(deadline)
                _goodbye(client)
            except smtplib.SMTPAuthenticationError as e:
                raise RetryableMailError(
                    f"{where}: login refused: {_reply(e.smtp_code, e.smtp_error)} "
                    "(NEWSLETTER_MAILER__USERNAME, NEWSLETTER_MAILER__PASSWORD)"
                ) from e
            except _LoginPutOff as e:
                raise RetryableMailError(
                    f"{where}: login put off: {_reply(e.smtp_code, e.smtp_error)} (the relay "
                    "fails for now; the login was not refused)"
                ) from e
            except smtplib.SMTPNotSupportedError as e:
                raise RetryableMailError(
                    f"{where}: the relay does not offer what is configured: {e}"
                ) from e
            except (smtplib.SMTPException, OSError) as e:
                late = " (past NEWSLETTER_MAILER__TIMEOUT)" if deadline.expired else ""
                raise RetryableMailError(f"{where}: {_said(e)}{late}") from e
        login = f", logged in as {s.username}" if s.username is not None else ", no login"
        return f"{where}: the relay answered{login}; nothing was sent"

    def send(self, mail: OutgoingMail) -> str:
        s = self.settings
        try:
            self._deliver(mail)
            return f"accepted by {s.host}:{s.port}"
        except smtplib.SMTPRecipientsRefused as e:
            replies = list(e.recipients.values())
            summary = "; ".join(_reply(code, text) for code, text in replies)
            if any(_refuses_the_client(code, text) for code, text in replies):
                raise RetryableMailError(
                    f"the relay does not take mail from this client as configured: {summary} "
                    "(NEWSLETTER_MAILER__USERNAME, NEWSLETTER_MAILER__PASSWORD, or the relay's "
                    "allowed clients)"
                ) from e
            if replies and all(code >= 500 and code != 552 for code, _ in replies):
                raise PermanentMailError(f"recipient refused: {summary}") from e
            # 4xx, or 552 (RFC 5321 4.5.3.1.10: too many recipients, or no room for now,
            # which a client SHOULD take as 452; a full mailbox may be emptied): each
            # confirmation to a full mailbox was dead at its first attempt.
            raise RetryableMailError(f"recipient deferred: {summary}") from e
        except smtplib.SMTPAuthenticationError as e:
            raise RetryableMailError(
                f"SMTP login refused by {s.host}:{s.port}: {_reply(e.smtp_code, e.smtp_error)}; "
                f"no new login for {self.login_hold_off:g}s "
                "(NEWSLETTER_MAILER__USERNAME, NEWSLETTER_MAILER__PASSWORD)"
            ) from e
        except _LoginPutOff as e:
            raise RetryableMailError(
                f"SMTP login put off by {s.host}:{s.port}: {_reply(e.smtp_code, e.smtp_error)}; "
                f"no new login for {self.login_hold_off:g}s (the relay fails for now; the "
                "login was not refused)"
            ) from e
        except smtplib.SMTPDataError as e:
            if _refuses_the_client(e.smtp_code, e.smtp_error):
                # As at RCPT: Microsoft 365's `550 5.7.60 SMTP; Client does not have
                # permissions to send as this sender` comes at the end of the data, for
                # every mail until NEWSLETTER_MAIL_FROM or the account is fixed; each
                # confirmation was dead at its first attempt.
                raise RetryableMailError(
                    "the relay does not take mail from this client or sender as configured: "
                    f"{_reply(e.smtp_code, e.smtp_error)} (NEWSLETTER_MAIL_FROM, "
                    "NEWSLETTER_MAILER__USERNAME, NEWSLETTER_MAILER__PASSWORD, or the relay's "
                    "policy)"
                ) from e
            if e.smtp_code >= 500:
                raise PermanentMailError(
                    f"message refused: {_reply(e.smtp_code, e.smtp_error)}"
                ) from e
            raise RetryableMailError(
                f"message deferred: {_reply(e.smtp_code, e.smtp_error)}"
            ) from e
        except smtplib.SMTPNotSupportedError as e:
            # An internationalized address to a server without SMTPUTF8 will never go
            # through; a missing AUTH or STARTTLS is the relay's settings, fixable later.
            if "SMTPUTF8" in str(e):
                raise PermanentMailError(f"server cannot carry this mail: {e}") from e
            raise RetryableMailError(f"server does not support what is configured: {e}") from e
        except (smtplib.SMTPException, OSError, ssl.SSLError) as e:
            # The relay named, as `newsletter check` does: `ConnectionRefusedError: [Errno
            # 111] Connection refused` alone, in a job's record, did not say which server.
            raise RetryableMailError(f"{self._where}: {_said(e)}") from e


def _hello(client: smtplib.SMTP) -> None:
    """EHLO, and HELO where the relay does not know EHLO, as smtplib would before the first
    command that needs it; but a relay putting the client off (Postfix's `421 4.7.0 ...
    too many connections`, then the connection closed) gets no HELO: smtplib's, on the
    closed connection, failed with `Connection unexpectedly closed`, and the relay's reason
    reached no record."""
    code, reply = client.ehlo()
    if 200 <= code <= 299:
        return
    if 400 <= code <= 499:
        raise smtplib.SMTPHeloError(code, reply)
    code, reply = client.helo()
    if not 200 <= code <= 299:
        raise smtplib.SMTPHeloError(code, reply)


def _note_security(e: BaseException, security: SmtpSecurity) -> None:
    """Note on a failure to reach the relay the setting that most often causes it: an
    `ssl` mailer at a relay's plain port gets only `WRONG_VERSION_NUMBER`, an untrusted
    certificate only `CERTIFICATE_VERIFY_FAILED`. (A `starttls` or `none` one at a port
    of implicit TLS gets no greeting: `_connect` says so.)"""
    if isinstance(e, ssl.SSLCertVerificationError):
        e.add_note(
            "the relay's certificate is not trusted for this host: one signed by a private CA "
            "needs NEWSLETTER_MAILER__CA_FILE, and NEWSLETTER_MAILER__HOST must be a name the "
            "certificate holds"
        )
    elif isinstance(e, ssl.SSLError) and security == SmtpSecurity.SSL:
        e.add_note(
            "the relay did not answer in TLS: NEWSLETTER_MAILER__SECURITY=ssl is for a port "
            "that speaks TLS from the first byte (465); a port such as 587 or 25 takes starttls"
        )


def _said(e: BaseException) -> str:
    """A failure as the operator reads it: what it is (a relay's answer as it wrote it,
    `_reply`), and the notes on what to change."""
    if isinstance(e, smtplib.SMTPResponseException):
        text = _reply(e.smtp_code, e.smtp_error)
    else:
        text = str(e)
    notes = "".join(f" ({note})" for note in getattr(e, "__notes__", ()))
    return f"{type(e).__name__}: {text}{notes}"


def _refuses_the_client(code: int, text: bytes | str) -> bool:
    """A refusal of RCPT or of the data that is about the client or its sender, not the
    recipient nor the message: authentication required (530, RFC 4954), or a security or
    policy refusal (enhanced status 5.7.x, RFC 3463), as Postfix's `554 5.7.1 <...>: Relay
    access denied` to a client it does not know. Every mail gets it until the operator
    fixes the settings or the relay: retryable, as a wrong password, not each mail dead at
    its first attempt."""
    if isinstance(text, str):
        text = text.encode(errors="replace")
    return code == 530 or (code >= 500 and text.lstrip().startswith(b"5.7."))


def _reply(code: int, text: bytes | str) -> str:
    """`535 5.7.8 Authentication credentials invalid`: a reply as the relay wrote it, in
    its letters. smtplib gives bytes, whose repr wrote `j\\xc3\\xa9r\\xc3\\xb4me@...` in
    a job's record, where an erasure looks for the address as `jérôme@...`. The lines of
    a multiline reply (Gmail's `550-5.1.1 ...`) are joined: a record's error, and the log
    line quoting it, stay on one line."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return f"{code} {' '.join(text.splitlines())}"


def _goodbye(client: smtplib.SMTP) -> None:
    """QUIT, and close whatever the server answers: the mails sent stay sent."""
    try:
        client.quit()
    except (smtplib.SMTPException, OSError):
        client.close()


def helo_name(machine: str, public_host: str | None) -> str:
    """The name to give in EHLO without NEWSLETTER_MAILER__HELO_NAME: the machine's when it
    is fully qualified; else (a container's name is its id, a laptop's a bare name) the
    public URL's host, which names this service. Relays that check the name (Postfix's
    `reject_non_fqdn_helo_hostname`) refused every mail from a bare one, at RCPT, as if
    the recipient were refused. An address is written as an address literal (RFC 5321)."""
    qualified = "." in machine.strip(".") and not machine.endswith((".localdomain", ".local"))
    if qualified or not public_host:
        return machine
    try:
        address = ipaddress.ip_address(public_host.strip("[]"))
    except ValueError:
        return public_host
    return f"[IPv6:{address}]" if address.version == 6 else f"[{address}]"


def make_mailer(settings: MailerSettings, *, public_host: str | None = None) -> Mailer:
    if isinstance(settings, SmtpMailerSettings):
        return SmtpMailer(settings, public_host=public_host)
    return FileMailer(settings)
