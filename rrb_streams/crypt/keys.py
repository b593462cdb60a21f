"""age X25519 keys: recipients (public, ``age1…``) and identities (secret, ``AGE-SECRET-KEY-1…``).

Writers need only recipients; readers need identities. Both are the standard age encodings
(Bech32, https://age-encryption.org/v1), so ``age-keygen`` makes them and ``age -d`` uses the
same identity files.

Secrets: an :class:`Identity` never shows its key in ``repr``, ``str`` or an error message, and
an identity file's lines are never quoted back, only their numbers.

A recipient's **fingerprint** is the first 16 hex digits of the SHA-256 of its ``age1…`` text:
``printf %s age1… | sha256sum | cut -c1-16`` gives the same. Encrypted objects carry the
fingerprints of their recipients (see :mod:`.age`), so ``rrb-status`` can tell which keys
the backup is encrypted to without any secret.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from rrb_streams.errors import ConfigError

RECIPIENTS_ENV = "RRB_AGE_RECIPIENTS"
IDENTITY_FILE_ENV = "RRB_AGE_IDENTITY_FILE"

_RECIPIENT_HRP = "age"
_IDENTITY_HRP = "age-secret-key-"
_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_GENERATOR = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
_UNSUPPORTED = "ssh keys, passphrases and plugins are not supported"


@dataclass(frozen=True)
class Recipient:
    """An age X25519 public key: whoever holds its identity can read what is encrypted to it."""

    public: bytes  # 32 bytes

    @property
    def text(self) -> str:
        return bech32_encode(_RECIPIENT_HRP, self.public)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.text)

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Identity:
    """An age X25519 secret key. ``repr`` shows its recipient's fingerprint, never the key."""

    secret: bytes = field(repr=False)  # 32 bytes
    recipient: Recipient = field(init=False)

    def __post_init__(self) -> None:
        public = X25519PrivateKey.from_private_bytes(self.secret).public_key().public_bytes_raw()
        object.__setattr__(self, "recipient", Recipient(public))

    def __repr__(self) -> str:
        return f"Identity(fingerprint={self.recipient.fingerprint!r})"

    __str__ = __repr__


@dataclass(frozen=True)
class AgeKeys:
    """What a command was given: recipients to encrypt to, identities to decrypt with.

    Empty recipients: objects are written as they are. Empty identities: encrypted objects
    cannot be read (each read says so).
    """

    recipients: tuple[Recipient, ...] = ()
    identities: tuple[Identity, ...] = ()
    identity_file: str | None = None  # where the identities came from, for messages

    @property
    def fingerprints(self) -> tuple[str, ...]:
        """Of the identities' recipients: which encrypted objects these identities can open."""
        return tuple(i.recipient.fingerprint for i in self.identities)


def fingerprint(recipient_text: str) -> str:
    """The fingerprint of an ``age1…`` recipient (see the module docstring)."""
    return hashlib.sha256(recipient_text.encode()).hexdigest()[:16]


