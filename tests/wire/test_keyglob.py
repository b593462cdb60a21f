"""Redis glob matching on raw bytes: a table of edge cases, then a real server as the oracle."""

from __future__ import annotations

import random
import time

import pytest

from rrb_streams.wire.keyglob import compile_glob
from tests.support.servers import RedisServer

CASES: list[tuple[bytes, bytes, bool]] = [
    # the empty key and the empty pattern
    (b"", b"", True),
    (b"", b"a", False),
    (b"*", b"", True),  # SCAN and KEYS short-cut a lone `*`
    (b"**", b"", False),  # ... but the matcher itself never matches an empty key
    (b"?", b"", False),
    (b"[^a]", b"", False),
    # literals, `?` and `*`
    (b"user:1", b"user:1", True),
    (b"user:1", b"user:10", False),
    (b"user:1", b"User:1", False),
    (b"h?llo", b"hello", True),
    (b"h?llo", b"hllo", False),
    (b"h*llo", b"hllo", True),
    (b"h*llo", b"heeeello", True),
    (b"a*", b"a", True),
    (b"*a", b"ba", True),
    (b"*a", b"ab", False),
    (b"a**b", b"ab", True),
    (b"a*?", b"a", False),
    (b"a*?", b"ab", True),
    (b"*?*", b"x", True),
    (b"a*b*c", b"abbbcbc", True),
    (b"a*b*c", b"abbbcb", False),
    (b"?", b"\n", True),
    (b"a*b", b"a\nb", True),
    (b"a*b", b"a\r\n\x00\xffb", True),
    (b"a\x00*", b"a\x00b", True),
    (b"a\x00*", b"a", False),
    (b"\xff?", b"\xff\xfe", True),
    # sets and ranges
    (b"h[ae]llo", b"hallo", True),
    (b"h[ae]llo", b"hillo", False),
    (b"h[^e]llo", b"hallo", True),
    (b"h[^e]llo", b"hello", False),
    (b"h[a-b]llo", b"hbllo", True),
    (b"h[a-b]llo", b"hcllo", False),
    (b"[z-a]", b"m", True),  # reversed range
    (b"[z-a]", b"A", False),
    (b"[A-Z]", b"a", False),  # case-sensitive
    (b"[a^]", b"^", True),  # `^` is literal when not first
    (b"[-a]", b"-", True),  # `-` first is literal
    (b"[a-]", b"_", True),  # `a-]` is the range ']'..'a': the set is unterminated
    (b"[a-]", b"-", False),
    (b"[a-]x", b"x", True),  # ... so `x` joins the set
    (b"[a-]x", b"ax", False),
    (b"[--0]", b"/", True),
    (b"[\x00]", b"\x00", True),
    (b"[\n]", b"\n", True),
    (b"[^\n]", b"\n", False),
    # `]` right after `[` or `[^` closes the set
    (b"[]", b"]", False),
    (b"[]]", b"]]", False),
    (b"[]a]", b"]a]", False),
    (b"[^]", b"x", True),
    (b"[^]", b"]", True),
    (b"[^]a]", b"xa]", True),
    (b"[^]a]", b"x", False),
    # an unterminated `[` takes the rest of the pattern
    (b"[", b"[", False),
    (b"[", b"", False),
    (b"[ab", b"a", True),
    (b"[ab", b"ab", False),
    (b"[ab", b"[", False),
    (b"x[ab", b"xb", True),
    (b"[^", b"x", True),
    (b"[^", b"xy", False),
    (b"[*", b"*", True),
    (b"[*", b"xx", False),
    # escapes
    (b"\\*", b"*", True),
    (b"\\*", b"a", False),
    (b"\\?", b"?", True),
    (b"\\?", b"a", False),
    (b"\\[a]", b"[a]", True),
    (b"\\[a]", b"a", False),
    (b"\\\\", b"\\", True),
    (b"\\a", b"a", True),
    (b"\\", b"\\", True),  # a trailing backslash is literal
    (b"a\\", b"a\\", True),
    (b"[\\]]", b"]", True),
    (b"[\\]]", b"\\]", False),
    (b"[\\^a]", b"^", True),
    (b"[\\-]", b"-", True),
    (b"[a\\-z]", b"-", True),  # an escaped `-` is no range
    (b"[a\\-z]", b"b", False),
    (b"[\\", b"\\", True),  # a backslash ending an unterminated set is literal
    (b"[a\\", b"\\", True),
    (b"[^\\", b"\\", False),
    (b"[a-\\]]", b"_]", True),  # a range may end at a backslash: '\\'..'a', then `]`
    (b"[a-\\]]", b"b]", False),
    (b"[a-\\]]", b"_", False),
    # range ends compare as signed bytes, as Redis on x86-64 does
    (b"[a-\xff]", b"\x00", True),
    (b"[a-\xff]", b"a", True),
    (b"[a-\xff]", b"\xff", True),
    (b"[a-\xff]", b"\x80", False),
    (b"[a-\xff]", b"b", False),
    (b"[\x7f-\x80]", b"q", True),
    (b"[\x80-\xff]", b"\xc0", True),
    (b"[\x80-\xff]", b"\x7f", False),
    # Redis gives up beyond 1000 `*` runs
    (b"*a" * 1000, b"a" * 1000, True),
    (b"*a" * 1001, b"a" * 1001, False),
    (b"*a" * 1000 + b"*", b"a" * 1001, True),
    (b"*a" * 1001 + b"*", b"a" * 1002, False),
    (b"**a" * 1000, b"a" * 1000, True),
]


