"""Redis URLs: checked, read and shown safely. Pure functions: nothing here connects."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from rrb_streams.errors import ConfigError

_SCHEMES = ("redis", "rediss", "unix")


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def validate_url(url: str, what: str = "Redis URL") -> str:
    """Return ``url`` when it is a usable Redis URL, else raise ``ConfigError`` naming it."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(f"invalid {what} {redact_url(url)!r}: {exc}") from exc
    if parts.scheme not in _SCHEMES:
        raise ConfigError(
            f"invalid {what} {redact_url(url)!r}: expected redis://, rediss:// or unix://"
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"invalid {what} {redact_url(url)!r}: no host")
    db_text = parts.path.lstrip("/")
    if parts.scheme != "unix" and db_text and not db_text.isdigit():
        raise ConfigError(f"invalid {what} {redact_url(url)!r}: database must be a number")
    return url


def url_db(url: str) -> int:
    """The database number a URL selects (0 when it names none)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        for item in parts.query.split("&"):
            if item.startswith("db="):
                return int(item[3:])
        return 0
    text = parts.path.lstrip("/")
    return int(text) if text else 0
