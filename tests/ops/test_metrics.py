"""Metrics and health endpoints: the HTTP server's edge cases, the counters of each component,
and ``rrb --metrics-port`` scraped over HTTP while it backs up a real Redis."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rrb_streams.backup.metrics import BridgeMetrics
from rrb_streams.backup.upload import Uploader
from rrb_streams.cli import options
from rrb_streams.config import UploadConfig
from rrb_streams.errors import ConfigError, DependencyError
from rrb_streams.format.layout import latest_name
from rrb_streams.ops import observe
from rrb_streams.ops.http import MAX_REQUEST, BadRequest, MetricsServer, Readiness, parse_request
from rrb_streams.ops.metrics import Metrics
from rrb_streams.restore.run import Restorer
from rrb_streams.storage.base import Storage
from rrb_streams.storage.memory import MemoryStorage
from rrb_streams.storage.url import StorageSpec
from rrb_streams.wire.entries import entry_fields
from rrb_streams.wire.keys import DEFAULT_GROUP, OwnKeys
from tests.support.faulty import FaultyStorage
from tests.support.proc import BIN, Command
from tests.support.restoring import backup_keys, restore_config
from tests.support.servers import RedisServer, child_env, free_port
from tests.support.wait import until, wait_for

OWN = OwnKeys()

# -- request parsing ---------------------------------------------------------------------------


def test_parse_request_reads_method_and_path_without_query() -> None:
    req = parse_request(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (req.method, req.path) == ("GET", "/metrics")
    assert parse_request(b"HEAD /healthz HTTP/1.0\n\n").method == "HEAD"


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"\r\n\r\n", 400),
        (b"GET\r\n\r\n", 400),
        (b"GET /metrics\r\n\r\n", 400),
        (b"GET metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET /metrics HTTP/2.0\r\n\r\n", 400),
        (b"GET  /metrics HTTP/1.1\r\n\r\n", 400),
        (b"get /metrics HTTP/1.1\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # a TLS hello
        (b"GET /\xff HTTP/1.1\r\n\r\n", 400),
        (b"POST /metrics HTTP/1.1\r\n\r\n", 405),
        (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * MAX_REQUEST + b"\r\n\r\n", 431),
    ],
)
def test_parse_request_refuses_bad_requests(head: bytes, status: int) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_request(head)
    assert caught.value.status == status


# -- the server --------------------------------------------------------------------------------


async def exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, then read the response until the server closes the connection."""
    with anyio.fail_after(10):
        async with await anyio.connect_tcp("127.0.0.1", port) as conn:
            if data:
                await conn.send(data)
            await conn.send_eof()  # as a client that sends nothing more, or gives up
            out = b""
            while True:
                try:
                    out += await conn.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return out


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def body_of(reply: bytes) -> bytes:
    return reply.partition(b"\r\n\r\n")[2]