def parse_recipient(text: str, where: str) -> Recipient:
    """One ``age1…`` recipient. Raises ``ConfigError`` naming ``where``, never quoting the
    text: a secret identity given by mistake must not reach a log."""
    text = text.strip()
    if text.startswith("ssh-") or (text.startswith("age1") and text[4:5] == "-"):
        raise ConfigError(f"{where}: {_UNSUPPORTED}; give an age1… X25519 recipient")
    try:
        hrp, data = bech32_decode(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: not an age recipient (age1…): {exc}") from None
    if hrp != _RECIPIENT_HRP:
        hint = (
            " (that is a secret identity: give its age1… recipient)" if hrp == _IDENTITY_HRP else ""
        )
        raise ConfigError(f"{where}: not an age recipient (age1…){hint}")
    if len(data) != 32:
        raise ConfigError(f"{where}: not an age recipient: {len(data)} bytes, not 32")
    return Recipient(data)


def parse_recipients(
    flags: Sequence[str], files: Sequence[str], env: Mapping[str, str] | None = None
) -> tuple[Recipient, ...]:
    """The recipients of ``--age-recipient`` and ``--age-recipients-file``, else of
    ``RRB_AGE_RECIPIENTS`` (comma or space separated). Duplicates count once."""
    env = os.environ if env is None else env
    found = [parse_recipient(text, "--age-recipient") for text in flags]
    found += [
        parse_recipient(line, f"--age-recipients-file {name} line {number}")
        for name in files
        for number, line in _lines(name, "--age-recipients-file")
    ]
    if not flags and not files and env.get(RECIPIENTS_ENV, "").strip():
        found += [
            parse_recipient(text, RECIPIENTS_ENV)
            for text in re.split(r"[\s,]+", env[RECIPIENTS_ENV].strip())
        ]
    return tuple(dict.fromkeys(found))


def parse_identity(text: str, where: str) -> Identity:
    """One ``AGE-SECRET-KEY-1…`` line. Raises ``ConfigError`` naming ``where`` and never
    quoting the line: it may be a secret."""
    try:
        hrp, data = bech32_decode(text.strip())
    except ValueError:
        raise ConfigError(
            f"{where}: not an age identity (AGE-SECRET-KEY-1…); {_UNSUPPORTED}"
        ) from None
    if hrp != _IDENTITY_HRP or len(data) != 32:
        raise ConfigError(f"{where}: not an age X25519 identity (AGE-SECRET-KEY-1…)")
    return Identity(data)


def load_identities(path: str) -> tuple[Identity, ...]:
    """Every identity in an age identity file (``#`` comments and blank lines skipped).

    Raises ``ConfigError`` when the file cannot be read, holds no identity, or holds a line
    that is not one.
    """
    identities = [
        parse_identity(line, f"--age-identity {path} line {number}")
        for number, line in _lines(path, "--age-identity")
    ]
    if not identities:
        raise ConfigError(f"--age-identity {path}: no identity in the file")
    return tuple(dict.fromkeys(identities))


def age_keys(
    recipients: Sequence[str] = (),
    recipients_files: Sequence[str] = (),
    identity_file: str | None = None,
    env: Mapping[str, str] | None = None,
) -> AgeKeys:
    """The keys a command's options and environment give (``RRB_AGE_RECIPIENTS``,
    ``RRB_AGE_IDENTITY_FILE`` when the options are absent). Raises ``ConfigError``."""
    env = os.environ if env is None else env
    path = identity_file or env.get(IDENTITY_FILE_ENV) or None
    return AgeKeys(
        recipients=parse_recipients(recipients, recipients_files, env),
        identities=load_identities(path) if path else (),
        identity_file=path,
    )


def _lines(path: str, option: str) -> Iterable[tuple[int, str]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise ConfigError(f"{option} {path}: cannot read it: {reason}") from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            yield number, line


# --- Bech32 (BIP 173), as age encodes its keys -------------------------------------------


def _polymod(values: Iterable[int]) -> int:
    check = 1
    for value in values:
        top = check >> 25
        check = (check & 0x1FFFFFF) << 5 ^ value
        for i, g in enumerate(_GENERATOR):
            if (top >> i) & 1:
                check ^= g
    return check


def _expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _regroup(data: Iterable[int], source: int, target: int, pad: bool) -> list[int]:
    acc = bits = 0
    out: list[int] = []
    for value in data:
        acc = (acc << source) | value
        bits += source
        while bits >= target:
            bits -= target
            out.append((acc >> bits) & ((1 << target) - 1))
    if pad and bits:
        out.append((acc << (target - bits)) & ((1 << target) - 1))
    elif not pad and (bits >= source or (acc << (target - bits)) & ((1 << target) - 1)):
        raise ValueError("bad padding")
    return out


def bech32_encode(hrp: str, data: bytes) -> str:
    values = _regroup(data, 8, 5, pad=True)
    check = _polymod([*_expand(hrp), *values, 0, 0, 0, 0, 0, 0]) ^ 1
    values += [(check >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(_CHARSET[v] for v in values)


def bech32_decode(text: str) -> tuple[str, bytes]:
    """``(hrp, data)`` of a Bech32 string (lower- or upper-case, not mixed). Raises
    ``ValueError`` with a reason that never repeats the text."""
    if text.lower() != text and text.upper() != text:
        raise ValueError("mixed case")
    text = text.lower()
    at = text.rfind("1")
    if at < 1 or at + 7 > len(text):
        raise ValueError("no separator or too short")
    hrp, rest = text[:at], text[at + 1 :]
    if any(c not in _CHARSET for c in rest) or any(not 33 <= ord(c) <= 126 for c in hrp):
        raise ValueError("invalid character")
    values = [_CHARSET.index(c) for c in rest]
    if _polymod([*_expand(hrp), *values]) != 1:
        raise ValueError("bad checksum")
    return hrp, bytes(_regroup(values[:-6], 5, 8, pad=False))
