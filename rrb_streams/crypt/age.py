"""The age v1 file format (https://age-encryption.org/v1), X25519 recipients, seekable.

An encrypted object is exactly one age file, so ``age -d -i key.txt OBJECT`` opens it::

    age-encryption.org/v1
    -> X25519 <ephemeral share>          one stanza per recipient: the file key, wrapped
    <wrapped file key>
    -> rrb-fp <fingerprint> …            the recipients' fingerprints (keys.fingerprint)
                                         (empty body: age ignores stanzas it does not know)
    --- <header MAC>
    <16-byte nonce><payload>

The payload is the plaintext in 64 KiB chunks, each sealed with ChaCha20-Poly1305 under a
key derived from the file key and the nonce, its nonce the chunk's number and a last-chunk
flag. Chunks are a fixed size, so a reader holding the file key can fetch and open any one
of them alone: :class:`Opened` turns a plaintext range into the ciphertext range to fetch,
which is how restore reads one block of a 64 MiB segment without the rest.

Why our own code over ``pyrage``: pyrage encrypts and decrypts whole buffers only. Ranged
reads need the file key and the chunk layout, and compaction's multipart uploads need a
stream. The primitives are ``cryptography``'s (OpenSSL); the tests check every object
against the ``age`` command and pyrage both ways.
"""

from __future__ import annotations

import base64
import hmac
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from rrb_streams.crypt.keys import Identity, Recipient
from rrb_streams.errors import ConfigError, CorruptObject

MAGIC = b"age-encryption.org/v1\n"
CHUNK = 64 * 1024  # plaintext bytes per payload chunk
TAG = 16
SEALED = CHUNK + TAG  # ciphertext bytes per full chunk
NONCE = 16
FINGERPRINT_STANZA = "rrb-fp"
#: Longest header we read: 64 recipients' stanzas and their fingerprints fit many times over.
MAX_HEADER = 64 * 1024
_X25519_LABEL = b"age-encryption.org/v1/X25519"
_ZERO_NONCE = bytes(12)


class NotDecryptable(ConfigError):
    """An encrypted object none of the given identities opens (or none was given).

    A ``ConfigError``: the command was run with the wrong keys, not a damaged backup. The
    message names the object and its recipients' fingerprints, never a secret.
    """


def is_encrypted(data: bytes) -> bool:
    """Whether ``data`` (an object, or at least its first 22 bytes) is an age file."""
    return data[: len(MAGIC)] == MAGIC


@dataclass(frozen=True)
class Header:
    """A parsed header: its stanzas and where the payload starts."""

    stanzas: tuple[tuple[tuple[str, ...], bytes], ...]  # (type and arguments, body)
    signed: bytes  # the bytes the MAC covers
    mac: bytes
    length: int  # of the header, up to the nonce

    @property
    def fingerprints(self) -> tuple[str, ...]:
        return tuple(
            fp for args, _ in self.stanzas if args[0] == FINGERPRINT_STANZA for fp in args[1:]
        )

    @property
    def kinds(self) -> tuple[str, ...]:
        """The stanza types that wrap the file key (``X25519``), grease and ours left out."""
        return tuple(
            args[0]
            for args, _ in self.stanzas
            if args[0] != FINGERPRINT_STANZA and not args[0].endswith("grease")
        )


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data).rstrip(b"=")


def _unb64(text: bytes) -> bytes:
    if b"=" in text or b"\r" in text:
        raise ValueError("padded or not canonical base64")
    data = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    if _b64(data) != text:
        raise ValueError("not canonical base64")
    return data


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(SHA256(), 32, salt, info).derive(ikm)


def _stanza(args: Sequence[str], body: bytes) -> bytes:
    text = _b64(body)
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    if not lines or len(lines[-1]) == 64:
        lines.append(b"")  # the body's last line is shorter than 64 columns, maybe empty
    return b"-> " + " ".join(args).encode() + b"\n" + b"\n".join(lines) + b"\n"