@pytest.mark.parametrize(("pattern", "key", "expected"), CASES)
def test_table(pattern: bytes, key: bytes, expected: bool) -> None:
    assert compile_glob(pattern)(key) is expected


def test_lone_star_matches_everything() -> None:
    match = compile_glob(b"*")
    assert all(match(k) for k in (b"", b"\n", b"\x00", bytes(range(256))))


def test_many_stars_stay_fast() -> None:
    """A backtracking translation would take ages here; Redis answers at once."""
    match = compile_glob(b"*a*a*a*a*a*a*a*a*b")
    start = time.monotonic()
    assert not match(b"a" * 20_000)
    assert match(b"a" * 20_000 + b"b")
    assert not compile_glob(b"*?*?*?*?*?*?*?*?x")(b"y" * 20_000)
    assert time.monotonic() - start < 1.0


# --- a real Redis as the oracle --------------------------------------------------------------

KEYS: list[bytes] = [
    b"a",
    b"b",
    b"z",
    b"A",
    b"ab",
    b"abc",
    b"a\nb",
    b"a\n",
    b"\n",
    b"\r\n",
    b"\x00",
    b"a\x00b",
    b"\x7f",
    b"\x80",
    b"\xc3\xa9",
    b"\xff",
    b"\xff\xfe",
    b"[",
    b"]",
    b"[]",
    b"[a]",
    b"[a-z]",
    b"\\",
    b"\\\\",
    b"a\\",
    b"\\*",
    b"*",
    b"?",
    b"^",
    b"^a",
    b"-",
    b"a-",
    b"-a",
    b"_",
    b"`",
    b"user:1",
    b"user:10",
    b"user:100",
    b"user:2",
    b"User:1",
    b"user:",
    b"user:x",
    b"session:abc:1",
    b"session:abc:",
    b"cache/a/b",
    b"h\xe9llo",
    b"hello",
    b"hallo",
    b"hillo",
    b"hllo",
    b"heeello",
    b"0",
    b"9",
    b"42",
    b"a*b",
    b"a?b",
    b"x[y",
    b"xy]",
    b"\t",
    b" ",
    b"a b",
    b"",
]

PATTERNS: list[bytes] = [
    b"**",
    b"?",
    b"??",
    b"user:*",
    b"user:?",
    b"user:[0-9]*",
    b"user:[^1]*",
    b"[Uu]ser:1",
    b"h[ae]llo",
    b"h[^e]llo",
    b"h*llo",
    b"a*b",
    b"*\n*",
    b"*\x00*",
    b"[\x80-\xff]*",
    b"[a-\xff]",
    b"[z-a]",
    b"[a-]",
    b"[]a]",
    b"[^]",
    b"[",
    b"[^",
    b"[a",
    b"\\*",
    b"\\\\*",
    b"\\",
    b"a\\",
    b"[\\]]",
    b"[\\",
    b"[\\^a]*",
    b"[a-\\]*",
    b"[-a]*",
    b"^*",
    b"*]",
    b"x[[]y",
    b"*[0-9]",
    b"*:*:*",
    b"[ \t]*",
    b"",
]


def server_matches(server: RedisServer, pattern: bytes) -> set[bytes]:
    with server.client() as c:
        return set(c.scan_iter(match=pattern, count=1000))


def test_agrees_with_redis_scan_match(redis_server: RedisServer) -> None:
    with redis_server.client() as c:
        c.mset(dict.fromkeys(KEYS, b"1"))
        assert c.dbsize() == len(KEYS)
    for pattern in PATTERNS:
        match = compile_glob(pattern)
        ours = {k for k in KEYS if match(k)}
        assert ours == server_matches(redis_server, pattern), pattern


def test_agrees_with_redis_on_random_patterns(redis_server: RedisServer) -> None:
    rng = random.Random(20261124)
    alphabet = b"ab-^[]\\*?z\n\x00\x7f\x80\xff"
    keys = {bytes(rng.choices(alphabet, k=rng.randint(1, 5))) for _ in range(400)} | {b""}
    with redis_server.client() as c:
        c.mset(dict.fromkeys(keys, b"1"))
        patterns = [bytes(rng.choices(alphabet, k=rng.randint(0, 7))) for _ in range(400)]
        pipe = c.pipeline(transaction=False)
        for pattern in patterns:
            pipe.keys(pattern)
        answers = pipe.execute()
    for pattern, answer in zip(patterns, answers, strict=True):
        match = compile_glob(pattern)
        assert {k for k in keys if match(k)} == set(answer), pattern


def test_table_is_what_redis_answers(redis_server: RedisServer) -> None:
    patterns = list(dict.fromkeys(p for p, _, _ in CASES))
    with redis_server.client() as c:
        c.mset({k: b"1" for _, k, _ in CASES})
        pipe = c.pipeline(transaction=False)
        for pattern in patterns:
            pipe.keys(pattern)
        answers = dict(zip(patterns, map(set, pipe.execute()), strict=True))
    for pattern, key, expected in CASES:
        assert (key in answers[pattern]) is expected, (pattern, key)