@pytest.mark.anyio
async def test_server_answers_each_path_and_refuses_bad_requests() -> None:
    metrics = Metrics()
    metrics.part(BridgeMetrics).events.inc(3)
    server = await MetricsServer.bind("127.0.0.1", 0, metrics, Readiness([]))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        port = server.port
        # A silent client holds a connection open: others are still answered meanwhile.
        silent = await anyio.connect_tcp("127.0.0.1", port)
        reply = await exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(reply) == 200
        assert b"Content-Type: text/plain; version=" in reply
        assert b"Connection: close" in reply
        assert b"rrb_bridge_events_total 3.0" in body_of(reply)
        reply = await exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n")
        assert (status_of(reply), body_of(reply)) == (200, b"ok\n")
        reply = await exchange(port, b"GET /readyz HTTP/1.0\r\n\r\n")
        assert (status_of(reply), body_of(reply)) == (200, b"ready\n")
        reply = await exchange(port, b"HEAD /healthz HTTP/1.1\r\n\r\n")
        assert status_of(reply) == 200 and body_of(reply) == b""
        assert b"Content-Length: 3" in reply
        assert status_of(await exchange(port, b"GET /nope HTTP/1.1\r\n\r\n")) == 404
        assert status_of(await exchange(port, b"BAD\r\n\r\n")) == 400
        reply = await exchange(port, b"DELETE /metrics HTTP/1.1\r\n\r\n")
        assert status_of(reply) == 405 and b"Allow: GET, HEAD" in reply
        # Never ends its head: answered and closed once past the limit, not read forever.
        reply = await exchange(port, b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 3000)
        assert status_of(reply) == 431
        # A client that goes away without a request costs nothing.
        assert await exchange(port, b"") == b""
        assert await exchange(port, b"GET /hea") == b""
        assert status_of(await exchange(port, b"GET /healthz HTTP/1.1\n\n")) == 200
        await silent.aclose()
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_readiness_is_cached_and_names_the_first_failure() -> None:
    calls = {"redis": 0, "storage": 0}
    down = {"storage": False}

    async def redis_ok() -> None:
        calls["redis"] += 1

    async def storage() -> None:
        calls["storage"] += 1
        if down["storage"]:
            raise DependencyError("storage folder /x cannot be read:\nPermission denied")

    ready = Readiness([("source Redis", redis_ok), ("storage", storage)], ttl=0.3)
    server = await MetricsServer.bind("127.0.0.1", 0, Metrics(), ready)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        for _ in range(5):
            reply = await exchange(server.port, b"GET /readyz HTTP/1.1\r\n\r\n")
            assert status_of(reply) == 200
        assert calls == {"redis": 1, "storage": 1}  # five probes, one check
        down["storage"] = True
        await anyio.sleep(0.35)
        reply = await exchange(server.port, b"GET /readyz HTTP/1.1\r\n\r\n")
        assert status_of(reply) == 503
        assert body_of(reply) == b"storage folder /x cannot be read: Permission denied\n"
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_hung_readiness_check_answers_503_in_bounded_time() -> None:
    async def hang() -> None:
        await anyio.sleep_forever()

    ready = Readiness([("stream Redis", hang)], timeout=0.2)
    assert await ready.reason() == "stream Redis: no answer within 0.2 s"


@pytest.mark.anyio
async def test_binding_a_port_in_use_is_a_dependency_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(DependencyError, match=f"127.0.0.1:{port} for --metrics-port"):
            await MetricsServer.bind("127.0.0.1", port, Metrics(), Readiness([]))


# -- options -----------------------------------------------------------------------------------


def endpoint(*argv: str) -> observe.Endpoint | None:
    p = argparse.ArgumentParser()
    options.add_metrics(p)
    return options.metrics_endpoint(p.parse_args(argv))


def test_metrics_options_come_from_flags_over_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(observe.PORT_ENV, raising=False)
    monkeypatch.delenv(observe.HOST_ENV, raising=False)
    assert endpoint() is None
    assert endpoint("--metrics-port", "9100") == observe.Endpoint("0.0.0.0", 9100)
    monkeypatch.setenv(observe.PORT_ENV, "9200")
    monkeypatch.setenv(observe.HOST_ENV, "127.0.0.1")
    assert endpoint() == observe.Endpoint("127.0.0.1", 9200)
    assert endpoint("--metrics-port", "9300", "--metrics-host", "::1") == (
        observe.Endpoint("::1", 9300)
    )
    monkeypatch.setenv(observe.PORT_ENV, "")
    assert endpoint() is None


@pytest.mark.parametrize("value", ["0", "65536", "-1", "http", "9100.5", ""])
def test_a_bad_metrics_port_is_bad_input_naming_the_flag(value: str) -> None:
    with pytest.raises(ConfigError, match=f"invalid --metrics-port '{value}'"):
        endpoint("--metrics-port", value)


def test_a_bad_metrics_port_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(observe.PORT_ENV, "99999")
    with pytest.raises(ConfigError, match="invalid RRB_METRICS_PORT '99999'"):
        endpoint()


def test_a_busy_metrics_port_stops_the_command_with_one_line(redis_server: RedisServer) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run(
            [
                str(BIN / "rrb-bridge"),
                redis_server.url(),
                "--metrics-port",
                str(port),
                "--metrics-host",
                "127.0.0.1",
            ],
            env=child_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=20,
            check=False,
        )
    output = (proc.stderr + proc.stdout).decode(errors="replace")
    lines = [line for line in output.splitlines() if line.strip()]
    assert proc.returncode == 1, output
    assert len(lines) == 1, output
    assert lines[0].startswith("rrb-bridge: error: cannot listen on 127.0.0.1:")
    assert f":{port} for --metrics-port" in lines[0]


