"""age keys for tests: fixed pairs made once per run, and identity files for the CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from rrb_streams.crypt.keys import AgeKeys, Identity, bech32_encode
from rrb_streams.storage.url import StorageSpec
from tests.support.moto import boto_client


def new_identity() -> Identity:
    return Identity(X25519PrivateKey.generate().private_bytes_raw())


def identity_text(identity: Identity) -> str:
    """The ``AGE-SECRET-KEY-1…`` line ``age-keygen`` would print for it."""
    return bech32_encode("age-secret-key-", identity.secret).upper()


def identity_file(path: Path, *identities: Identity) -> Path:
    """An age identity file holding ``identities``, with the comments age-keygen writes."""
    lines = []
    for identity in identities:
        lines += [f"# public key: {identity.recipient}", identity_text(identity)]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


ALICE = new_identity()
BOB = new_identity()
AGE_KEYS = AgeKeys(recipients=(ALICE.recipient,), identities=(ALICE,))


def stored_objects(spec: StorageSpec) -> dict[str, bytes]:
    """Every object a backup location holds, read straight from the folder or the bucket
    (under our storage layer, so as an attacker with read access sees them)."""
    if spec.kind == "fs":
        assert spec.path is not None
        return {
            str(p.relative_to(spec.path)): p.read_bytes()
            for p in sorted(spec.path.rglob("*"))
            if p.is_file() and not p.name.startswith(".")
        }
    assert spec.endpoint_url is not None
    client = boto_client(spec.endpoint_url)
    out: dict[str, bytes] = {}
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=spec.bucket, Prefix=spec.base
    ):
        for item in page.get("Contents", []):
            body = client.get_object(Bucket=spec.bucket, Key=item["Key"])["Body"]
            out[item["Key"][len(spec.base) :]] = body.read()
    return out


def write_object(spec: StorageSpec, name: str, data: bytes) -> None:
    """Replace one stored object's bytes behind our storage layer's back (damage)."""
    if spec.kind == "fs":
        assert spec.path is not None
        (spec.path / name).write_bytes(data)
        return
    assert spec.endpoint_url is not None
    boto_client(spec.endpoint_url).put_object(Bucket=spec.bucket, Key=spec.base + name, Body=data)


def age_command() -> str:
    """The ``age`` command; in CI it must be there (scripts/test installs Debian's)."""
    found = shutil.which("age")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("the age command is missing: scripts/test installs Debian's age")
        pytest.skip("the age command is not installed")
    return found


def opens_with_age(data: bytes, key: Path, work: Path) -> bytes:
    """What ``age -d -i key`` makes of ``data`` (written to a file in ``work``); it must
    succeed."""
    (work / "object").write_bytes(data)
    done = subprocess.run(
        [age_command(), "-d", "-i", str(key), str(work / "object")],
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout
