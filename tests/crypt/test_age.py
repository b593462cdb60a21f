"""The age file format: what we write opens with the ``age`` command and pyrage, what they
write opens with ours, ranged reads open only their chunks, and damage is never plaintext."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pyrage
import pytest
from pyrage import x25519

from rrb_streams.crypt import age
from rrb_streams.crypt.keys import parse_identity, parse_recipient
from rrb_streams.errors import CorruptObject
from tests.support.age import (
    ALICE,
    BOB,
    age_command,
    identity_file,
    identity_text,
    new_identity,
    opens_with_age,
)

SIZES = [0, 1, 1000, age.CHUNK - 1, age.CHUNK, age.CHUNK + 1, 3 * age.CHUNK, 200_000]


def pyrage_identity(identity: object) -> x25519.Identity:
    return x25519.Identity.from_str(identity_text(identity))  # type: ignore[arg-type]


@pytest.mark.parametrize("size", SIZES)
def test_what_we_write_opens_with_the_age_command_and_pyrage(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    keys = identity_file(tmp_path / "key.txt", BOB)
    whole = age.encrypt(data, [ALICE.recipient, BOB.recipient])
    cut = sorted((min(7, size), size // 2))
    pieces = [data[: cut[0]], data[cut[0] : cut[1]], data[cut[1] :]]
    streamed = b"".join(age.encrypt_stream(pieces, [BOB.recipient]))
    for sealed in (whole, streamed):
        assert opens_with_age(sealed, keys, tmp_path) == data
        assert pyrage.decrypt(sealed, [pyrage_identity(BOB)]) == data
        assert age.decrypt(sealed, [BOB], "object") == data
    assert pyrage.decrypt(whole, [pyrage_identity(ALICE)]) == data


@pytest.mark.parametrize("size", [0, 1, age.CHUNK, 200_000])
def test_what_age_and_pyrage_write_opens_with_ours(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    (tmp_path / "plain").write_bytes(data)
    subprocess.run(
        [
            age_command(),
            "-r",
            str(BOB.recipient),
            "-o",
            str(tmp_path / "sealed"),
            str(tmp_path / "plain"),
        ],
        check=True,
    )
    # pyrage adds a "grease" stanza of a random type: ours must pass over it.
    from_pyrage = pyrage.encrypt(data, [x25519.Recipient.from_str(str(BOB.recipient))])
    for sealed in ((tmp_path / "sealed").read_bytes(), from_pyrage):
        assert age.decrypt(sealed, [ALICE, BOB], "object") == data
        header = age.parse_header(sealed, "object")
        opened = age.open_header(header, sealed[header.length :], [BOB], "object")
        if size:
            first, offset, span = opened.span(size - 1, 1)
            tail = opened.open_chunks(sealed[offset : offset + span], first, ends=True)
            assert tail[-1:] == data[-1:]


def test_keys_parse_as_age_keygen_writes_them(tmp_path: Path) -> None:
    generated = pyrage_identity(new_identity())
    identity = parse_identity(str(generated), "test")
    assert str(identity.recipient) == str(generated.to_public())
    assert parse_recipient(str(generated.to_public()), "test") == identity.recipient


@pytest.mark.parametrize("size", [1, 1000, age.CHUNK, age.CHUNK + 1, 5 * age.CHUNK + 17])
def test_every_range_opens_only_its_chunks(size: int) -> None:
    data = os.urandom(size)
    sealed = age.encrypt(data, [ALICE.recipient])
    header = age.parse_header(sealed, "o")
    opened = age.open_header(header, sealed[header.length :], [ALICE], "o")
    edges = sorted({0, 1, size - 1, *(k * age.CHUNK + d for k in range(6) for d in (-1, 0, 1))})
    for start in (e for e in edges if 0 <= e < size):
        for length in (1, 2, age.CHUNK, age.CHUNK + 2, size):
            first, offset, span = opened.span(start, length)
            fetched = sealed[offset : offset + span]
            ends = offset + span >= len(sealed)
            plain = opened.open_chunks(fetched, first, ends=ends)
            skip = start - first * age.CHUNK
            assert plain[skip : skip + length] == data[start : start + length], (start, length)
    assert age.plain_size(len(sealed), header.length, "o") == size


def test_the_header_names_the_recipients_fingerprints_and_nothing_secret() -> None:
    sealed = age.encrypt(b"secret value", [ALICE.recipient, BOB.recipient])
    header = age.parse_header(sealed, "o")
    assert header.fingerprints == (ALICE.recipient.fingerprint, BOB.recipient.fingerprint)
    assert header.kinds == ("X25519", "X25519")
    text = sealed[: header.length].decode()
    for key in (ALICE, BOB):
        assert identity_text(key) not in text and str(key.recipient) not in text
    assert b"secret value" not in sealed


def flipped(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


def test_damage_anywhere_is_corrupt_never_wrong_plaintext() -> None:
    data = os.urandom(3 * age.CHUNK + 5)
    sealed = age.encrypt(data, [ALICE.recipient])
    header = age.parse_header(sealed, "obj")
    body = header.length + age.NONCE
    for at in (body, body + age.SEALED + 3, len(sealed) - 1, header.length + 2, header.length - 5):
        with pytest.raises(CorruptObject, match="obj"):
            age.decrypt(flipped(sealed, at), [ALICE], "obj")
    # Cut at a chunk boundary (the remaining chunks all authenticate), or extended.
    for cut in (sealed[: body + age.SEALED], sealed + b"x", sealed[: body + 10], sealed[:body]):
        with pytest.raises(CorruptObject, match="obj"):
            age.decrypt(cut, [ALICE], "obj")
    # Our recipient's stanza altered: named damaged, not "wrong identity".
    stanza_body = sealed.index(b"\n", sealed.index(b"-> X25519")) + 3
    with pytest.raises(CorruptObject, match="stanza"):
        age.decrypt(flipped(sealed, stanza_body), [ALICE], "obj")


def test_a_range_cut_at_a_chunk_boundary_is_short_not_wrong() -> None:
    data = os.urandom(3 * age.CHUNK)
    sealed = age.encrypt(data, [ALICE.recipient])
    header = age.parse_header(sealed, "o")
    opened = age.open_header(header, sealed[header.length :], [ALICE], "o")
    # The last chunk is full-size: told apart by its flag, whatever ``ends`` says.
    first, offset, span = opened.span(2 * age.CHUNK, 10)
    assert (
        opened.open_chunks(sealed[offset : offset + span], first, ends=False)[:10]
        == data[2 * age.CHUNK : 2 * age.CHUNK + 10]
    )
    # A middle chunk presented as the last one fails.
    first, offset, span = opened.span(age.CHUNK, 10)
    with pytest.raises(CorruptObject, match="chunk 1"):
        opened.open_chunks(sealed[offset : offset + span], first, ends=True)


def test_no_identity_or_a_wrong_one_is_refused_naming_the_object_and_fingerprints() -> None:
    sealed = age.encrypt(b"v", [ALICE.recipient])
    with pytest.raises(age.NotDecryptable, match="give --age-identity") as none:
        age.decrypt(sealed, [], "seg/1")
    assert "seg/1" in str(none.value) and ALICE.recipient.fingerprint in str(none.value)
    with pytest.raises(age.NotDecryptable, match="no identity given opens seg/1") as wrong:
        age.decrypt(sealed, [BOB], "seg/1")
    assert ALICE.recipient.fingerprint in str(wrong.value)
    assert identity_text(BOB) not in str(wrong.value)
    # Several identities: the one that fits opens it, in any order.
    assert age.decrypt(sealed, [BOB, ALICE], "seg/1") == b"v"


def test_not_an_age_file_and_an_endless_header_are_corrupt() -> None:
    with pytest.raises(CorruptObject, match="not an age file"):
        age.parse_header(b"\x89RRB...", "o")
    with pytest.raises(age.NeedHeader):
        age.parse_header(age.MAGIC + b"-> X25519 abc\n", "o")
    with pytest.raises(CorruptObject, match="longer than"):
        age.parse_header(age.MAGIC + b"-> x " + b"a" * age.MAX_HEADER, "o")
    with pytest.raises(CorruptObject, match="malformed"):
        age.parse_header(age.MAGIC + b"garbage\n", "o")
