"""Redis glob patterns on raw key bytes, for ``rrb-restore --match GLOB``.

``compile_glob(pattern)`` returns a predicate that answers exactly as Redis 7.0's
``stringmatchlen`` (the matcher behind ``KEYS`` and ``SCAN ... MATCH``) does, case-sensitively:

- ``*`` matches any run of bytes, ``?`` any one byte; keys may hold newlines and any byte.
- ``[abc]`` one byte of the set, ``[^abc]`` one byte not in it; ``[a-z]`` a range, and a
  reversed range ``[z-a]`` means the same as ``[a-z]``.
- ``\\x`` is the byte ``x`` taken literally, outside and inside brackets. A ``\\`` that ends
  the pattern, or ends it inside brackets, is a literal backslash.
- A ``]`` right after ``[`` or ``[^`` closes the set at once: ``[]`` matches nothing and
  ``[^]`` matches any byte. A ``-`` is a range whenever two more pattern bytes follow it,
  so ``[a-]`` is the range from ``a`` to ``]``, and the set runs on past that ``]``.
- An unterminated ``[`` takes the rest of the pattern as its set: ``[ab`` means ``[ab]``.
- Range ends compare as C ``char`` does where Redis is built for x86-64, that is signed:
  bytes 0x80-0xff sort below 0x00, so ``[a-\\xff]`` holds 0x00-``a`` and 0xff.
- The empty key matches only the empty pattern and ``*``.
- More than 1000 separate ``*`` runs (1001 if the pattern ends with one) never match:
  Redis stops there to protect itself from abusive patterns.

The predicate is a compiled ``re`` bytes pattern (DOTALL, fullmatch). Each ``*`` that is
followed by more pattern commits to the leftmost place where the next fixed-width piece
fits, which is always safe for globs and keeps matching linear-ish instead of exponential.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_STAR = 0x2A
_ANY = 0x3F
_OPEN = 0x5B
_CLOSE = 0x5D
_NOT = 0x5E
_DASH = 0x2D
_ESCAPE = 0x5C

# Redis gives up on a pattern once its matcher recurses this deep (one level per `*` run).
_MAX_NESTING = 1000

_Token = int | frozenset[int] | None  # a literal byte, a set of bytes, or `*` (None)


def _signed(byte: int) -> int:
    return byte - 256 if byte >= 0x80 else byte


def _range(a: int, b: int) -> set[int]:
    lo, hi = sorted((_signed(a), _signed(b)))
    return {x & 0xFF for x in range(lo, hi + 1)}


def _bracket(p: bytes, i: int) -> tuple[frozenset[int], int]:
    """Parse the set whose ``[`` is at ``p[i-1]``; return it and the index after it."""
    n = len(p)
    negate = i < n and p[i] == _NOT
    if negate:
        i += 1
    members: set[int] = set()
    while i < n:
        c = p[i]
        if c == _ESCAPE and n - i >= 2:
            members.add(p[i + 1])
            i += 2
        elif c == _CLOSE:
            i += 1
            break
        elif n - i >= 3 and p[i + 1] == _DASH:
            members |= _range(c, p[i + 2])
            i += 3
        else:
            members.add(c)
            i += 1
    if negate:
        members = set(range(256)) - members
    return frozenset(members), i


def _tokens(p: bytes) -> list[_Token]:
    out: list[_Token] = []
    i, n = 0, len(p)
    while i < n:
        c = p[i]
        if c == _STAR:
            if not out or out[-1] is not None:
                out.append(None)
            i += 1
        elif c == _ANY:
            out.append(frozenset(range(256)))
            i += 1
        elif c == _OPEN:
            members, i = _bracket(p, i + 1)
            out.append(members)
        elif c == _ESCAPE and n - i >= 2:
            out.append(p[i + 1])
            i += 2
        else:
            out.append(c)
            i += 1
    return out


def _set_regex(members: frozenset[int]) -> bytes:
    if not members:
        return rb"(?!)"
    if len(members) == 256:
        return b"."
    runs: list[bytes] = []
    ordered = sorted(members)
    start = prev = ordered[0]
    for b in [*ordered[1:], -1]:
        if b != prev + 1:
            runs.append(b"\\x%02x" % start if start == prev else b"\\x%02x-\\x%02x" % (start, prev))
            start = b
        prev = b
    return b"[" + b"".join(runs) + b"]"


def _piece(token: int | frozenset[int]) -> bytes:
    return re.escape(bytes([token])) if isinstance(token, int) else _set_regex(token)


def _regex(tokens: list[_Token]) -> bytes:
    # Split on `*`: the first segment anchors at the start, the last at the end, and each
    # middle segment is fixed-width, so its leftmost fit is never worse than a later one.
    segments: list[bytes] = [b""]
    for t in tokens:
        if t is None:
            segments.append(b"")
        else:
            segments[-1] += _piece(t)
    if len(segments) == 1:
        return segments[0]
    middle = b"".join(b"(?>.*?" + s + b")" for s in segments[1:-1])
    return segments[0] + middle + b".*" + segments[-1]


def compile_glob(pattern: bytes) -> Callable[[bytes], bool]:
    """A predicate telling whether a key matches ``pattern`` as Redis ``SCAN MATCH`` would.

    Never raises: every byte string is a valid Redis pattern. See the module docstring.
    """
    if pattern == b"*":
        return lambda key: True
    tokens = _tokens(pattern)
    stars = tokens.count(None)
    if stars > _MAX_NESTING + (1 if tokens and tokens[-1] is None else 0):
        return lambda key: False
    if not tokens:
        return lambda key: key == b""
    rx = re.compile(_regex(tokens), re.DOTALL)
    return lambda key: bool(key) and rx.fullmatch(key) is not None
