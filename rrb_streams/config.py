"""One frozen settings object per command, built from flags over environment variables.

``validate()`` raises ``ConfigError`` naming the field and the bad value. ``repr`` masks every
password and secret key, so a config is always safe to log. The field defaults here are the
only statement of each default: the command-line options take theirs from :func:`default`.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from rrb_streams.errors import ConfigError
from rrb_streams.format.layout import normalize_prefix
from rrb_streams.storage.url import StorageSpec
from rrb_streams.wire.keys import DEFAULT_GROUP, DEFAULT_OWN_PREFIX, OwnKeys, default_consumer
from rrb_streams.wire.tls import NO_TLS, TlsOptions
from rrb_streams.wire.urls import redact_url, url_db, validate_url


def default(settings: type, name: str) -> Any:
    """The default of field ``name`` of the settings class ``settings``."""
    for f in fields(settings):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            raise KeyError(f"{settings.__name__}.{name} has no default")
    raise KeyError(f"{settings.__name__} has no field {name!r}")


def _positive(name: str, value: float) -> None:
    if value <= 0:
        # Every field checked here that a user can set is the flag of the same name.
        flag = "--" + name.replace("_", "-")
        raise ConfigError(f"invalid {flag} {value!r}: must be greater than 0")


class _Masked:
    """A ``repr`` that shows Redis URLs with their passwords replaced by ``***``."""

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, str) and f.name.endswith("_url"):
                value = redact_url(value)
            shown.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"


class _OwnKeys:
    """``own``: rrb's own key names, under the settings' ``own_prefix``, in one slot when they
    live in a Redis Cluster (``stream_cluster``, found at start: see
    :func:`rrb_streams.wire.cluster.probe`)."""

    own_prefix: str
    stream_cluster: bool

    @property
    def own(self) -> OwnKeys:
        return OwnKeys(self.own_prefix, cluster=self.stream_cluster)


class _SourceStream(_OwnKeys):
    """``effective_stream_url``: the change stream's Redis, the source unless ``stream_url``."""

    source_url: str
    stream_url: str | None
    source_cluster: bool

    @property
    def effective_stream_url(self) -> str:
        return self.stream_url or self.source_url


@dataclass(frozen=True, repr=False)
class BridgeConfig(_SourceStream, _Masked):
    """Settings of ``rrb-bridge``: where to listen and where to write the change stream."""

    source_url: str
    stream_url: str | None = None  # None: the stream lives on the source
    pattern: str = "*"
    all_dbs: bool = False
    own_prefix: str = DEFAULT_OWN_PREFIX
    stream_cluster: bool = False  # the own keys' Redis is a cluster: found at start
    source_cluster: bool = False  # the source is a Redis Cluster: found at start
    batch_size: int = 500  # events per pipelined XADD batch
    scan_count: int = 1000  # SCAN COUNT per step of a gap rescan
    scan_pause: float = 0.001  # seconds between rescan steps, so Redis serves others
    watch_interval: float = 1.0  # seconds between run_id checks
    topology_interval: float = 1.0  # seconds between topology reads of a cluster source
    max_backoff: float = 10.0
    # Managed Redis often blocks CONFIG while the parameter group already sets the flags.
    assume_notifications: bool = False  # never read or set notify-keyspace-events
    leader_lease: float = 10.0  # seconds; a standby takes over this long after a crash
    grace: float = 10.0  # seconds to write what was read, after SIGTERM
    tls: TlsOptions = NO_TLS

    def validate(self) -> BridgeConfig:
        validate_url(self.source_url, "source Redis URL")
        if self.stream_url:
            validate_url(self.stream_url, "stream Redis URL")
        self.tls.validate((self.source_url, self.stream_url))
        if not self.pattern:
            raise ConfigError("invalid --redis-pattern '': must not be empty")
        if not self.own_prefix:
            raise ConfigError("invalid --own-prefix '': must not be empty")
        for name in ("batch_size", "scan_count"):
            _positive(name, getattr(self, name))
        for name in ("watch_interval", "topology_interval", "max_backoff", "leader_lease"):
            _positive(name, getattr(self, name))
        if not math.isfinite(self.leader_lease):
            raise ConfigError(f"invalid --leader-lease {self.leader_lease!r}: must be finite")
        return self


