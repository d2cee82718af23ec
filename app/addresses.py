"""Address validation and normalization (email-validator).

`email` keeps what was typed, after the standard's normalization (domain lowercased and
IDNA-normalized, Unicode NFC); `key` is its case-folded form, the identity of a subscriber.
A `+tag` is never stripped: it is part of the address.
"""

from __future__ import annotations

import email.policy
import functools
import re
import unicodedata
from dataclasses import dataclass
from email import errors
from email.headerregistry import BaseHeader

import idna
from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email
from email_validator.rfc_constants import (
    ATEXT,
    CASE_INSENSITIVE_MAILBOX_NAMES,
    DNS_LABEL_LENGTH_LIMIT,
    DOMAIN_MAX_LENGTH,
    EMAIL_MAX_LENGTH,
    HOSTNAME_LABEL,
    LOCAL_PART_MAX_LENGTH,
)

# 254: RFC 5321's 256 octets for a path, less its angle brackets (RFC 3696 erratum 1690).
MAX_ADDRESS_LENGTH = EMAIL_MAX_LENGTH
# The part before the @-sign, in octets: UTF-8 ones for an internationalized address (RFC
# 5321 §4.5.3.1.1, RFC 6531 §3.3). email-validator checks it only in its strict mode, and
# counts characters there.
MAX_LOCAL_PART_OCTETS = LOCAL_PART_MAX_LENGTH  # 64
# Alphabets whose letters imitate one another (Latin a, Cyrillic U+0430, Greek U+03B1...).
_CONFUSABLE_SCRIPTS = frozenset({"LATIN", "CYRILLIC", "GREEK"})
_WORD = re.compile(r"[^\W\d_]+")
# C0 controls and DEL: no address holds one, and a header or a log line must not get one.
_CONTROL = re.compile("[\x00-\x1f\x7f]")
# The everyday address: ASCII, a dot-atom before the @-sign, two or more host-name labels
# after it. email-validator's grammar, from its own constants.
_PLAIN = re.compile(
    rf"(?P<local>[{ATEXT}]+(?:\.[{ATEXT}]+)*)@(?P<domain>{HOSTNAME_LABEL}(?:\.{HOSTNAME_LABEL})+)"
)


def _mixes_confusable_scripts(text: str) -> bool:
    """A word (a run of letters) written in two of Latin, Cyrillic and Greek: the way to
    make an address that looks like another one (`camille@` with a Cyrillic c and a).
    Words in one script each, as in `ivan.<Cyrillic name>@`, are fine; other scripts too."""
    for word in _WORD.findall(text):
        scripts = {unicodedata.name(char, "?").split(" ")[0] for char in word}
        if len(scripts & _CONFUSABLE_SCRIPTS) > 1:
            return True
    return False