# -- components --------------------------------------------------------------------------------


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.mark.anyio
async def test_uploader_counts_entries_writes_bytes_retries_and_lag(
    redis_server: RedisServer,
) -> None:
    cfg = UploadConfig(
        source_url=redis_server.url(),
        layout="keys",  # one object per key: puts and objects compare one to one
        consumer="m1",
        linger=0.01,
        max_backoff=0.05,
    ).validate()
    storage = FaultyStorage(MemoryStorage())
    storage.fail_next(1, "put")
    metrics = Metrics()
    uploader = Uploader(cfg, storage, metrics)
    with redis_server.client() as c:
        c.xgroup_create(OWN.stream, DEFAULT_GROUP, id="0", mkstream=True)
        keys = [f"k:{i}" for i in range(20)]
        c.mset({k: "v" * 100 for k in keys})
        now = int(time.time() * 1000)
        for k in [*keys, "k:gone"]:
            c.xadd(OWN.stream, entry_fields(0, k.encode(), "set", now))  # type: ignore[arg-type]
        started = time.time()
        async with anyio.create_task_group() as tg:
            await tg.start(uploader.run)
            await until(lambda: sample(metrics, "rrb_upload_entries_total") >= 21)
            uploader.stop()
    assert sample(metrics, "rrb_upload_entries_total") == 21
    # A round retried after a failed put writes its keys again: every write that landed counts.
    puts, failed = storage.calls["put"], storage.failures["put"]
    assert failed == 1
    assert sample(metrics, "rrb_upload_objects_written_total") == puts - failed >= 20
    assert sample(metrics, "rrb_upload_objects_deleted_total") == storage.calls["delete"] >= 1
    stored = storage.inner.objects  # type: ignore[attr-defined]
    assert len(stored) == 20
    assert sample(metrics, "rrb_upload_bytes_total") >= sum(len(d) for d in stored.values())
    # Every call is timed, the failed ones too.
    assert sample(metrics, "rrb_storage_call_seconds_count", op="put") == puts
    assert sample(metrics, "rrb_retries_total", component="upload") == 1
    assert sample(metrics, "rrb_errors_total", component="upload", kind="StorageUnavailable") == 1
    assert sample(metrics, "rrb_upload_lag_seconds_count") >= 20
    assert 0 < sample(metrics, "rrb_upload_lag_seconds_sum") < 20 * 10
    assert started <= sample(metrics, "rrb_upload_last_write_timestamp_seconds") <= time.time()
    # The recovery point: the source's read time of the newest durable state (same host here).
    newest = sample(metrics, "rrb_backup_newest_read_timestamp_seconds")
    assert started - 1 <= newest <= time.time() + 1
    assert sample(metrics, "rrb_upload_dead_letters_total") == 0


@pytest.mark.anyio
async def test_uploader_counts_rejected_objects_and_dead_letters(
    redis_server: RedisServer,
) -> None:
    cfg = UploadConfig(
        source_url=redis_server.url(),
        layout="keys",
        consumer="m1",
        linger=0.01,
        max_backoff=0.05,
        max_attempts=2,
    ).validate()
    storage = FaultyStorage(MemoryStorage())
    bad = latest_name("", 0, b"poison")
    storage.reject = lambda name: name == bad
    metrics = Metrics()
    uploader = Uploader(cfg, storage, metrics)
    with redis_server.client() as c:
        c.xgroup_create(OWN.stream, DEFAULT_GROUP, id="0", mkstream=True)
        c.set("poison", "x")
        c.xadd(OWN.stream, entry_fields(0, b"poison", "set", 0))  # type: ignore[arg-type]
        async with anyio.create_task_group() as tg:
            await tg.start(uploader.run)
            await until(lambda: sample(metrics, "rrb_upload_dead_letters_total") >= 1)
            uploader.stop()
    assert sample(metrics, "rrb_errors_total", component="upload", kind="ObjectRejected") == 2
    assert sample(metrics, "rrb_upload_entries_total") == 1


@pytest.mark.anyio
async def test_restorer_counts_objects_by_outcome_and_bytes(
    redis_factory: Callable[..., RedisServer], spec: StorageSpec, storage: Storage
) -> None:
    source, target = redis_factory(), redis_factory()
    with source.client() as c:
        c.mset({f"r:{i}": "value" for i in range(10)})
        await backup_keys(c, storage)
    await storage.put(latest_name("", 0, b"damaged"), b"not an rrb object")
    metrics = Metrics()
    restorer = Restorer(restore_config(target.url(), spec), storage, metrics=metrics)
    with anyio.fail_after(30):
        await restorer.run()
    assert sample(metrics, "rrb_restore_objects_total", outcome="restored") == 10
    assert sample(metrics, "rrb_restore_objects_total", outcome="failed") == 1
    assert sample(metrics, "rrb_restore_objects_total", outcome="expired") == 0
    assert sample(metrics, "rrb_restore_bytes_total") > 0
    assert sample(metrics, "rrb_storage_call_seconds_count", op="get_many") >= 1