#: How uploaders store keys: ``segments`` (many keys' records per object, every read kept) or
#: ``keys`` (one object per key, replaced on each change).
LAYOUTS = ("segments", "keys")


@dataclass(frozen=True, repr=False)
class UploadConfig(_SourceStream, _Masked):
    """Settings of ``rrb-upload``: the consumer group, the object names, and the retry policy.

    The storage itself is passed to the uploader as an object, opened by the caller.
    """

    source_url: str
    stream_url: str | None = None
    path_prefix: str = ""
    concurrency: int = 4  # concurrent storage calls per process
    layout: str = "segments"  # one of LAYOUTS
    segment_interval: float = 1.0  # seconds a segment gathers records before it is written
    segment_bytes: int = 64 << 20  # payload bytes that close a segment sooner
    versioning: bool = False  # keys layout only: every read its own object
    group: str = DEFAULT_GROUP
    consumer: str = field(default_factory=default_consumer)
    own_prefix: str = DEFAULT_OWN_PREFIX
    stream_cluster: bool = False  # the own keys' Redis is a cluster: found at start
    source_cluster: bool = False  # the source is a Redis Cluster: found at start
    batch_size: int = 500  # entries per XREADGROUP
    linger: float = 0.1  # seconds a short batch waits to fill, so hot keys coalesce
    claim_idle: float = 30.0  # seconds before another consumer's pending entry is claimed
    lease: float = 30.0  # seconds a per-key lease lasts; longer than any storage call
    max_attempts: int = 5  # failures of one entry before it goes to the dead letters
    grace: float = 10.0  # seconds to finish in-flight work after SIGTERM
    trim_interval: float = 5.0
    max_backoff: float = 30.0
    tls: TlsOptions = NO_TLS

    def validate(self) -> UploadConfig:
        validate_url(self.source_url, "source Redis URL")
        if self.stream_url:
            validate_url(self.stream_url, "stream Redis URL")
        self.tls.validate((self.source_url, self.stream_url))
        object.__setattr__(self, "path_prefix", normalize_prefix(self.path_prefix))
        if self.concurrency < 1:
            raise ConfigError(f"invalid --concurrency {self.concurrency}: must be at least 1")
        if not self.consumer:
            raise ConfigError("invalid --consumer '': must not be empty")
        if not self.group:
            raise ConfigError("invalid --group '': must not be empty")
        for name in ("batch_size", "max_attempts"):
            _positive(name, getattr(self, name))
        for name in ("claim_idle", "lease", "grace", "trim_interval", "max_backoff"):
            _positive(name, getattr(self, name))
        if self.linger < 0:
            raise ConfigError(f"invalid --linger {self.linger}: must not be negative")
        if self.layout not in LAYOUTS:
            raise ConfigError(
                f"invalid --layout {self.layout!r}: must be one of {', '.join(LAYOUTS)}"
            )
        _positive("segment_interval", self.segment_interval)
        _positive("segment_bytes", self.segment_bytes)
        if self.versioning and self.layout != "keys":
            raise ConfigError(
                "--versioning needs --layout keys: the segment layout keeps every read already"
            )
        return self


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str, flag: str) -> float:
    """``90``, ``90s``, ``15m``, ``24h``, ``7d`` or ``2w`` as seconds; ``ConfigError`` naming
    ``flag`` otherwise (empty, negative, not a number, an unknown unit)."""
    raw = text.strip().lower()
    unit = raw[-1:] if raw[-1:] in _UNITS else "s"
    number = raw[:-1] if raw[-1:] in _UNITS else raw
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ConfigError(
            f"invalid {flag} {text!r}: expected a duration such as 90s, 15m, 24h or 7d"
        )
    return value


