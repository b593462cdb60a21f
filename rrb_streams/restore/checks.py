"""What a restore checks before it plans anything: the target, and the backup it reads.

A restore that cannot succeed stops at once with one clear line: a target that refuses
writes, a location that holds no backup of the format asked for, or ``--at`` on a backup that
kept no versions. Whether the target (and the Redis of the run's own keys) is a Redis Cluster
is found here too (:func:`find_clusters`): a cluster node's URL means the whole cluster, with
no flag.
"""

from __future__ import annotations

import contextlib
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from rrb_streams.config import RestoreConfig
from rrb_streams.errors import ConfigError, CorruptObject, DependencyError
from rrb_streams.format.layout import parse_name
from rrb_streams.format.manifest import read_latest
from rrb_streams.format.segment import parse_segment_name
from rrb_streams.format.selection import find_backup, has_versions
from rrb_streams.format.view import BeforeRetention
from rrb_streams.restore.writer import error_text, rdb_version
from rrb_streams.storage.base import Storage
from rrb_streams.storage.encrypted import require_opens
from rrb_streams.wire.cluster import is_cluster
from rrb_streams.wire.connections import connect, ping
from rrb_streams.wire.keys import OwnKeys
from rrb_streams.wire.urls import redact_url, url_db


async def find_clusters(cfg: RestoreConfig) -> tuple[bool, bool]:
    """Whether the target, and the Redis that keeps the run's own keys (``--stream-url``, else
    the target), are Redis Cluster nodes.

    Raises ``DependencyError`` when either cannot be reached, ``ConfigError`` when a cluster
    node's URL names a db other than 0: a cluster has no other.
    """
    target = await _is_cluster(cfg, cfg.target_url, "target Redis")
    if not cfg.stream_url:
        return target, target
    return target, await _is_cluster(cfg, cfg.stream_url, "stream Redis")


async def _is_cluster(cfg: RestoreConfig, url: str, what: str) -> bool:
    # Asked on db 0: a cluster node refuses SELECT of any other, which would hide what it is.
    r = connect(url, db=0, name="rrb-restore", tls=cfg.tls)
    try:
        await ping(r, url, what)
        found = await is_cluster(r)
    finally:
        await r.aclose()
    if found and url_db(url) != 0:
        raise ConfigError(
            f"the {what} at {redact_url(url)} is a Redis Cluster node, and a cluster has only "
            "db 0: drop the db from the URL"
        )
    return found


def probe_key(cfg: RestoreConfig, *, cluster: bool) -> str:
    """The key :func:`probe_target` writes: one of rrb's own, in their slot in a cluster."""
    return OwnKeys(cfg.own_prefix, cluster=cluster).name(f"restore:probe:{cfg.consumer}")


async def probe_target(
    target: Redis, cfg: RestoreConfig, *, cluster: bool = False
) -> tuple[int, float]:
    """The RDB version the target reads and its clock offset to ours, in ms.

    Dumps and restores a probe key under rrb's own prefix (:func:`probe_key`), so a target
    that is a read-only replica, or an ACL user without ``RESTORE``, is refused before
    anything is planned. In a cluster (``cluster``), ``target`` is a client of the master
    owning the probe key's slot, and that master answers for the cluster.
    """
    key = probe_key(cfg, cluster=cluster)
    try:
        before = time.time()
        seconds, micros = await target.time()
        after = time.time()
        offset_ms = (seconds + micros / 1e6 - (before + after) / 2) * 1000
        await target.set(key, b"rrb", px=60_000)
        payload = await target.dump(key)
        if payload is None:
            raise ResponseError("DUMP returned nothing for the probe key")
        await target.restore(key, 60_000, payload, replace=True)
        await target.delete(key)
    except ResponseError as exc:
        with contextlib.suppress(RedisError, OSError):
            await target.delete(key)  # a refused RESTORE leaves the SET's key
        raise DependencyError(
            f"the target Redis at {redact_url(cfg.target_url)} refused a probe write "
            f"(SET, DUMP, RESTORE, DEL of {key!r}): {error_text(exc)}"
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


async def require_readable(cfg: RestoreConfig, storage: Storage) -> None:
    """Raise ``NotDecryptable`` when the first backup object under the prefix is encrypted
    and no identity given opens it: checked before anything is written to the target, so a
    missing or wrong ``--age-identity`` leaves it untouched."""
    if cfg.legacy:
        return  # the original tool's objects: never encrypted
    async for info in storage.list(cfg.path_prefix):
        if parse_segment_name(info.name, cfg.path_prefix) or parse_name(info.name, cfg.path_prefix):
            # Through AgeStorage: decrypted when an identity opens it, refused when none
            # does, and passed through as it is when none was given.
            try:
                await require_opens(storage, info.name)
            except CorruptObject:
                pass  # damaged, not locked: the run names it and restores the rest
            return


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
