"""Object names: prefixes, hashing, parsing, and version order."""

from __future__ import annotations

import hashlib
import os
import random

import pytest

from rrb_streams.errors import ConfigError
from rrb_streams.format.layout import (
    ParsedName,
    key_dir,
    key_hash,
    latest_name,
    normalize_prefix,
    parse_name,
    version_name,
    versions_prefix,
)
from rrb_streams.storage.base import check_name

KEYS = [b"k", b"", b"\x00", bytes(range(256)), os.urandom(10 * 1024), "ключ".encode()]


@pytest.mark.parametrize("prefix", ["/my-keys/", "my-keys", "my-keys/", "//my-keys//", " my-keys "])
def test_layout_prefix_forms_are_equivalent(prefix: str) -> None:
    assert normalize_prefix(prefix) == "my-keys/"


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [("", ""), ("/", ""), ("a/b", "a/b/"), ("/a//b/", "a/b/"), ("a.b/c-d", "a.b/c-d/")],
)
def test_layout_prefix_normalisation(prefix: str, expected: str) -> None:
    assert normalize_prefix(prefix) == expected


@pytest.mark.parametrize("prefix", ["..", "a/../b", "./a", "a/.", "a\x00b"])
def test_layout_prefix_refuses_dot_segments_and_nul(prefix: str) -> None:
    with pytest.raises(ConfigError, match="invalid path prefix"):
        normalize_prefix(prefix)


@pytest.mark.parametrize("key", KEYS, ids=["k", "empty", "nul", "binary", "10KB", "utf8"])
def test_layout_names_are_short_valid_and_parse_back(key: bytes) -> None:
    h = hashlib.sha256(key).hexdigest()
    assert key_hash(key) == h
    prefix = "backups/"
    latest = latest_name(prefix, 5, key)
    assert latest == f"backups/db5/{h[:2]}/{h}.backup"
    assert parse_name(latest, prefix) == ParsedName(5, h, None, False)
    assert not ParsedName(5, h, None, False).versioned
    for tombstone in (False, True):
        name = version_name(prefix, 5, key, 1_700_000_000_000_001, tombstone=tombstone)
        assert name.startswith(versions_prefix(prefix, 5, key))
        assert name.startswith(key_dir(prefix, 5, key) + "/")
        parsed = parse_name(name, prefix)
        assert parsed == ParsedName(5, h, 1_700_000_000_000_001, tombstone)
        assert parsed.versioned
        assert check_name(name) == name
    assert len(latest) < 100
    assert check_name(latest) == latest


def test_layout_parse_name_without_prefix() -> None:
    name = latest_name("", 0, b"k")
    assert parse_name(name) == ParsedName(0, key_hash(b"k"), None, False)


def test_layout_latest_name_is_not_inside_the_versions_folder() -> None:
    assert not latest_name("", 0, b"k").startswith(versions_prefix("", 0, b"k"))


def test_layout_version_names_sort_by_read_time() -> None:
    times = [0, 1, 9, 10, 999_999, 1_000_000, 1_700_000_000_000_000, 99_999_999_999_999_999]
    names = [version_name("p/", 0, b"k", t, tombstone=i % 2 == 1) for i, t in enumerate(times)]
    shuffled = names[:]
    random.Random(7).shuffle(shuffled)
    assert sorted(shuffled, key=lambda n: n.encode()) == names
    parsed = [parse_name(n, "p/") for n in names]
    assert [p.read_at_us for p in parsed if p is not None] == times


@pytest.mark.parametrize(
    "name",
    [
        "",
        "db0/ab/ab.backup",
        "other/" + latest_name("", 0, b"k"),  # an unexpected extra prefix
        latest_name("", 0, b"k") + "\n",
        latest_name("", 0, b"k") + ".tmp",
        latest_name("", 0, b"k").replace("db0", "db\u0663"),  # an Arabic-Indic digit
        latest_name("", 0, b"k").upper(),
        "db0/00/" + key_hash(b"k") + ".backup",  # fan-out that does not match the hash
        key_dir("", 0, b"k") + "/123.backup",  # version not 17 digits
        key_dir("", 0, b"k") + "/00000000000000001.snapshot",
        key_dir("", 0, b"k") + "/00000000000000001.backup\n",
        key_dir("", 0, b"k") + "/" + "\u0661" * 17 + ".backup",
    ],
)
def test_layout_parse_name_rejects_foreign_names(name: str) -> None:
    assert parse_name(name) is None


def test_layout_parse_name_requires_the_given_prefix() -> None:
    name = latest_name("a/", 0, b"k")
    assert parse_name(name, "a/") is not None
    assert parse_name(name, "b/") is None
    assert parse_name(name) is None