# -- rrb as a process, scraped over HTTP -------------------------------------------------------


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> dict[str, float]:
    """Every sample, keyed ``name`` or ``name{label="value",...}`` (labels sorted)."""
    status, text = http_get(port, "/metrics")
    assert status == 200, text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def answers(port: int) -> bool:
    try:
        return http_get(port, "/healthz") == (200, "ok\n")
    except OSError:
        return False


def test_rrb_metrics_move_with_writes_and_readiness_follows_the_stream_redis(
    redis_factory: Callable[..., RedisServer], commands: list[Command], tmp_path: Path
) -> None:
    source, stream = redis_factory(), redis_factory()
    port = free_port()
    rrb = Command(
        "rrb",
        source.url(),
        "--stream-url",
        stream.url(),
        "--storage",
        str(tmp_path / "backup"),
        "--linger",
        "0.02",
        log=tmp_path / "rrb.log",
        RRB_METRICS_PORT=str(port),
        RRB_METRICS_HOST="127.0.0.1",
    )
    commands.append(rrb.start())
    wait_for(lambda: answers(port), timeout=20)
    wait_for(lambda: scrape(port).get('rrb_bridge_rescans_total{reason="startup"}') == 1)
    # The first poll may come before the bridge made the group; the next one sees it.
    pending = 'rrb_stream_group_pending{group="rrb-upload"}'
    wait_for(lambda: pending in scrape(port), timeout=15)
    before = scrape(port)
    assert before["rrb_upload_objects_written_total"] == 0
    assert before["rrb_stream_length"] == 0
    assert before[pending] == 0
    assert before['rrb_stream_group_lag{group="rrb-upload"}'] == 0
    assert before['rrb_stream_oldest_pending_age_seconds{group="rrb-upload"}'] == 0
    started = time.time()
    with source.client() as c:
        # Random values: DUMP would compress repeated bytes to almost nothing.
        c.mset({f"key:{i}": os.urandom(1000) for i in range(50)})
    wait_for(lambda: scrape(port)["rrb_upload_objects_written_total"] == 50)
    wait_for(lambda: scrape(port)["rrb_stream_length"] >= 50, timeout=15)
    after = scrape(port)
    assert after["rrb_bridge_events_total"] >= 50
    assert after["rrb_bridge_leader"] == 1  # the only bridge leads
    assert after["rrb_upload_entries_total"] >= 50
    assert after["rrb_upload_bytes_total"] > 50 * 1000
    # The default layout: a few segments hold the 50 records, one PUT each.
    segments = after["rrb_upload_segments_total"]
    assert 1 <= segments <= 10
    assert after['rrb_storage_call_seconds_count{op="put"}'] == segments
    assert after["rrb_upload_segment_records_total"] == 50
    assert after["rrb_upload_records_per_segment_count"] == segments
    assert after["rrb_upload_segment_raw_bytes_total"] > 50 * 1000
    assert 0 < after["rrb_upload_segment_stored_bytes_total"]
    assert after['rrb_storage_call_seconds_count{op="flush"}'] >= 1
    assert after["rrb_upload_lag_seconds_count"] == 50
    assert started <= after["rrb_upload_last_write_timestamp_seconds"] <= time.time()
    assert after["rrb_stream_dead_letters"] == 0
    assert after["rrb_stream_polled_timestamp_seconds"] >= started
    assert after["process_resident_memory_bytes"] > 0
    assert http_get(port, "/readyz") == (200, "ready\n")

    stream.stop()
    wait_for(lambda: http_get(port, "/readyz")[0] == 503, timeout=10)
    status, reason = http_get(port, "/readyz")
    assert status == 503
    assert reason.count("\n") == 1 and f"stream Redis at {stream.url()}" in reason, reason
    assert http_get(port, "/healthz") == (200, "ok\n")
    stream.start()
    wait_for(lambda: http_get(port, "/readyz") == (200, "ready\n"), timeout=10)
    errors = scrape(port)
    assert sum(v for k, v in errors.items() if k.startswith("rrb_retries_total")) > 0
    assert rrb.terminate() == 0, rrb.output()
