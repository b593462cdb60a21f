"""TLS: every command talks to a ``redis-server --tls-port`` that requires client certificates.

The certificates (a CA, a server certificate for 127.0.0.1, a client certificate, and a second
CA nobody uses) are made here with the ``openssl`` command. Each server keeps a plain port on
127.0.0.1 for the tests' own readiness checks and comparisons; rrb is only given the TLS one.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
import redis

from rrb_streams.cli.backup import bridge, rrb, upload
from rrb_streams.cli.restore import restore
from rrb_streams.cli.status import status
from rrb_streams.format.layout import latest_name
from rrb_streams.storage.fs import FsStorage
from rrb_streams.wire.tls import TlsOptions
from tests.support.dataset import snapshot
from tests.support.pipeline import drained, running_pipeline, wait_drained
from tests.support.proc import BIN, one_line, run_command
from tests.support.restoring import own_keys, populate_every_type
from tests.support.servers import RedisServer, child_env, free_port
from tests.support.wait import wait_for


@dataclass(frozen=True)
class Pki:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str

    @property
    def client(self) -> TlsOptions:
        return TlsOptions(ca=self.ca, cert=self.client_cert, key=self.client_key)

    def flags(self) -> list[str]:
        return ["--tls-ca", self.ca, "--tls-cert", self.client_cert, "--tls-key", self.client_key]


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.crt"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
    )  # fmt: skip
    return key, cert


def _issue(folder: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.crt"
    ext = folder / f"{name}.ext"
    ext.write_text(extensions + "\n")
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext),
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = _ca(folder, "rrb-test-ca")
    _other_key, other = _ca(folder, "some-other-ca")
    server = _issue(
        folder,
        "server",
        ca,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth",
    )
    client = _issue(folder, "client", ca, "extendedKeyUsage=clientAuth")
    return Pki(
        ca=str(ca[1]),
        server_cert=str(server[0]),
        server_key=str(server[1]),
        client_cert=str(client[0]),
        client_key=str(client[1]),
        other_ca=str(other),
    )


class TlsRedisServer(RedisServer):
    """A ``redis-server`` with a TLS port that requires a client certificate signed by the CA."""

    def __init__(self, workdir: Path, pki: Pki, *args: str) -> None:
        self.tls_port = free_port()
        super().__init__(
            workdir,
            "--tls-port", str(self.tls_port),
            "--tls-cert-file", pki.server_cert,
            "--tls-key-file", pki.server_key,
            "--tls-ca-cert-file", pki.ca,
            "--tls-auth-clients", "yes",
            *args,
        )  # fmt: skip

    def tls_url(self, db: int = 0) -> str:
        return f"rediss://127.0.0.1:{self.tls_port}/{db}"


TlsFactory = Callable[..., TlsRedisServer]


@pytest.fixture
def tls_redis(tmp_path: Path, pki: Pki) -> Iterator[TlsFactory]:
    servers: list[TlsRedisServer] = []

    def start(*args: str) -> TlsRedisServer:
        server = TlsRedisServer(tmp_path / f"tls-redis{len(servers)}", pki, *args).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


def _tls_client(server: TlsRedisServer, pki: Pki) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1",
        port=server.tls_port,
        ssl=True,
        ssl_ca_certs=pki.ca,
        ssl_certfile=pki.client_cert,
        ssl_keyfile=pki.client_key,
    )


def test_redis_server_speaks_tls_and_requires_a_client_certificate(
    tls_redis: TlsFactory, pki: Pki
) -> None:
    server = tls_redis()
    with _tls_client(server, pki) as c:
        assert c.ping()
    anonymous = redis.Redis(host="127.0.0.1", port=server.tls_port, ssl=True, ssl_ca_certs=pki.ca)
    with anonymous, pytest.raises(redis.exceptions.ConnectionError):
        anonymous.ping()


@pytest.mark.anyio
async def test_backup_then_rrb_restore_over_tls_with_client_certificates(
    tls_redis: TlsFactory, pki: Pki, tmp_path: Path
) -> None:
    source, target = tls_redis(), tls_redis()
    folder = tmp_path / "backup"
    storage = FsStorage(folder)
    tls = {"tls": pki.client}
    try:
        async with running_pipeline(source.tls_url(), storage, bridge=tls, upload=tls):
            with _tls_client(source, pki) as c:
                populate_every_type(c, bulk=20)
            await wait_drained(source.url())
    finally:
        await storage.close()
    with source.client() as c:
        expected = snapshot(c)
    assert len(expected) > 20

    done = await anyio.to_thread.run_sync(
        lambda: run_command("rrb-restore", target.tls_url(), "--storage", str(folder), *pki.flags())
    )
    assert done.returncode == 0, done.stderr
    with target.client() as t:
        assert snapshot(t) == expected
        assert own_keys(t) == {}


def test_rrb_over_tls_from_the_environment_and_rrb_status(
    tls_redis: TlsFactory, pki: Pki, tmp_path: Path
) -> None:
    source = tls_redis()
    folder = tmp_path / "backup"
    env = {
        "REDIS_TLS_CA": pki.ca,
        "REDIS_TLS_CERT": pki.client_cert,
        "REDIS_TLS_KEY": pki.client_key,
    }
    proc = subprocess.Popen(
        [str(BIN / "rrb"), source.tls_url(), "--storage", str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(**env),
    )
    try:
        with source.client() as c:
            wait_for(lambda: c.exists("rrb:changes") == 1, timeout=20)
            c.set("tls:a", "1")
            c.hset("tls:h", mapping={"f": "v"})
            wait_for(lambda: len(list(folder.rglob("*"))) >= 2 and drained(c), timeout=20)
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert '"rrb.started"' in err

    shown = run_command("rrb-status", source.tls_url(), "--json", *pki.flags())
    assert shown.returncode == 0, shown.stderr
    assert '"rrb:changes"' in shown.stdout or "rrb:changes" in shown.stdout


def _backup_folder(folder: Path) -> None:
    """A folder with one backup object's name in it: rrb-restore refuses a folder without one
    before it connects anywhere, and these tests are about the connection."""
    name = folder / latest_name("", 0, b"k")
    name.parent.mkdir(parents=True)
    name.write_bytes(b"not read: the connection fails first")


#: Every command, with the options that take it as far as its first connection.
EVERY_COMMAND = [
    ("rrb-status", []),
    ("rrb-restore", ["--storage", "{folder}"]),
    ("rrb-bridge", []),
    ("rrb-upload", ["--storage", "{folder}"]),
    ("rrb", ["--storage", "{folder}"]),
    ("rrb-verify", ["--storage", "{folder}"]),
]


@pytest.mark.parametrize(("command", "extra"), EVERY_COMMAND)
def test_a_server_certificate_from_another_ca_is_one_line_and_exit_1(
    tls_redis: TlsFactory, pki: Pki, tmp_path: Path, command: str, extra: list[str]
) -> None:
    server = tls_redis()
    _backup_folder(tmp_path / "backup")
    args = [a.format(folder=tmp_path / "backup") for a in extra]
    result = run_command(
        command,
        server.tls_url(),
        *args,
        "--tls-ca", pki.other_ca,
        "--tls-cert", pki.client_cert,
        "--tls-key", pki.client_key,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    line = one_line(result.stderr)
    assert f"{command}: error:" in line
    assert f"rediss://127.0.0.1:{server.tls_port}" in line
    assert "certificate verify failed" in line


@pytest.mark.parametrize(("command", "extra"), EVERY_COMMAND)
def test_no_client_certificate_is_one_line_exit_1_and_a_hint(
    tls_redis: TlsFactory, pki: Pki, tmp_path: Path, command: str, extra: list[str]
) -> None:
    server = tls_redis()
    _backup_folder(tmp_path / "backup")
    args = [a.format(folder=tmp_path / "backup") for a in extra]
    result = run_command(command, server.tls_url(), *args, "--tls-ca", pki.ca)
    assert result.returncode == 1, result.stderr
    line = one_line(result.stderr)
    assert f"rediss://127.0.0.1:{server.tls_port}" in line
    assert line.endswith(
        "if the server requires a client certificate, give --tls-cert and --tls-key"
    )


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (
            ["rediss://127.0.0.1:1/0", "--tls-ca", "/no/such/ca.pem"],
            "--tls-ca (or REDIS_TLS_CA) '/no/such/ca.pem': no such file",
        ),
        (
            ["rediss://127.0.0.1:1/0", "--tls-cert", "/no/cert.pem"],
            "--tls-cert (or REDIS_TLS_CERT) '/no/cert.pem'",
        ),
        (
            ["rediss://127.0.0.1:1/0", "--tls-key", "{ca}"],
            "--tls-key (or REDIS_TLS_KEY) without --tls-cert",
        ),
        (["redis://127.0.0.1:1/0", "--tls-ca", "{ca}"], "no Redis URL here uses rediss://"),
    ],
)
@pytest.mark.parametrize("command", [rrb, bridge, upload, status, restore])
def test_bad_tls_options_are_one_line_and_exit_2(
    command: Callable[[list[str]], int],
    argv: list[str],
    needle: str,
    pki: Pki,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert command([a.format(ca=pki.ca) for a in argv]) == 2
    line = one_line(capsys.readouterr().err)
    assert needle in line


def test_tls_from_the_environment_is_checked_too(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REDIS_TLS_CA", "/no/such/ca.pem")
    assert status(["rediss://127.0.0.1:1/0"]) == 2
    assert "'/no/such/ca.pem': no such file" in capsys.readouterr().err


def test_options_reach_only_rediss_urls(pki: Pki) -> None:
    tls = pki.client.validate(["redis://127.0.0.1:1/0", "rediss://127.0.0.1:2/0"])
    assert tls.connection_kwargs("redis://127.0.0.1:1/0") == {}
    assert tls.connection_kwargs("rediss://127.0.0.1:2/0") == {
        "ssl_ca_certs": pki.ca,
        "ssl_certfile": pki.client_cert,
        "ssl_keyfile": pki.client_key,
    }
    assert TlsOptions.from_sources(env={"REDIS_TLS_CA": "x"}) == TlsOptions(ca="x")
    assert TlsOptions.from_sources(ca="y", env={"REDIS_TLS_CA": "x"}) == TlsOptions(ca="y")