@dataclass(frozen=True, repr=False)
class CompactConfig(_OwnKeys, _Masked):
    """Settings of compaction: ``rrb-compact``, and the automatic compaction of ``rrb`` and
    ``rrb-upload``. ``stream_url`` is the Redis that holds the compaction lease."""

    stream_url: str
    path_prefix: str = ""
    own_prefix: str = DEFAULT_OWN_PREFIX
    stream_cluster: bool = False  # the own keys' Redis is a cluster: found at start
    retention: float = 86400.0  # seconds of history every --at moment of which is exact
    level1_every: float = 300.0
    level2_every: float = 3600.0
    snapshot_every: float = 86400.0
    grace: float = 600.0  # seconds a retired object stays readable before it is deleted
    lease: float = 120.0  # seconds the compaction lease lasts unless renewed
    enabled: bool = True  # rrb, rrb-upload: --no-compaction turns it off
    snapshot_now: bool = False  # rrb-compact --snapshot
    as_json: bool = False
    tls: TlsOptions = NO_TLS

    def validate(self) -> CompactConfig:
        validate_url(self.stream_url, "stream Redis URL")
        self.tls.validate((self.stream_url,))
        object.__setattr__(self, "path_prefix", normalize_prefix(self.path_prefix))
        for name in ("retention", "level1_every", "level2_every", "snapshot_every", "lease"):
            _positive(name, getattr(self, name))
        if self.grace < 0:
            raise ConfigError(f"invalid --compaction-grace {self.grace!r}: must not be negative")
        if self.snapshot_every < self.level1_every:
            raise ConfigError(
                f"invalid --snapshot-every {self.snapshot_every:g}: shorter than "
                f"--level1-every ({self.level1_every:g})"
            )
        return self


@dataclass(frozen=True, repr=False)
class StatusConfig(_OwnKeys, _Masked):
    """Settings of ``rrb-status``: the change stream, and with ``storage`` the backup's own
    state read from storage as well."""

    stream_url: str
    own_prefix: str = DEFAULT_OWN_PREFIX
    stream_cluster: bool = False  # the own keys' Redis is a cluster: found at start
    as_json: bool = False
    storage: StorageSpec | None = None  # --storage: also show the backup kept there
    path_prefix: str = ""
    # Compaction is reported overdue after 3 times this (the compaction option's default).
    level1_every: float = CompactConfig.level1_every
    # An encrypted backup read without an identity: merged segments stay this long.
    compaction_grace: float = CompactConfig.grace
    tls: TlsOptions = NO_TLS

    def validate(self) -> StatusConfig:
        validate_url(self.stream_url, "stream Redis URL")
        self.tls.validate((self.stream_url,))
        object.__setattr__(self, "path_prefix", normalize_prefix(self.path_prefix))
        if self.path_prefix and self.storage is None:
            raise ConfigError(f"-P/--path {self.path_prefix!r} needs --storage")
        _positive("level1_every", self.level1_every)
        if self.compaction_grace < 0:
            raise ConfigError(
                f"invalid --compaction-grace {self.compaction_grace!r}: must not be negative"
            )
        return self


IF_EXISTS = ("replace", "skip", "fail")
FORMATS = ("rrb", "legacy")


