"""Client-side encryption's cost: backup and restore throughput with and without age.

Run from the repository root, after ``scripts/test`` made ``.venv``::

    .venv/bin/python -m bench.encryption                     # everything, median of 3 runs
    .venv/bin/python -m bench.encryption --runs 5 --only restore_fs --json out.json
    .venv/bin/python -m bench.encryption --runs 1 --backup-keys 20000 \\
        --restore-keys 20000                                  # a quick trial

Every figure is measured plain and encrypted in the same run, on the same machine, from the
same dataset, the two interleaved run by run (plain first in odd runs, encrypted first in
even ones), so that whatever else the machine does hits both. Throughputs are medians over
``--runs``; the cost is ``1 - encrypted / plain`` of the two medians (each run's own pair is
in the JSON). The key is a fresh X25519 identity (``tests/support/age.py``), its identity file
in the work folder. Commands run as their own processes, every server on 127.0.0.1 only.

==========  ==================================================================  ==========
backup      ``rrb`` (segments layout, to a folder) started against a Redis       cost < 15%
            holding ``--backup-keys`` 64-byte strings, to drained (every entry
            acked, every key in a segment): keys/s, plain vs ``--age-recipient``
            (``bench.segments.bench_bulk``; its raw SCAN/DUMP loop is in the
            JSON). Both get ``--no-compaction``: given a recipient but no
            identity, rrb turns its compaction off anyway. Every segment is
            checked to be an age file (or not), and one is decrypted.
restore_fs  ``rrb-restore`` of ``--restore-keys`` 64-byte strings from a folder  cost < 15%
            of segments (10,000 records each, ``bench.segments.make_segments``),
            start to exit, and its peak RSS: the plain folder vs an encrypted
            copy (every object through ``rrb_streams.crypt.age.encrypt``, same
            names, as rrb stores it), restored with ``--age-identity``.
restore_s3  the same two datasets in two buckets of one moto S3 server,          cost < 15%
            ``rrb-restore -c 8``.
primitives  in-process, no I/O: ``age.encrypt`` and ``age.decrypt`` of           (reported)
            ``--primitive-mb`` MiB of random bytes (MiB/s), and of a one-byte
            object (the cost per object: X25519, HKDF, header, MAC).
==========  ==================================================================  ==========

The datasets are 64-byte values that compress well, so the stored bytes (what is encrypted)
are about a fifth of the logical size; ``primitives`` gives the rate to scale from for data
that does not compress.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import median
from bench.common import redis as start_redis
from bench.restore import start_moto
from bench.segments import (
    S3_CONCURRENCY,
    bench_bulk,
    code_state,
    fmt,
    in_workdir,
    make_segments,
    restore_argv,
    restore_once,
    rounded,
    run_to_exit,
    segment_files,
)
from rrb_streams.crypt import age
from rrb_streams.crypt.keys import Identity
from rrb_streams.format import segment
from tests.support.age import identity_file, new_identity
from tests.support.moto import boto_client
from tests.support.moto import s3_env as moto_env
from tests.support.servers import child_env

GOAL = 0.15  # the goal: encryption costs under 15% of the throughput
BUCKETS = {"plain": "rrb-bench-enc-plain", "age": "rrb-bench-enc-age"}
MODES = ("plain", "age")


class Keys:
    """The benchmark's age key: the recipient for writers, an identity file for readers."""

    def __init__(self, folder: Path) -> None:
        self.identity: Identity = new_identity()
        self.recipient = str(self.identity.recipient)
        self.file = identity_file(folder / "identity.txt", self.identity)

    def write_args(self, mode: str) -> tuple[str, ...]:
        return ("--age-recipient", self.recipient) if mode == "age" else ()

    def read_args(self, mode: str) -> tuple[str, ...]:
        return ("--age-identity", str(self.file)) if mode == "age" else ()


def order(run: int) -> tuple[str, ...]:
    """Plain first in odd runs (1, 3…), encrypted first in even ones."""
    return MODES if run % 2 == 0 else MODES[::-1]


def stored_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def check_stored(folder: Path, encrypted: bool, keys: Keys) -> int:
    """Every segment under ``folder`` is an age file (``encrypted``) or none is; the first
    one decrypts with the identity and decodes. Returns the number of segments."""
    files = segment_files(folder)
    if not files:
        raise RuntimeError(f"no segment under {folder}")
    for path in files:
        if age.is_encrypted(path.read_bytes()[: len(age.MAGIC)]) != encrypted:
            raise RuntimeError(f"{path.name}: {'not ' if encrypted else ''}an age file")
    data = files[0].read_bytes()
    if encrypted:
        data = age.decrypt(data, [keys.identity], files[0].name)
    _, blocks = segment.decode_segment(data, files[0].name)
    if not blocks or any(isinstance(b, Exception) for b in blocks):
        raise RuntimeError(f"{files[0].name}: does not decode")
    return len(files)


