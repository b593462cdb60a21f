"""What a restore checks before it plans anything: the target, and the backup it reads.

A restore that cannot succeed stops at once with one clear line: a target that refuses
writes, a location that holds no backup of the format asked for, or ``--at`` on a backup that
kept no versions.
"""

from __future__ import annotations

import contextlib
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from rrb_streams.config import RestoreConfig
from rrb_streams.errors import ConfigError, DependencyError
from rrb_streams.format.manifest import read_latest
from rrb_streams.format.selection import find_backup, has_versions
from rrb_streams.format.view import BeforeRetention
from rrb_streams.restore.writer import error_text, rdb_version
from rrb_streams.storage.base import Storage
from rrb_streams.wire.urls import redact_url


async def probe_target(target: Redis, cfg: RestoreConfig) -> tuple[int, float]:
    """The RDB version the target reads and its clock offset to ours, in ms.

    Dumps and restores a probe key under rrb's own prefix, so a target that is a read-only
    replica, or an ACL user without ``RESTORE``, is refused before anything is planned.
    """
    probe = f"{cfg.own_prefix}restore:probe:{cfg.consumer}"
    try:
        before = time.time()
        seconds, micros = await target.time()
        after = time.time()
        offset_ms = (seconds + micros / 1e6 - (before + after) / 2) * 1000
        await target.set(probe, b"rrb", px=60_000)
        payload = await target.dump(probe)
        if payload is None:
            raise ResponseError("DUMP returned nothing for the probe key")
        await target.restore(probe, 60_000, payload, replace=True)
        await target.delete(probe)
    except ResponseError as exc:
        with contextlib.suppress(RedisError, OSError):
            await target.delete(probe)  # a refused RESTORE leaves the SET's key
        raise DependencyError(
            f"the target Redis at {redact_url(cfg.target_url)} refused a probe write "
            f"(SET, DUMP, RESTORE, DEL of {probe!r}): {error_text(exc)}"
        ) from exc
    except (RedisError, OSError) as exc:
        raise DependencyError(
            f"cannot reach the target Redis at {redact_url(cfg.target_url)}: {exc}"
        ) from exc
    return rdb_version(payload), offset_ms


async def require_backup(cfg: RestoreConfig, storage: Storage) -> None:
    """Raise ``DependencyError`` when storage holds no backup object under the prefix: a
    mistyped ``--storage``, ``-P`` or ``--format`` must not look like a restore of nothing."""
    found, other = await find_backup(
        storage.list(cfg.path_prefix), cfg.path_prefix, legacy=cfg.legacy
    )
    if found:
        return
    where = f"{storage.description}/{cfg.path_prefix}".rstrip("/")
    if other and cfg.legacy:
        raise DependencyError(
            f"{where} holds rrb objects, none of the original tool: drop --format legacy"
        )
    if other:
        raise DependencyError(
            f"{where} holds objects of the original tool, no rrb objects: add --format legacy"
        )
    kind = "legacy-format" if cfg.legacy else "rrb"
    raise DependencyError(
        f"{where} holds no {kind} backup objects: nothing to restore "
        "(check --storage, -P and --format)"
    )


async def require_versions(cfg: RestoreConfig, storage: Storage) -> None:
    """Raise ``ConfigError`` when ``--at`` is asked of a backup that holds no versions, or
    (``BeforeRetention``) of a moment older than what retention kept."""
    if cfg.at_us is None:
        return
    if not cfg.legacy:
        m = await read_latest(storage, cfg.path_prefix)
        if m.floor_us is not None and cfg.at_us < m.floor_us:
            raise BeforeRetention(cfg.at_us, m.floor_us)
    if not await has_versions(storage.list(cfg.path_prefix), cfg.path_prefix, legacy=cfg.legacy):
        where = f"{storage.description}/{cfg.path_prefix}".rstrip("/")
        if cfg.legacy:
            raise ConfigError(
                f"--at needs a backup made with --versioning, and {where} holds no versions: "
                "without versions only the latest state can be restored (drop --at)"
            )
        raise ConfigError(
            f"--at needs segments or a keys-layout backup made with --versioning, and {where} "
            "holds neither: only the latest state can be restored (drop --at)"
        )