class InvalidAddress(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Address:
    email: str
    key: str

    @property
    def ascii_key(self) -> str | None:
        """The key as written with the domain's ASCII labels (`ascii_key`)."""
        return ascii_key(self.email)


def parse(raw: str, *, new: bool) -> Address:
    """The address `raw`, validated and normalized.

    `new`: the address is coming in (a sign-up, an operator's addition, an import of new
    subscribers), so a look-alike is refused. A lookup of an address that may already be
    stored (an opt-out, a backend's event, an operator's read or erasure) passes False: a
    row kept from before the look-alike check must stay reachable, or its person could
    not leave nor be erased.
    """
    return _parse(raw, new)


# A request's address is read twice (the body's validation, then the request itself): the
# second read is a look-up among the last few hundred addresses read.
@functools.lru_cache(maxsize=256)
def _parse(raw: str, new: bool) -> Address:
    if _CONTROL.search(raw):
        raise InvalidAddress("The address contains control characters.")
    # Spaces around the address are not part of it, nor of its length.
    raw = raw.strip()
    if not raw:
        # email-validator would say it "must have an @-sign": true, but not the news.
        raise InvalidAddress("The address is empty.")
    if len(raw) > MAX_ADDRESS_LENGTH:
        raise InvalidAddress(f"The address is longer than {MAX_ADDRESS_LENGTH} characters.")
    return _plain(raw) or _general(raw, new)


def key_prefix(prefix: str) -> str:
    """The start of an address an operator typed, as the start of a stored key (Unicode
    NFC, case-folded), or of an `ascii_key` when it writes the domain in ASCII (`xn--`)."""
    return unicodedata.normalize("NFC", prefix).casefold()


def ascii_key(email: str) -> str | None:
    """A stored address with its domain's labels in ASCII (IDNA A-labels: `café.fr` is
    `xn--caf-dma.fr`), case-folded as keys are; None for a domain in ASCII already, whose
    key is that.

    Keys hold the domain in Unicode, and the ASCII spelling of a label typed half-way
    (`xn--caf-d`) is no part of it: punycode writes a label's ASCII letters first and the
    others' places after the last hyphen, so no decoding of such a start gives the start of
    the Unicode label. A search that finds either spelling reads this one beside the key.
    """
    local, _, domain = email.rpartition("@")
    if domain.isascii():
        return None
    try:
        ascii_domain = idna.encode(domain).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return None
    return f"{local}@{ascii_domain}".casefold()


@functools.lru_cache(maxsize=256)
def deliverable(email: str) -> str:
    """The address to put on a mail: a stored address with an internationalized domain,
    written with its ASCII labels (IDNA, `xn--`), which every relay carries. One with
    letters beyond ASCII before the @-sign has no such form: it needs a relay that takes
    SMTPUTF8 (RFC 6531), and is returned as it is."""
    if email.isascii():
        return email
    try:
        ascii_email = validate_email(email, check_deliverability=False).ascii_email
    except EmailNotValidError:
        return email
    return ascii_email or email


def _general(raw: str, new: bool) -> Address:
    """Any address, through email-validator."""
    try:
        validated = validate_email(raw, check_deliverability=False)
    except EmailNotValidError as e:
        raise InvalidAddress(str(e)) from e
    _refuse_a_long_local_part(validated.local_part)
    if new:
        _refuse_compatibility_characters(validated.local_part)
    if new and _mixes_confusable_scripts(validated.normalized):
        raise InvalidAddress(
            "The address mixes Latin letters with Cyrillic or Greek ones that look alike."
        )
    return Address(email=validated.normalized, key=validated.normalized.casefold())


def _refuse_compatibility_characters(local: str) -> None:
    """Refuse, before the @-sign, a character that stands for another (NFKC): a full-width
    j (U+FF4A) for j, as an input method in full-width mode types it, the ligature fi
    (U+FB01), a superscript 2. Most mail systems hold no such mailbox, so the confirmation
    would never arrive, and it looks like the ordinary address. (After the @-sign, IDNA
    maps them to the ordinary letters already.)"""
    for char in local:
        if unicodedata.normalize("NFKC", char) != char:
            name = unicodedata.name(char, f"U+{ord(char):04X}")
            raise InvalidAddress(
                f"The part before the @-sign contains {name}: type the address with "
                "ordinary characters."
            )


def _refuse_a_long_local_part(local: str) -> None:
    """Refuse a part before the @-sign (normalized, as it is sent) over 64 octets: relays
    may refuse it, and a mail that does not reach the address cannot confirm it."""
    if len(local.encode("utf-8")) <= MAX_LOCAL_PART_OCTETS:
        return
    if local.isascii():
        raise InvalidAddress(
            f"The part before the @-sign is longer than {MAX_LOCAL_PART_OCTETS} characters."
        )
    raise InvalidAddress(
        f"The part before the @-sign is longer than {MAX_LOCAL_PART_OCTETS} bytes in UTF-8 "
        "(a letter beyond ASCII takes 2 to 4)."
    )


def _plain(raw: str) -> Address | None:
    """An everyday address checked as email-validator would, without its general path
    (quoted parts, Unicode, IDNA), which costs about ten times as much; None for any
    address outside that case, which then takes the general path.

    For such an address email-validator keeps the part before the @-sign as typed and
    lowercases the domain; it refuses a label over 63 characters, a domain over 253, a
    top-level label not ending in a letter, `ab--` labels (Punycode is left to the general
    path) and special-use domains (`.local`, `.test`...); it lowercases role names
    (`Postmaster@`), also left to it. An ASCII address mixes no scripts. An address over
    254 characters, or with over 64 before the @-sign, is left to the general path, which
    refuses it with the reason.
    """
    match = _PLAIN.fullmatch(raw)
    if match is None:
        return None
    local, domain = match["local"], match["domain"].lower()
    labels = domain.split(".")
    if (
        len(raw) > MAX_ADDRESS_LENGTH
        or len(local) > MAX_LOCAL_PART_OCTETS
        or len(domain) > DOMAIN_MAX_LENGTH
        or not labels[-1][-1].isalpha()
        or any(len(label) > DNS_LABEL_LENGTH_LIMIT or label[2:4] == "--" for label in labels)
        or any(domain == name or domain.endswith("." + name) for name in SPECIAL_USE_DOMAIN_NAMES)
        or local.lower() in CASE_INSENSITIVE_MAILBOX_NAMES
    ):
        return None
    email = f"{local}@{domain}"
    return Address(email=email, key=email.casefold())


@dataclass(frozen=True, slots=True)
class Sender:
    """The mails' sender, read from a From value (`NEWSLETTER_MAIL_FROM`)."""

    display_name: str
    # The address alone: the SMTP envelope's sender (MAIL FROM), the Message-ID's domain.
    addr_spec: str


# `Name <local@domain>` with an unquoted name, for the hint to quote it.
_NAMED = re.compile(r'\s*(?P<name>[^"<>]*?)\s*<(?P<addr>[^<>]+)>\s*')
# RFC 5322's specials that a name may hold only in double quotes (the period is read in one
# anyway, as obsolete syntax).
_SPECIALS = frozenset(",;:@()[]\\")
# Defects that are no reason to refuse: `J. Doe <...>` (an obsolete but readable name,
# written back as it was), and an address beyond ASCII, refused below with its own reason.
_TOLERATED = (errors.ObsoleteHeaderDefect, errors.NonASCIILocalPartDefect)


@functools.lru_cache(maxsize=16)
def sender(value: str) -> Sender:
    """The one mailbox `value` names, as a From header would read it: `local@domain` or
    `Name <local@domain>`, the name in double quotes when it holds one of `,;:@()[]\\`.

    Read by the parser that writes the mails' From (`email.headerregistry`), which reads
    `Gazette BlueHats, DINUM <...>` as two addresses, the first one `"Gazette BlueHats"`:
    what the relay would be given as the envelope's sender. The address must be ASCII: a
    relay without SMTPUTF8 refuses any other on every mail, and the From header would carry
    it as RFC 2047 words, which no address may hold. A name beyond ASCII is fine.
    """
    if len(value.splitlines()) > 1 or any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise InvalidAddress("it contains a line break or a control character")
    try:
        header = email.policy.default.header_factory("From", value)
    except ValueError as e:
        # The parser decodes RFC 2047 words in a name: `=?utf-8?q?a=0D=0ABcc:...?=` holds
        # a line break, which `Address` refuses ("address parts cannot contain CR or LF").
        raise InvalidAddress(
            f"{value!r} holds a line break in an RFC 2047 word (=?...?=): write the name as "
            "plain text"
        ) from e
    if (
        any(not isinstance(defect, _TOLERATED) for defect in header.defects)
        or len(header.groups) != 1
        or header.groups[0].display_name is not None
        or len(header.addresses) != 1
    ):
        named = _NAMED.fullmatch(value)
        if named and _SPECIALS.intersection(named["name"]):
            name = named["name"].replace("\\", "\\\\")  # written twice in quotes
            quoted = f'"{name}" <{named["addr"]}>'
            raise InvalidAddress(
                f"{value!r} is not one address: a name holding any of , ; : @ ( ) [ ] \\ "
                f"must be in double quotes, as in {quoted}"
            )
        raise InvalidAddress(
            f"{value!r} is not one address; write it as local@domain or Name <local@domain>"
        )
    (mailbox,) = header.addresses
    addr_spec = mailbox.addr_spec
    try:
        parse(addr_spec, new=False)
    except InvalidAddress as e:
        raise InvalidAddress(f"{addr_spec!r} is not a valid address: {e}") from e
    if not addr_spec.isascii():
        local = addr_spec.rpartition("@")[0]
        if local.isascii():
            raise InvalidAddress(
                f"write the domain of {addr_spec!r} in its ASCII form: {deliverable(addr_spec)}"
            )
        raise InvalidAddress(
            f"{addr_spec!r} has letters beyond ASCII before the @-sign, which a relay without "
            "SMTPUTF8 refuses and a From header cannot carry: use an ASCII address"
        )
    _carried(value, header, mailbox.display_name, addr_spec)
    return Sender(display_name=mailbox.display_name, addr_spec=addr_spec)


# RFC 5322 2.1.1: a line of a message is at most 998 characters, its end aside.
_MAX_LINE = 998


def _carried(value: str, header: BaseHeader, name: str, addr_spec: str) -> None:
    """Refuse a From whose name the mails cannot carry as written: folded as they write it
    (`app.mails`), a name with no space to fold at made a line over 998 characters, which
    relays refuse (`500 Line too long`) or break, and a quoted name of more than a line
    without spaces lost its quotes, its commas then reading as as many addresses."""
    folded = header.fold(policy=email.policy.default)
    longest = max(len(line) for line in folded.splitlines())
    if longest > _MAX_LINE:
        raise InvalidAddress(
            f"the name in {_shown(value)} makes a From header line of {longest} characters, "
            f"more than the {_MAX_LINE} a mail may carry: use a shorter name, with spaces "
            "between its words"
        )
    unfolded = re.sub(r"\r?\n(?=[ \t])", "", folded.partition(":")[2]).strip()
    read = email.policy.default.header_factory("From", unfolded)
    mailboxes = [(_unspaced(m.display_name), m.addr_spec) for m in read.addresses]
    if mailboxes != [(_unspaced(name), addr_spec)]:
        raise InvalidAddress(
            f"the name in {_shown(value)} does not read back as one name once folded to the "
            "lines of a From header: use a shorter name, with spaces between its words"
        )


def _unspaced(text: str) -> str:
    # A name folded inside a word as two RFC 2047 words reads back with a space between
    # them from Python's parser (mail clients join them, RFC 2047 6.2).
    return "".join(text.split())


def _shown(value: str) -> str:
    return repr(value) if len(value) <= 80 else f"{value[:60]!r}... ({len(value)} characters)"


def mask(email: str) -> str:
    """`j***@example.org`: enough to tell mails apart in logs, not enough to identify anyone."""
    local, _, domain = email.rpartition("@")
    return f"{local[:1]}***@{domain}"


# What people paste around an address: a name and angle brackets (`Camille <c@example.org>`,
# copied from a mail program), `mailto:` (from a link), quotes, a final dot or comma.
_WRAPPED = re.compile(r"^(?:.*<\s*(?P<bracketed>[^<>]*?)\s*>|(?P<bare>.*?))\s*$", re.DOTALL)
_AROUND = " \t\"'`“”\u2018\u2019«»()[],;:."
_SPACED = re.compile(r"\s*([@.])\s*")
# A name and an address fit in this; anything longer is not worth a guess.
_SUGGEST_AT_MOST = 2 * MAX_ADDRESS_LENGTH


def suggestion(raw: str) -> str | None:
    """For an address refused as typed, the valid address the person most likely meant,
    if they pasted one with something around it; None when there is nothing to suggest.

    Only a suggestion to show: the address stored is always one the person sent.
    """
    if len(raw) > _SUGGEST_AT_MOST:
        return None
    # Typed in full-width characters, @-sign and dots included: the ordinary ones meant.
    match = _WRAPPED.match(unicodedata.normalize("NFKC", raw).strip().rstrip(",;"))
    if match is None:
        return None
    candidate = match["bracketed"] if match["bracketed"] is not None else match["bare"]
    candidate = candidate.strip(_AROUND)
    if candidate[:7].casefold() == "mailto:":
        candidate = candidate[7:].partition("?")[0].strip(_AROUND)
    # Spaces typed around the @-sign or a dot (`camille @example.org`).
    candidate = _SPACED.sub(r"\1", candidate)
    if not candidate or candidate == raw.strip():
        return None
    try:
        return parse(candidate, new=True).email
    except InvalidAddress:
        return None