# --- 1. backup ------------------------------------------------------------------------------


def backup_once(work: Path, n: int, mode: str, keys: Keys) -> dict[str, Any]:
    args = ("--no-compaction", *keys.write_args(mode))
    r = bench_bulk(work, n, rrb_args=args)
    segments = check_stored(work / "store", mode == "age", keys)
    stored = sum(p.stat().st_size for p in segment_files(work / "store"))
    return {
        "keys": n,
        "rrb_s": r["rrb_s"],
        "keys_per_s": n / r["rrb_s"],
        "raw_s": r["raw_s"],
        "segments": segments,
        "segment_records": r["segment_records"],
        "stored_mb": stored / 2**20,
    }


def backup_runs(n: int, runs: int, keys: Keys) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for i in range(runs):
        for mode in order(i):
            r = in_workdir(
                f"enc-backup-{mode}", functools.partial(backup_once, n=n, mode=mode, keys=keys)
            )
            out[mode].append(r)
            print(f"  backup {mode} run {i + 1}: {json.dumps(rounded(r))}", flush=True)
    return out


# --- 2. and 3. restore ----------------------------------------------------------------------


_DATASETS: dict[int, dict[str, Any]] = {}


def encrypted_copy(src: Path, dst: Path, keys: Keys) -> float:
    """Every object of ``src`` encrypted to ``keys`` under the same name in ``dst``, as
    rrb's storage writes it. Returns the MiB written."""
    written = 0
    for path in stored_files(src):
        sealed = age.encrypt(path.read_bytes(), [keys.identity.recipient])
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(sealed)
        written += len(sealed)
    os.sync()
    return written / 2**20


def restore_datasets(shared: Path, n: int, keys: Keys) -> dict[str, Any]:
    """``{"plain": folder, "age": folder, "made": description}`` of ``n`` keys, made once
    in ``shared`` for both restore figures."""
    if n not in _DATASETS:
        work = shared / f"dataset-{n}"
        work.mkdir()
        made = make_segments(work, n, work / "plain")
        made["encrypted_mb"] = round(encrypted_copy(work / "plain", work / "age", keys), 2)
        check_stored(work / "age", True, keys)
        print(f"  dataset of {n:,} keys: {json.dumps(made)}", flush=True)
        _DATASETS[n] = {"plain": work / "plain", "age": work / "age", "made": made}
    return _DATASETS[n]


def warm_up(work: Path, storage: str, *args: str, env: dict[str, str]) -> None:
    """One ``--dry-run`` (lists, reads every footer): first-touch costs out of the runs."""
    target = start_redis(work / "warm")
    try:
        run_to_exit(restore_argv(target, storage, "--dry-run", *args), env)
    finally:
        target.kill()
        shutil.rmtree(work / "warm", ignore_errors=True)


def restore_runs(
    work: Path,
    n: int,
    runs: int,
    keys: Keys,
    storages: dict[str, str],
    *args: str,
    env: dict[str, str] | None = None,
    name: str,
) -> dict[str, list[dict[str, Any]]]:
    """``rrb-restore`` of each mode's storage into a fresh Redis, ``runs`` times,
    interleaved."""
    child = child_env(LOG_LEVEL="WARNING", **(env or {}))
    for mode in MODES:
        warm_up(work, storages[mode], *args, *keys.read_args(mode), env=child)
    out: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for i in range(runs):
        for mode in order(i):
            seconds, peak = restore_once(
                work, f"{mode}{i}", n, storages[mode], *args, *keys.read_args(mode), env=env
            )
            shutil.rmtree(work / f"{mode}{i}", ignore_errors=True)
            r = {"keys": n, "restore_s": seconds, "keys_per_s": n / seconds, "peak_rss_mb": peak}
            out[mode].append(r)
            print(f"  {name} {mode} run {i + 1}: {json.dumps(rounded(r))}", flush=True)
    return out


def restore_fs(work: Path, shared: Path, n: int, runs: int, keys: Keys) -> dict[str, Any]:
    data = restore_datasets(shared, n, keys)
    storages = {m: str(data[m]) for m in MODES}
    return {**restore_runs(work, n, runs, keys, storages, name="restore_fs"), "made": data["made"]}