def _wrap(file_key: bytes, to: Recipient) -> bytes:
    ephemeral = X25519PrivateKey.generate()
    share = ephemeral.public_key().public_bytes_raw()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(to.public))
    key = _hkdf(shared, share + to.public, _X25519_LABEL)
    return _stanza(
        ["X25519", _b64(share).decode()], ChaCha20Poly1305(key).encrypt(_ZERO_NONCE, file_key, None)
    )


def _unwrap(header: Header, identity: Identity) -> bytes | None:
    for args, body in header.stanzas:
        if args[0] != "X25519" or len(args) != 2 or len(body) != 32:
            continue
        try:
            share = _unb64(args[1].encode())
            shared = X25519PrivateKey.from_private_bytes(identity.secret).exchange(
                X25519PublicKey.from_public_bytes(share)
            )
            key = _hkdf(shared, share + identity.recipient.public, _X25519_LABEL)
            return ChaCha20Poly1305(key).decrypt(_ZERO_NONCE, body, None)
        except (ValueError, InvalidTag):
            continue  # another recipient's stanza (or an all-zero share)
    return None


def _mac(file_key: bytes, signed: bytes) -> bytes:
    return hmac.digest(_hkdf(file_key, b"", b"header"), signed, "sha256")


def _chunk_nonce(number: int, last: bool) -> bytes:
    return number.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def plain_size(cipher_size: int, header_length: int, name: str) -> int:
    """The plaintext size of an age file of ``cipher_size`` bytes. Raises ``CorruptObject``
    when no payload has that size (truncated)."""
    payload = cipher_size - header_length - NONCE
    chunks = max(1, -(-payload // SEALED))
    plain = payload - TAG * chunks
    if plain < 0 or (chunks > 1 and payload % SEALED and payload % SEALED <= TAG):
        raise CorruptObject(f"{name}: encrypted payload of {payload} bytes is truncated")
    return plain


# --- writing -------------------------------------------------------------------------------


class Sealer:
    """Encrypts one object to ``recipients``: :meth:`header`, then the payload chunk by chunk."""

    def __init__(self, recipients: Sequence[Recipient]) -> None:
        if not recipients:
            raise ValueError("no recipients")
        file_key = os.urandom(16)
        nonce = os.urandom(NONCE)
        parts = [MAGIC, *(_wrap(file_key, r) for r in recipients)]
        parts.append(_stanza([FINGERPRINT_STANZA, *(r.fingerprint for r in recipients)], b""))
        signed = b"".join(parts) + b"---"
        self.head = signed + b" " + _b64(_mac(file_key, signed)) + b"\n" + nonce
        self._aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
        self._number = 0

    def seal(self, chunk: bytes | memoryview, last: bool) -> bytes:
        """The next chunk (``CHUNK`` bytes unless ``last``), sealed."""
        out = self._aead.encrypt(_chunk_nonce(self._number, last), chunk, None)
        self._number += 1
        return out


def encrypt(data: bytes, recipients: Sequence[Recipient]) -> bytes:
    """``data`` as one age file to ``recipients``."""
    sealer = Sealer(recipients)
    view = memoryview(data)
    count = max(1, -(-len(data) // CHUNK))
    sealed = [sealer.seal(view[i * CHUNK : (i + 1) * CHUNK], i == count - 1) for i in range(count)]
    return sealer.head + b"".join(sealed)


def encrypt_stream(chunks: Iterable[bytes], recipients: Sequence[Recipient]) -> Iterator[bytes]:
    """The age file of the concatenation of ``chunks``, about one input chunk per output
    piece: a streaming :func:`encrypt` for multipart uploads. Holds one 64 KiB chunk back to
    know which chunk is the last."""
    sealer = Sealer(recipients)
    yield sealer.head
    pending = bytearray()
    for piece in chunks:
        pending += piece
        out: list[bytes] = []
        # Keep at least one byte back: the last chunk is sealed differently.
        whole = (len(pending) - 1) // CHUNK
        view = memoryview(pending)
        out = [sealer.seal(view[i * CHUNK : (i + 1) * CHUNK], False) for i in range(whole)]
        view.release()
        del pending[: whole * CHUNK]
        if out:
            yield b"".join(out)
    yield sealer.seal(bytes(pending), True)


# --- reading -------------------------------------------------------------------------------


class NeedHeader(Exception):
    """The header goes on past the bytes given: read at least :attr:`needed` bytes."""

    def __init__(self, needed: int) -> None:
        super().__init__(needed)
        self.needed = needed


def parse_header(data: bytes, name: str) -> Header:
    """The header at the start of ``data``. Raises ``NeedHeader`` when ``data`` stops inside
    it, ``CorruptObject`` naming ``name`` when it is malformed."""
    if not is_encrypted(data):
        raise CorruptObject(f"{name}: not an age file")
    pos = len(MAGIC)
    stanzas: list[tuple[tuple[str, ...], bytes]] = []
    while True:
        end = data.find(b"\n", pos)
        if end < 0:
            if len(data) >= MAX_HEADER:
                raise CorruptObject(f"{name}: age header longer than {MAX_HEADER} bytes")
            raise NeedHeader(min(MAX_HEADER, 2 * len(data) + 1024))
        line = data[pos:end]
        if line.startswith(b"--- "):
            try:
                mac = _unb64(line[4:])
            except ValueError:
                raise CorruptObject(f"{name}: malformed age header MAC") from None
            if len(mac) != 32:
                raise CorruptObject(f"{name}: malformed age header MAC")
            return Header(tuple(stanzas), data[: pos + 3], mac, end + 1)
        if not line.startswith(b"-> "):
            raise CorruptObject(f"{name}: malformed age header")
        try:
            args = tuple(line[3:].decode("ascii").split(" "))
        except UnicodeDecodeError:
            raise CorruptObject(f"{name}: malformed age stanza") from None
        if not args or not all(args):
            raise CorruptObject(f"{name}: malformed age stanza")
        body, pos = b"", end + 1
        while True:
            end = data.find(b"\n", pos)
            if end < 0:
                raise NeedHeader(min(MAX_HEADER, 2 * len(data) + 1024))
            line = data[pos:end]
            if len(line) > 64:
                raise CorruptObject(f"{name}: malformed age stanza body")
            body += line
            pos = end + 1
            if len(line) < 64:
                break
        try:
            stanzas.append((args, _unb64(body)))
        except ValueError:
            raise CorruptObject(f"{name}: malformed age stanza body") from None


@dataclass
class Opened:
    """An encrypted object whose file key one of our identities unwrapped: ranges of its
    plaintext map to ranges of chunks, each opened alone."""

    name: str
    header_length: int  # with the nonce: where chunk 0 starts
    aead: ChaCha20Poly1305 = field(repr=False)

    def span(self, start: int, length: int) -> tuple[int, int, int]:
        """``(first chunk, its ciphertext offset, ciphertext length)`` of the chunks holding
        plaintext bytes ``start`` to ``start + length``."""
        first, last = start // CHUNK, (start + length - 1) // CHUNK
        return first, self.header_length + first * SEALED, (last - first + 1) * SEALED

    def open_payload(self, data: bytes) -> bytes:
        """The plaintext of the whole age file ``data`` this was opened from."""
        return self.open_chunks(memoryview(data)[self.header_length :], 0, ends=True)

    def open_chunks(self, data: bytes | memoryview, first: int, *, ends: bool) -> bytes:
        """The plaintext of the sealed chunks ``data``, the first being chunk ``first``.

        ``ends``: ``data`` runs to the end of the object, so its last chunk is the last one.
        Otherwise a full-size final chunk is told apart by its flag. Raises ``CorruptObject``
        when a chunk fails authentication: tampered, or cut short.
        """
        view = memoryview(data)
        out: list[bytes] = []
        count = -(-len(data) // SEALED)
        for i in range(count):
            sealed = view[i * SEALED : (i + 1) * SEALED]
            number = first + i
            final = i == count - 1 and (ends or len(sealed) < SEALED)
            try:
                out.append(self.aead.decrypt(_chunk_nonce(number, final), sealed, None))
            except InvalidTag:
                if final or i != count - 1:
                    raise CorruptObject(
                        f"{self.name}: encrypted chunk {number} fails authentication "
                        "(tampered or truncated)"
                    ) from None
                try:  # a full-size chunk that is the object's last
                    out.append(self.aead.decrypt(_chunk_nonce(number, True), sealed, None))
                except InvalidTag:
                    raise CorruptObject(
                        f"{self.name}: encrypted chunk {number} fails authentication "
                        "(tampered or truncated)"
                    ) from None
        if len(out) == 1:
            return out[0]
        return b"".join(out)


def open_header(
    header: Header, data_after: bytes, identities: Sequence[Identity], name: str
) -> Opened:
    """Unwrap the file key with the first identity that can and check the header MAC.

    ``data_after``: at least the 16-byte nonce that follows the header. Raises
    ``NotDecryptable`` when no identity fits, ``CorruptObject`` when the header was altered
    (its MAC fails, or a stanza the fingerprints say is ours does not open).
    """
    if len(data_after) < NONCE:
        raise CorruptObject(f"{name}: encrypted object cut short after its header")
    for identity in identities:
        file_key = _unwrap(header, identity)
        if file_key is not None:
            break
    else:
        ours = {i.recipient.fingerprint for i in identities}
        if ours & set(header.fingerprints):
            raise CorruptObject(f"{name}: age header damaged: our recipient's stanza does not open")
        raise NotDecryptable(_refusal(header, name, bool(identities)))
    if not hmac.compare_digest(_mac(file_key, header.signed), header.mac):
        raise CorruptObject(f"{name}: age header MAC mismatch (tampered)")
    key = _hkdf(file_key, data_after[:NONCE], b"payload")
    return Opened(name, header.length + NONCE, ChaCha20Poly1305(key))


def missing_identity(name: str, to: str = "") -> str:
    """The message for an encrypted object read with no identity at all."""
    to = f" (to {to})" if to else ""
    return (
        f"{name} is encrypted with age{to}: give --age-identity FILE "
        "(or RRB_AGE_IDENTITY_FILE) holding its identity"
    )


def _refusal(header: Header, name: str, had_identities: bool) -> str:
    to = ", ".join(header.fingerprints)
    if not had_identities:
        return missing_identity(name, to)
    return (
        f"no identity given opens {name}: it is encrypted to "
        f"{to or 'recipients it does not name'} (fingerprints of age1… recipients)"
    )


def open_whole(data: bytes, identities: Sequence[Identity], name: str) -> Opened:
    """:func:`open_header` of the whole age file ``data``. Raises as it does, and
    ``CorruptObject`` when ``data`` ends inside its header or has no payload."""
    try:
        header = parse_header(data, name)
    except NeedHeader:
        raise CorruptObject(f"{name}: encrypted object cut short in its header") from None
    opened = open_header(header, data[header.length : header.length + NONCE], identities, name)
    if len(data) <= opened.header_length:
        raise CorruptObject(f"{name}: encrypted object has no payload")
    return opened


def decrypt(data: bytes, identities: Sequence[Identity], name: str) -> bytes:
    """The plaintext of the whole age file ``data``. Raises ``NotDecryptable`` or
    ``CorruptObject`` as :func:`open_header` does, and ``CorruptObject`` for a damaged
    payload."""
    return open_whole(data, identities, name).open_payload(data)
