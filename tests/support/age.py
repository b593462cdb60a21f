"""age keys for tests: fixed pairs made once per run, and identity files for the CLI."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from rrb_streams.crypt.keys import AgeKeys, Identity, bech32_encode


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