def restore_s3(work: Path, shared: Path, n: int, runs: int, keys: Keys) -> dict[str, Any]:
    data = restore_datasets(shared, n, keys)
    moto, endpoint = start_moto(work)
    try:
        client = boto_client(endpoint)
        for mode in MODES:
            client.create_bucket(Bucket=BUCKETS[mode])
            folder: Path = data[mode]
            for path in stored_files(folder):
                client.put_object(
                    Bucket=BUCKETS[mode],
                    Key=path.relative_to(folder).as_posix(),
                    Body=path.read_bytes(),
                )
        storages = {m: f"s3://{BUCKETS[m]}/" for m in MODES}
        results = restore_runs(
            work,
            n,
            runs,
            keys,
            storages,
            "-c",
            str(S3_CONCURRENCY),
            env=moto_env(endpoint),
            name="restore_s3",
        )
    finally:
        moto.kill()
        moto.wait()
    return {**results, "made": data["made"]}


# --- 4. the primitives ----------------------------------------------------------------------


def timed(fn: Callable[[], object], times: int) -> float:
    """The median seconds of ``fn()`` over ``times`` calls."""
    seconds = []
    for _ in range(times):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return median(seconds)


def primitives_once(mb: int, keys: Keys) -> dict[str, Any]:
    to = [keys.identity.recipient]
    ids = [keys.identity]
    data = os.urandom(mb * 2**20)
    sealed = age.encrypt(data, to)
    if age.decrypt(sealed, ids, "bench") != data:
        raise RuntimeError("age round trip differs")
    enc_s = timed(lambda: age.encrypt(data, to), 3)
    dec_s = timed(lambda: age.decrypt(sealed, ids, "bench"), 3)
    small = age.encrypt(b"x", to)
    small_enc_s = timed(lambda: age.encrypt(b"x", to), 300)
    small_dec_s = timed(lambda: age.decrypt(small, ids, "bench"), 300)
    return {
        "mb": mb,
        "encrypt_mb_per_s": mb / enc_s,
        "decrypt_mb_per_s": mb / dec_s,
        "object_encrypt_us": small_enc_s * 1e6,
        "object_decrypt_us": small_dec_s * 1e6,
    }


def primitives_runs(mb: int, runs: int, keys: Keys) -> dict[str, Any]:
    out = []
    for i in range(runs):
        out.append(primitives_once(mb, keys))
        print(f"  primitives run {i + 1}: {json.dumps(rounded(out[-1]))}", flush=True)
    return {"runs": out}


# --- driver ---------------------------------------------------------------------------------


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """Medians of each mode, the cost of the medians, and each run's paired cost."""
    out: dict[str, Any] = {}
    for mode in MODES:
        for field in ("keys_per_s", "peak_rss_mb"):
            values = [float(r[field]) for r in results[mode] if field in r]
            if values:
                out[f"{mode}_{field}"] = median(values)
    out["cost"] = 1 - out["age_keys_per_s"] / out["plain_keys_per_s"]
    out["run_costs"] = [
        round(1 - a["keys_per_s"] / p["keys_per_s"], 4)
        for p, a in zip(results["plain"], results["age"], strict=True)
    ]
    return out