@dataclass(frozen=True, repr=False)
class RestoreConfig(_OwnKeys, _Masked):
    """Settings of ``rrb-restore``: what to restore from where, into which Redis, and how.

    Everything that changes *what* is restored (storage, prefix, target, filters, ``--at``,
    format) makes up the run's identity; see :func:`rrb_streams.restore.state.run_id`.
    """

    target_url: str
    storage: StorageSpec  # what is restored, so part of the run's identity
    stream_url: str | None = None  # None: the restore stream lives on the target
    path_prefix: str = ""
    concurrency: int = 4  # writers: concurrent object fetches in this process
    at_us: int | None = None  # --at, Unix microseconds on the source clock
    match: str = "*"
    db: int | None = None  # restore only what was backed up from this db, into the URL's db
    if_exists: str = "replace"  # one of IF_EXISTS
    format: str = "rrb"  # one of FORMATS
    dry_run: bool = False
    consumer: str = field(default_factory=default_consumer)
    own_prefix: str = DEFAULT_OWN_PREFIX
    stream_cluster: bool = False  # the own keys' Redis is a cluster: found at start
    batch_size: int = 200  # objects per restore-stream entry: a writer's unit of work
    range_bytes: int = 4 << 20  # segment layout: record bytes per key range (a unit of work)
    retry_timeout: float = 60.0  # seconds of continuous failure before giving up
    max_backlog: int = 100_000  # planned-but-unwritten objects the restore stream may hold
    claim_idle: float = 15.0  # seconds before another writer's unacknowledged entry is taken
    grace: float = 10.0
    max_backoff: float = 5.0
    tls: TlsOptions = NO_TLS

    @property
    def effective_stream_url(self) -> str:
        return self.stream_url or self.target_url

    @property
    def legacy(self) -> bool:
        return self.format == "legacy"

    @property
    def into_db(self) -> int | None:
        """The db every key goes into, or ``None``: each key returns to the db it came from."""
        if self.db is not None or self.legacy:
            return url_db(self.target_url)
        return None

    def validate(self) -> RestoreConfig:
        validate_url(self.target_url, "target Redis URL")
        if self.stream_url:
            validate_url(self.stream_url, "stream Redis URL")
        self.tls.validate((self.target_url, self.stream_url))
        object.__setattr__(self, "path_prefix", normalize_prefix(self.path_prefix))
        if self.concurrency < 1:
            raise ConfigError(f"invalid --concurrency {self.concurrency}: must be at least 1")
        if self.if_exists not in IF_EXISTS:
            raise ConfigError(
                f"invalid --if-exists {self.if_exists!r}: expected one of {', '.join(IF_EXISTS)}"
            )
        if self.format not in FORMATS:
            raise ConfigError(
                f"invalid --format {self.format!r}: expected one of {', '.join(FORMATS)}"
            )
        if not self.match:
            raise ConfigError("invalid --match '': must not be empty")
        if self.db is not None and self.db < 0:
            raise ConfigError(f"invalid --db {self.db}: must be 0 or more")
        if self.legacy and self.db is not None:
            raise ConfigError(
                "invalid --db with --format legacy: legacy objects carry no database number; "
                "choose the destination with the target URL (redis://host:6379/N)"
            )
        if self.db is None and not self.legacy and url_db(self.target_url) != 0:
            raise ConfigError(
                f"the target URL {redact_url(self.target_url)} selects db "
                f"{url_db(self.target_url)}, but without --db every key returns to the db it "
                "was backed up from; add --db N to restore backed-up db N into it"
            )
        if not self.consumer:
            raise ConfigError("invalid --consumer '': must not be empty")
        if not self.own_prefix:
            raise ConfigError("invalid --own-prefix '': must not be empty")
        for name in ("batch_size", "range_bytes", "max_backlog"):
            _positive(name, getattr(self, name))
        for name in ("retry_timeout", "claim_idle", "grace", "max_backoff"):
            _positive(name, getattr(self, name))
        return self


@dataclass(frozen=True, repr=False)
class VerifyConfig(_SourceStream, _Masked):
    """Settings of ``rrb-verify``: which source to compare with storage, and how.

    The storage itself is passed to the verifier as an object, opened by the caller.
    """

    source_url: str
    stream_url: str | None = None  # where --repair queues entries; None: the source
    path_prefix: str = ""
    match: str = "*"
    all_dbs: bool = False
    own_prefix: str = DEFAULT_OWN_PREFIX
    stream_cluster: bool = False  # the own keys' Redis is a cluster: found at start
    source_cluster: bool = False  # the source is a Redis Cluster: found at start
    repair: bool = False
    recheck_delay: float = 2.0  # seconds before a difference is checked again
    chunk_size: int = 256  # objects fetched and compared together
    scan_count: int = 1000  # SCAN COUNT on the source
    max_pending: int = 10_000  # differences waiting for their re-check
    tls: TlsOptions = NO_TLS

    def validate(self) -> VerifyConfig:
        validate_url(self.source_url, "source Redis URL")
        if self.stream_url:
            validate_url(self.stream_url, "stream Redis URL")
        self.tls.validate((self.source_url, self.stream_url))
        object.__setattr__(self, "path_prefix", normalize_prefix(self.path_prefix))
        if not self.match:
            raise ConfigError("invalid --match '': must not be empty")
        if not self.own_prefix:
            raise ConfigError("invalid --own-prefix '': must not be empty")
        if self.recheck_delay < 0:
            raise ConfigError(
                f"invalid --recheck-delay {self.recheck_delay!r}: must not be negative"
            )
        for name in ("chunk_size", "scan_count", "max_pending"):
            _positive(name, getattr(self, name))
        return self
