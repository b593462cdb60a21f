"""age keys from options, files and the environment: what is accepted, and errors that never
quote a secret."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from rrb_streams.crypt.keys import (
    IDENTITY_FILE_ENV,
    RECIPIENTS_ENV,
    age_keys,
    fingerprint,
    load_identities,
    parse_recipient,
)
from rrb_streams.errors import ConfigError
from tests.support.age import ALICE, BOB, identity_file, identity_text


def test_an_identity_file_from_age_keygen_loads(tmp_path: Path) -> None:
    keygen = shutil.which("age-keygen")
    if keygen is None:
        if os.environ.get("CI"):
            pytest.fail("age-keygen is missing: scripts/test installs Debian's age")
        pytest.skip("age-keygen is not installed")
    subprocess.run([keygen, "-o", str(tmp_path / "key.txt")], check=True, capture_output=True)
    text = (tmp_path / "key.txt").read_text()
    public = next(line.split(": ")[1] for line in text.splitlines() if "public key" in line)
    (identity,) = load_identities(str(tmp_path / "key.txt"))
    assert str(identity.recipient) == public


def test_several_identities_in_one_file_with_comments(tmp_path: Path) -> None:
    path = identity_file(tmp_path / "keys.txt", ALICE, BOB)
    path.write_text("\n# rotated in 2026\n\n" + path.read_text())
    assert load_identities(str(path)) == (ALICE, BOB)


def test_recipients_come_from_flags_files_or_the_environment(tmp_path: Path) -> None:
    listed = tmp_path / "recipients.txt"
    listed.write_text(f"# the team\n{BOB.recipient}\n\n{ALICE.recipient}\n")
    keys = age_keys([str(ALICE.recipient)], [str(listed)], env={})
    assert keys.recipients == (ALICE.recipient, BOB.recipient)  # duplicates once
    env = {RECIPIENTS_ENV: f"{ALICE.recipient}, {BOB.recipient}"}
    assert age_keys(env=env).recipients == (ALICE.recipient, BOB.recipient)
    assert age_keys([str(BOB.recipient)], env=env).recipients == (BOB.recipient,)  # flags win
    path = identity_file(tmp_path / "key.txt", ALICE)
    assert age_keys(env={IDENTITY_FILE_ENV: str(path)}).identities == (ALICE,)
    assert age_keys(env={}).recipients == () and age_keys(env={}).identities == ()


def test_the_fingerprint_is_what_sha256sum_prints() -> None:
    text = str(ALICE.recipient)
    done = subprocess.run(["sha256sum"], input=text.encode(), capture_output=True, check=True)
    assert ALICE.recipient.fingerprint == done.stdout[:16].decode() == fingerprint(text)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("", "no identity in the file"),
        ("# only a comment\n", "no identity in the file"),
        ("AGE-SECRET-KEY-1QQQQ\n", "line 1: not an age identity"),
        ("# c\nssh-ed25519 AAAA...\n", "line 2: not an age identity"),
    ],
)
def test_bad_identity_files_are_named_with_the_line_never_quoted(
    tmp_path: Path, content: str, needle: str
) -> None:
    path = tmp_path / "id.txt"
    path.write_text(content)
    with pytest.raises(ConfigError, match=needle) as err:
        load_identities(str(path))
    assert str(path) in str(err.value)
    assert "QQQQ" not in str(err.value) and "AAAA" not in str(err.value)


def test_a_secret_given_as_a_recipient_is_refused_without_quoting_it() -> None:
    secret = identity_text(ALICE)
    with pytest.raises(ConfigError, match="secret identity") as err:
        parse_recipient(secret, "--age-recipient")
    assert secret not in str(err.value) and secret.lower() not in str(err.value)
    typo = secret[:-1] + ("Q" if secret[-1] != "Q" else "P")
    with pytest.raises(ConfigError, match="not an age recipient") as err:
        parse_recipient(typo, "--age-recipient")
    assert typo[15:] not in str(err.value)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("ssh-ed25519 AAAAC3Nza", "ssh keys"),
        ("age1", "not an age recipient"),
        ("age1qqqqqqqqqqqqqqqqqqqqqqqqqq", "not an age recipient"),
        ("Age1" + "q" * 58, "mixed case"),
    ],
)
def test_bad_recipients_are_refused(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_recipient(text, "--age-recipient")


def test_an_unreadable_identity_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it: No such file"):
        load_identities(str(tmp_path / "missing.txt"))
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_identities(str(tmp_path / "binary"))


def test_an_identity_never_shows_its_secret() -> None:
    secret = identity_text(ALICE)
    for text in (repr(ALICE), str(ALICE), repr(age_keys(env={})), repr((ALICE, BOB))):
        assert secret not in text and secret.lower() not in text
        assert ALICE.secret.hex() not in text
    assert ALICE.recipient.fingerprint in repr(ALICE)


@pytest.mark.parametrize(
    ("command", "argv", "needle"),
    [
        ("upload", ["--age-recipient", "nope"], "--age-recipient: not an age recipient"),
        ("rrb", ["--age-recipients-file", "/no/such/file"], "cannot read it: No such file"),
        ("compact", ["--age-identity", "/no/such/key"], "--age-identity /no/such/key"),
        ("restore", ["--age-identity", "/no/such/key"], "cannot read it"),
        ("verify", ["--age-identity", "/no/such/key"], "cannot read it"),
    ],
)
def test_bad_age_options_are_one_line_and_exit_2(
    command: str, argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from rrb_streams.cli import backup, compact, restore, verify

    run = {
        "upload": backup.upload,
        "rrb": backup.rrb,
        "compact": compact.compact,
        "restore": restore.restore,
        "verify": verify.verify,
    }[command]
    assert run(["redis://127.0.0.1:1/0", *argv]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert needle in line and "Traceback" not in line