def rows_for(name: str, results: dict[str, Any], s: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows (figure, plain, encrypted, cost, goal, runs) of one figure."""
    if name == "primitives":
        m = {k: median([float(r[k]) for r in results["runs"]]) for k in results["runs"][0]}
        return [
            {
                "figure": f"age.encrypt / decrypt, {m['mb']:.0f} MiB in memory",
                "plain": "-",
                "encrypted": f"{m['encrypt_mb_per_s']:,.0f} / {m['decrypt_mb_per_s']:,.0f} MiB/s",
                "cost": "-",
                "goal": "-",
                "runs": "",
            },
            {
                "figure": "age.encrypt / decrypt, one 1-byte object",
                "plain": "-",
                "encrypted": f"{m['object_encrypt_us']:,.0f} / {m['object_decrypt_us']:,.0f} µs",
                "cost": "-",
                "goal": "-",
                "runs": "",
            },
        ]
    keys = results["plain"][0]["keys"]
    what = {
        "backup": f"backup (rrb to drained), {keys:,} keys, folder",
        "restore_fs": f"restore (rrb-restore), {keys:,} keys, folder",
        "restore_s3": f"restore (rrb-restore -c {S3_CONCURRENCY}), {keys:,} keys, moto S3",
    }[name]

    def runs(field: str, digits: int = 0) -> str:
        return " / ".join(", ".join(f"{r[field]:,.{digits}f}" for r in results[m]) for m in MODES)

    rows = [
        {
            "figure": what,
            "plain": fmt(s["plain_keys_per_s"], "/s"),
            "encrypted": fmt(s["age_keys_per_s"], "/s"),
            "cost": f"{100 * s['cost']:.1f}%",
            "goal": f"< {100 * GOAL:.0f}%: " + ("met" if s["cost"] < GOAL else "NOT MET"),
            "runs": runs("keys_per_s"),
        }
    ]
    if "plain_peak_rss_mb" in s:
        rows.append(
            {
                "figure": f"  rrb-restore peak RSS ({name})",
                "plain": fmt(s["plain_peak_rss_mb"], " MB", 1),
                "encrypted": fmt(s["age_peak_rss_mb"], " MB", 1),
                "cost": f"{s['age_peak_rss_mb'] - s['plain_peak_rss_mb']:+.1f} MB",
                "goal": "-",
                "runs": runs("peak_rss_mb", 1),
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    cols = ["figure", "plain", "encrypted", "cost", "goal", "runs"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    out = [" | ".join(c.ljust(widths[c]) for c in cols)]
    out.append("-+-".join("-" * widths[c] for c in cols))
    out += [" | ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(out)


NAMES = ("backup", "restore_fs", "restore_s3", "primitives")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--only",
        nargs="+",
        default=list(NAMES),
        help=f"figures to measure, of {', '.join(NAMES)}; commas work too",
    )
    p.add_argument("--json", type=Path, help="write the runs and the summaries here")
    p.add_argument("--backup-keys", type=int, default=100_000)
    p.add_argument("--restore-keys", type=int, default=300_000)
    p.add_argument("--primitive-mb", type=int, default=64, help="MiB for the primitives")
    args = p.parse_args()
    only: list[str] = []
    for item in args.only:
        for name in item.split(","):
            if name in NAMES:
                only.append(name)
            elif name:
                p.error(f"unknown figure {name!r}")
    runs = args.runs
    started = time.perf_counter()
    shared = Path(tempfile.mkdtemp(prefix="rrb-bench-enc-data-"))  # datasets used twice
    keys = Keys(shared)
    benches: dict[str, Callable[[], dict[str, Any]]] = {
        "backup": lambda: backup_runs(args.backup_keys, runs, keys),
        "restore_fs": lambda: in_workdir(
            "enc-restore-fs", lambda w: restore_fs(w, shared, args.restore_keys, runs, keys)
        ),
        "restore_s3": lambda: in_workdir(
            "enc-restore-s3", lambda w: restore_s3(w, shared, args.restore_keys, runs, keys)
        ),
        "primitives": lambda: primitives_runs(args.primitive_mb, runs, keys),
    }
    report: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "recipient_fingerprint": keys.identity.recipient.fingerprint,
        "code_at_start": code_state(),
        "figures": {},
    }
    rows: list[dict[str, Any]] = []
    try:
        for name in dict.fromkeys(only):
            t0 = time.perf_counter()
            print(f"{name}:", flush=True)
            try:
                results = benches[name]()
            except Exception as exc:
                print(f"  {name} FAILED: {exc!r}", flush=True)
                report["figures"][name] = {"error": repr(exc)}
                rows.append(
                    {"figure": name, "plain": "FAILED", "encrypted": "-", "cost": "-",
                     "goal": "NOT MET", "runs": ""}
                )  # fmt: skip
                continue
            took = time.perf_counter() - t0
            s = summary(results) if name != "primitives" else {}
            report["figures"][name] = {**results, "summary": s, "seconds": round(took, 1)}
            if s:
                print(f"  {name} ({took:.0f} s): {json.dumps(rounded(s))}", flush=True)
            rows += rows_for(name, results, s)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    report["table"] = rows
    report["code_at_end"] = code_state()
    report["seconds"] = round(time.perf_counter() - started, 1)
    print()
    if report["code_at_end"] != report["code_at_start"]:
        print(f"WARNING: the code changed during the run: {report['code_at_start']} -> "
              f"{report['code_at_end']}")  # fmt: skip
    print(
        f"median of {runs} run(s) each, plain and encrypted interleaved, "
        f"code {report['code_at_start']['commit']}, {report['seconds']:.0f} s in all; "
        "runs: plain / encrypted"
    )
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
