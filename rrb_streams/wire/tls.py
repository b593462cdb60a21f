"""TLS settings for ``rediss://`` connections: a CA to trust, and a client certificate.

The server's certificate is always verified, hostname included; a private CA is trusted with
``--tls-ca``. There is deliberately no switch to skip verification: the connection carries
the Redis password, and a CA file is all a self-signed server needs.

The options apply only to ``rediss://`` URLs. Giving them while no URL of the command uses
``rediss://`` is a ``ConfigError``: the user asked for TLS and would not get it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rrb_streams.errors import ConfigError

# option name -> (flag, environment variable)
_SOURCES = {
    "ca": ("--tls-ca", "REDIS_TLS_CA"),
    "cert": ("--tls-cert", "REDIS_TLS_CERT"),
    "key": ("--tls-key", "REDIS_TLS_KEY"),
}


def uses_tls(url: str) -> bool:
    """Whether ``url`` asks for TLS (``rediss://``)."""
    return urlsplit(url).scheme == "rediss"


@dataclass(frozen=True)
class TlsOptions:
    """Files for TLS: ``ca`` (PEM CA bundle to trust instead of the system's), ``cert`` (client
    certificate, PEM; may hold the key too) and ``key`` (its private key). All optional."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    @classmethod
    def from_sources(
        cls,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> TlsOptions:
        """Flags over environment variables (``REDIS_TLS_CA``, ``REDIS_TLS_CERT``,
        ``REDIS_TLS_KEY``); an empty value counts as unset."""
        env = os.environ if env is None else env
        given = {"ca": ca, "cert": cert, "key": key}
        chosen = {
            name: given[name] or env.get(variable) or None
            for name, (_flag, variable) in _SOURCES.items()
        }
        return cls(**chosen)

    @property
    def given(self) -> bool:
        """Whether any option is set."""
        return any((self.ca, self.cert, self.key))

    def validate(self, urls: Iterable[str | None]) -> TlsOptions:
        """Check the files exist and fit together, and that some URL of ``urls`` uses TLS.

        Raises ``ConfigError`` naming the flag (and its environment variable) and the path.
        """
        if not self.given:
            return self
        for name, (flag, variable) in _SOURCES.items():
            path = getattr(self, name)
            if path is None:
                continue
            if not Path(path).is_file():
                raise ConfigError(f"invalid {flag} (or {variable}) {path!r}: no such file")
            if not os.access(path, os.R_OK):
                raise ConfigError(f"invalid {flag} (or {variable}) {path!r}: not readable")
        if self.key and not self.cert:
            raise ConfigError(
                "invalid --tls-key (or REDIS_TLS_KEY) without --tls-cert: "
                "a key needs its client certificate"
            )
        if not any(url and uses_tls(url) for url in urls):
            raise ConfigError(
                "--tls-ca, --tls-cert and --tls-key (or REDIS_TLS_*) apply to rediss:// URLs "
                "only, and no Redis URL here uses rediss://; use rediss:// to connect with TLS"
            )
        return self

    def connection_kwargs(self, url: str) -> dict[str, Any]:
        """Keyword arguments for ``Redis.from_url(url, ...)``: none unless ``url`` is
        ``rediss://``, so a plain URL never receives SSL arguments."""
        if not uses_tls(url):
            return {}
        out: dict[str, Any] = {}
        if self.ca:
            out["ssl_ca_certs"] = self.ca
        if self.cert:
            out["ssl_certfile"] = self.cert
        if self.key:
            out["ssl_keyfile"] = self.key
        return out


NO_TLS = TlsOptions()
