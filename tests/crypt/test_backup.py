"""Encrypted backups end to end, with real servers (Redis, moto over HTTP, the ``age``
command): round trips on both layouts, no plaintext in storage, rotation, damage and the
errors that must leave the target untouched."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from rrb_streams.crypt import age
from rrb_streams.crypt.keys import AgeKeys, Identity
from rrb_streams.storage.url import StorageSpec, open_storage
from tests.support.age import (
    ALICE,
    BOB,
    identity_file,
    identity_text,
    opens_with_age,
    stored_objects,
    write_object,
)
from tests.support.compacting import Backup, compact, restore_summary, uploaded
from tests.support.dataset import difference, snapshot
from tests.support.pipeline import running_pipeline
from tests.support.proc import Command, one_line, run_command
from tests.support.restoring import populate_every_type
from tests.support.servers import RedisServer
from tests.support.wait import until

pytestmark = pytest.mark.anyio

Factory = Callable[..., RedisServer]
FAST = {"segment_interval": 0.05}
MARK_KEY = b"customer:" + os.urandom(8).hex().encode()
MARK_VALUE = os.urandom(100_000)  # incompressible: plaintext storage would hold it verbatim


def writer_spec(spec: StorageSpec, *recipients: Identity) -> StorageSpec:
    """``spec`` as an uploader holding only public keys sees it."""
    return replace(spec, age=AgeKeys(recipients=tuple(i.recipient for i in recipients)))


async def back_up(
    source: RedisServer, spec: StorageSpec, layout: str, fill: Callable[[redis.Redis], None]
) -> None:
    """Run a bridge and an uploader writing to ``spec`` while ``fill`` changes the source,
    until every change is stored."""
    storage = open_storage(spec)
    try:
        async with running_pipeline(source.url(), storage, upload={"layout": layout, **FAST}):
            with source.client() as c:
                fill(c)
                await uploaded(c)
    finally:
        await storage.close()


def every_type(c: redis.Redis) -> None:
    populate_every_type(c, bulk=300)
    c.set(MARK_KEY, MARK_VALUE)


async def restored(
    backup: Backup, target: RedisServer, key: Path, *options: str
) -> dict[str, object]:
    with target.client() as t:
        t.flushall()
    done = await backup.arun(
        "rrb-restore", target.url(), "--json", "--age-identity", str(key), *options
    )
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    summary = restore_summary(done)
    assert summary["run_totals"]["failed"] == 0, summary  # type: ignore[index]
    return summary


def exact(source: RedisServer, target: RedisServer) -> None:
    with source.client() as c, target.client() as t:
        found = difference(snapshot(c), snapshot(t))
    assert not found, found


@pytest.mark.parametrize("spec", ["fs", "s3"], indirect=True)
@pytest.mark.parametrize("layout", ["segments", "keys"])
async def test_a_round_trip_is_exact_and_storage_holds_no_plaintext(
    redis_factory: Factory, spec: StorageSpec, layout: str, tmp_path: Path
) -> None:
    source, target = redis_factory(), redis_factory()
    key = identity_file(tmp_path / "key.txt", ALICE)
    await back_up(source, writer_spec(spec, ALICE), layout, every_type)
    backup = Backup(spec)
    if layout == "segments":  # manifests and snapshots too
        await compact(
            backup,
            source.url(),
            "--snapshot",
            "--age-identity",
            str(key),
            "--age-recipient",
            str(ALICE.recipient),
        )
    stored = stored_objects(spec)
    kinds = {name.split("/")[0] for name in stored}
    assert kinds == ({"segments", "manifest"} if layout == "segments" else {"db0"}), kinds
    plaintext = b""
    for name, data in stored.items():
        assert age.is_encrypted(data), name
        assert MARK_KEY not in data and MARK_VALUE[:64] not in data, name
        assert age.parse_header(data, name).fingerprints == (ALICE.recipient.fingerprint,)
        plaintext += opens_with_age(data, key, tmp_path)
    # The control: what age decrypts does hold the value the ciphertext hides.
    assert MARK_VALUE[:64] in plaintext
    await restored(backup, target, key)
    exact(source, target)
    done = await backup.arun("rrb-verify", source.url(), "--json", "--age-identity", str(key))
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    assert json.loads(done.stdout)["checked"] > 300


async def test_without_the_right_identity_nothing_is_written_to_the_target(
    redis_factory: Factory, spec: StorageSpec, tmp_path: Path
) -> None:
    source, target = redis_factory(), redis_factory()
    await back_up(source, writer_spec(spec, ALICE), "segments", every_type)
    backup = Backup(spec)
    wrong = identity_file(tmp_path / "bob.txt", BOB)
    garbage = tmp_path / "garbage.txt"
    garbage.write_text(identity_text(ALICE)[:-3] + "\n")
    cases = [
        ((), "give --age-identity FILE"),
        (("--age-identity", str(wrong)), "no identity given opens segments/"),
        (("--age-identity", str(tmp_path / "missing.txt")), "cannot read it: No such file"),
        (("--age-identity", str(garbage)), "line 1: not an age identity"),
    ]
    for options, needle in cases:
        done = await backup.arun("rrb-restore", target.url(), *options)
        assert done.returncode == 2, (options, done.stderr[-2000:])
        line = one_line(done.stderr, logs=True)
        assert needle in line, (options, line)
        assert identity_text(ALICE)[:-3] not in done.stderr + done.stdout
        assert identity_text(BOB) not in done.stderr + done.stdout
        with target.client() as t:
            assert t.dbsize() == 0, (options, t.keys())
    done = await backup.arun("rrb-verify", source.url(), "--json")
    assert done.returncode == 2 and "give --age-identity" in one_line(done.stderr, logs=True)
    # The environment names the identity file as the option does.
    key = identity_file(tmp_path / "key.txt", ALICE)
    env = {**backup.env, "RRB_AGE_IDENTITY_FILE": str(key)}
    done = run_command("rrb-restore", target.url(), "--storage", backup.url, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    exact(source, target)


@pytest.mark.parametrize("layout", ["segments", "keys"])
async def test_a_tampered_object_is_damaged_its_keys_fail_and_the_rest_restore(
    redis_factory: Factory, spec: StorageSpec, layout: str, tmp_path: Path
) -> None:
    source, target = redis_factory(), redis_factory()
    key = identity_file(tmp_path / "key.txt", ALICE)
    names = [b"a:%03d" % i for i in range(200)]

    def first(c: redis.Redis) -> None:
        c.mset({k: b"v1" for k in names})

    def second(c: redis.Redis) -> None:
        # Incompressible values: a segment of several 64 KiB chunks, its index in the last.
        c.mset({k: os.urandom(1000) for k in names})

    def third(c: redis.Redis) -> None:
        c.mset({b"b:%03d" % i: b"w" for i in range(200)})

    await back_up(source, writer_spec(spec, ALICE), layout, first)
    before = stored_objects(spec)
    await back_up(source, writer_spec(spec, ALICE), layout, second)
    after = stored_objects(spec)
    await back_up(source, writer_spec(spec, ALICE), layout, third)
    # Damage one object of the second round: a byte in the middle of its payload.
    candidates = sorted(set(after) - set(before)) if layout == "segments" else sorted(after)
    victim = candidates[len(candidates) // 2]
    data = bytearray(after[victim])
    header = age.parse_header(bytes(data), victim)
    data[header.length + age.NONCE + (len(data) - header.length) // 2] ^= 0x10
    write_object(spec, victim, bytes(data))

    backup = Backup(spec)
    with target.client() as t:
        t.flushall()
    done = await backup.arun("rrb-restore", target.url(), "--json", "--age-identity", str(key))
    assert done.returncode == 3, (done.stdout[-2000:], done.stderr[-2000:])
    summary = restore_summary(done)
    failures = summary["failures"]
    damaged = [f for f in failures if f["object"].startswith(victim)]
    assert damaged and "fails authentication" in damaged[0]["reason"], failures
    with source.client() as c, target.client() as t:
        # Our own keys, and the markers uploaded() writes to see the pipeline drain: not data.
        keys = [k for k in c.keys("*") if not k.startswith((b"rrb:", b"marker:"))]
        differ = {k for k in keys if t.dump(k) != c.dump(k)}
        assert differ and all(k.startswith(b"a:") for k in differ), sorted(
            k for k in differ if not k.startswith(b"a:")
        )
        named = {f["object"][4:] for f in failures if f["object"].startswith("db0:")}
        named = {k for k in named if not k.startswith("marker:")}
        if layout == "segments":  # each key the damaged block leaves undecided is named
            assert {k.decode() for k in differ} == named
        # The damaged block and each key it leaves undecided (a marker key too, maybe); in
        # the keys layout the object is the key.
        expected = len(differ) + (len(damaged) if layout == "segments" else 0)
        assert expected <= summary["run_totals"]["failed"] <= expected + 3
        assert len(keys) == 400


async def test_rotation_from_one_recipient_to_another(
    redis_factory: Factory, spec: StorageSpec, tmp_path: Path
) -> None:
    source, target = redis_factory(), redis_factory()
    both = identity_file(tmp_path / "both.txt", ALICE, BOB)
    only_bob = identity_file(tmp_path / "bob.txt", BOB)
    await back_up(source, writer_spec(spec, ALICE), "segments", every_type)

    def more(c: redis.Redis) -> None:
        c.mset({b"after:%03d" % i: b"rotated" for i in range(100)})
        c.delete(b"s:plain")

    # The writers restart with the new recipient; the old identity stays for reading.
    await back_up(source, writer_spec(spec, BOB), "segments", more)
    fingerprints = {age.parse_header(d, n).fingerprints for n, d in stored_objects(spec).items()}
    assert fingerprints == {(ALICE.recipient.fingerprint,), (BOB.recipient.fingerprint,)}
    backup = Backup(spec)
    done = await backup.arun("rrb-restore", target.url(), "--age-identity", str(only_bob))
    assert done.returncode == 2 and "no identity given opens" in done.stderr
    # A full pass re-encrypts what it rewrites to the new recipient; the next deletes what
    # it retired. Then the old key can go.
    rotate = ("--snapshot", "--age-identity", str(both), "--age-recipient", str(BOB.recipient))
    await compact(backup, source.url(), *rotate)
    await compact(
        backup, source.url(), "--age-identity", str(both), "--age-recipient", str(BOB.recipient)
    )
    stored = stored_objects(spec)
    assert {age.parse_header(d, n).fingerprints for n, d in stored.items()} == {
        (BOB.recipient.fingerprint,)
    }
    status = await backup.arun("rrb-status", source.url(), "--json")
    assert status.returncode == 0, status.stderr
    assert BOB.recipient.fingerprint in status.stdout
    assert ALICE.recipient.fingerprint not in status.stdout
    await restored(backup, target, only_bob)
    exact(source, target)


async def test_compaction_needs_recipients_when_it_can_decrypt(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    key = identity_file(tmp_path / "key.txt", ALICE)
    for command in ("rrb-compact", "rrb-upload", "rrb"):
        done = Backup(replace(StorageSpec(kind="fs", path=tmp_path))).run(
            command, redis_server.url(), "--age-identity", str(key)
        )
        assert done.returncode == 2, (command, done.stderr)
        assert "--age-identity without --age-recipient" in one_line(done.stderr), command


async def test_status_without_an_identity_shows_recipients_and_when_compaction_is_overdue(
    redis_factory: Factory, spec: StorageSpec, tmp_path: Path
) -> None:
    source = redis_factory()
    await back_up(source, writer_spec(spec, ALICE, BOB), "segments", every_type)
    backup = Backup(spec)
    quick = ("--level1-every", "0.01", "--compaction-grace", "0")
    done = await backup.arun("rrb-status", source.url(), "--json", *quick)
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stdout)["backup"]
    fingerprints = f"{ALICE.recipient.fingerprint}, {BOB.recipient.fingerprint}"
    assert list(state["encryption"]) == [f"age X25519 to {fingerprints}"]
    assert "give --age-identity" in state["locked"]
    assert state["compaction_overdue"] is True  # nothing ever compacted it
    text = (await backup.arun("rrb-status", source.url(), *quick)).stdout
    assert f"age X25519 to {fingerprints}" in text and "COMPACTION OVERDUE" in text
    # Compacted where the identity lives: read whole, and on schedule.
    key = identity_file(tmp_path / "key.txt", BOB)
    await compact(
        backup, source.url(), "--age-identity", str(key), "--age-recipient", str(BOB.recipient)
    )
    done = await backup.arun("rrb-status", source.url(), "--json", "--age-identity", str(key))
    state = json.loads(done.stdout)["backup"]
    assert state["locked"] is None and state["manifest"] >= 1
    assert state["compaction_overdue"] is False and state["recovery_point_us"]
    assert identity_text(BOB) not in done.stdout + done.stderr


async def test_uploaders_holding_only_public_keys_leave_compaction_to_rrb_compact(
    redis_server: RedisServer, tmp_path: Path, commands: list[Command]
) -> None:
    key = identity_file(tmp_path / "key.txt", ALICE)
    public = ("--age-recipient", str(ALICE.recipient))
    for name, extra, off in (("public", (), True), ("both", ("--age-identity", str(key)), False)):
        log = tmp_path / f"{name}.log"
        uploader = Command(
            "rrb-upload",
            redis_server.url(),
            "--storage",
            str(tmp_path / "bk"),
            *public,
            *extra,
            log=log,
        )
        commands.append(uploader.start())
        await until(lambda u=uploader: "upload.started" in u.output(), within=30)
        assert uploader.terminate() == 0
        assert ("compaction.off" in uploader.output()) is off, uploader.output()[-2000:]
