"""Who may talk to `ctxaudit serve`: a token on every request (gRPC UNAUTHENTICATED, HTTP 401,
nothing stored, nothing read), TLS and mutual TLS on both receivers, the token on the read API;
all through the real OpenTelemetry SDK exporters against a real server."""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import pytest
import trustme
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

from audit.net.access import TokenAuth
from audit.read.remote import RemoteReader
from audit.server.process import start_server, stop_server
from audit.store.errors import StoreError
from audit.store.reader import LocalReader
from tests.serve_helpers import wait_loaded
from tests.test_roundtrip_sdk import emit

TOKEN = "s3cret-token-0123456789abcdef"


def _ctxaudit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "audit", *args], capture_output=True, text=True, timeout=120, env=env
    )


def _stored(db: str) -> set[str]:
    reader = LocalReader(db)
    try:
        return {row.service for row in reader.stats().by_service}
    finally:
        reader.close()


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return str(path)


@pytest.mark.slow
def test_the_token_is_required_on_both_receivers(tmp_path, token_file):
    db = str(tmp_path / "auth.duckdb")
    proc, grpc_port, http_url = start_server(
        db, "--token-file", token_file, "--token-header", "x-api-key", "--audit-every", "0"
    )
    try:
        bearer = {"authorization": f"Bearer {TOKEN}"}
        emit(GrpcExporter(endpoint=f"127.0.0.1:{grpc_port}", insecure=True, headers=bearer), "grpc-ok")
        emit(HttpExporter(endpoint=http_url, headers=bearer), "http-ok")
        emit(HttpExporter(endpoint=http_url, headers={"x-api-key": TOKEN}), "api-key-ok")
        emit(GrpcExporter(endpoint=f"127.0.0.1:{grpc_port}", insecure=True), "grpc-none")
        emit(
            GrpcExporter(
                endpoint=f"127.0.0.1:{grpc_port}",
                insecure=True,
                headers={"authorization": f"Bearer {TOKEN[:-1]}x"},
            ),
            "grpc-wrong",
        )
        emit(HttpExporter(endpoint=http_url), "http-none")
        # what a client without the token is told
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            call = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
            with pytest.raises(grpc.RpcError) as e:
                call(b"", timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in e.value.details()
        request = urllib.request.Request(
            http_url, data=b"", headers={"Content-Type": "application/x-protobuf"}
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        assert e.value.code == 401 and e.value.headers["WWW-Authenticate"].startswith("Bearer")
        health = RemoteReader(proc.api_url, token=TOKEN).ingest()
        assert health["unauthenticated_requests"] == 5  # three exporters and two probes
    finally:
        assert stop_server(proc) == 0
    assert _stored(db) == {"grpc-ok", "http-ok", "api-key-ok"}


@pytest.mark.slow
def test_the_read_api_requires_the_token(tmp_path, token_file):
    db = str(tmp_path / "api.duckdb")
    proc, _, _ = start_server(db, "--token-file", token_file, "--audit-every", "0")
    try:
        with pytest.raises(StoreError, match="401.*CTXAUDIT_TOKEN"):
            RemoteReader(proc.api_url, token="").stats()
        with pytest.raises(StoreError, match="401"):
            RemoteReader(proc.api_url, token="not-the-token-at-all").stats()
        for path in ("/v1/stats", "/v1/queries", "/nowhere"):  # every path, known or not
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(proc.api_url + path, timeout=10)
            assert e.value.code == 401, path
        assert RemoteReader(proc.api_url, token=TOKEN).stats().spans == 0
        env = {k: v for k, v in os.environ.items() if k != "CTXAUDIT_TOKEN"}
        denied = _ctxaudit("stats", "--server", proc.api_url, env=env)
        assert denied.returncode == 1 and "CTXAUDIT_TOKEN" in denied.stderr
        allowed = _ctxaudit("stats", "--server", proc.api_url, "--json", env=env | {"CTXAUDIT_TOKEN": TOKEN})
        assert allowed.returncode == 0 and json.loads(allowed.stdout)["spans"] == 0
    finally:
        assert stop_server(proc) == 0


@pytest.fixture(autouse=True)
def _exporters_use_their_own_ca(monkeypatch):
    """requests lets $REQUESTS_CA_BUNDLE override a session's own CA (psf/requests#3829), which
    the HTTP exporter's certificate_file is: unset it, as on a machine without it."""
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("exporter@example.test")
    paths = {name: tmp / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}
    ca.cert_pem.write_to_path(paths["ca.pem"])
    server.cert_chain_pems[0].write_to_path(paths["server.pem"])
    server.private_key_pem.write_to_path(paths["server.key"])
    client.cert_chain_pems[0].write_to_path(paths["client.pem"])
    client.private_key_pem.write_to_path(paths["client.key"])
    return {k: str(v) for k, v in paths.items()}


def _grpc_credentials(pki: dict, client_cert: bool) -> grpc.ChannelCredentials:
    read = lambda name: open(pki[name], "rb").read()  # noqa: E731
    if client_cert:
        return grpc.ssl_channel_credentials(read("ca.pem"), read("client.key"), read("client.pem"))
    return grpc.ssl_channel_credentials(read("ca.pem"))


@pytest.mark.slow
def test_tls_on_both_receivers_and_the_read_api(tmp_path, pki, token_file, monkeypatch):
    db = str(tmp_path / "tls.duckdb")
    proc, grpc_port, http_url = start_server(
        db,
        "--tls-cert",
        pki["server.pem"],
        "--tls-key",
        pki["server.key"],
        "--token-file",
        token_file,
        "--audit-every",
        "0",
    )
    try:
        assert http_url.startswith("https://") and proc.api_url.startswith("https://")
        bearer = {"authorization": f"Bearer {TOKEN}"}
        emit(
            GrpcExporter(
                endpoint=f"127.0.0.1:{grpc_port}", credentials=_grpc_credentials(pki, False), headers=bearer
            ),
            "grpc-tls",
        )
        emit(HttpExporter(endpoint=http_url, certificate_file=pki["ca.pem"], headers=bearer), "http-tls")
        emit(
            GrpcExporter(endpoint=f"127.0.0.1:{grpc_port}", insecure=True, headers=bearer, timeout=3),
            "grpc-plain",
        )
        emit(
            HttpExporter(endpoint=http_url.replace("https", "http"), headers=bearer, timeout=3), "http-plain"
        )
        with pytest.raises(StoreError, match="CERTIFICATE_VERIFY_FAILED"):  # not a CA it trusts: refused
            RemoteReader(proc.api_url, token=TOKEN).stats()
        monkeypatch.setenv("CTXAUDIT_CA_FILE", pki["ca.pem"])
        monkeypatch.setenv("CTXAUDIT_TOKEN", TOKEN)
        assert RemoteReader(proc.api_url).stats().spans == 2
    finally:
        assert stop_server(proc) == 0
    assert _stored(db) == {"grpc-tls", "http-tls"}


@pytest.mark.slow
def test_mutual_tls_requires_a_client_certificate(tmp_path, pki):
    db = str(tmp_path / "mtls.duckdb")
    proc, grpc_port, http_url = start_server(
        db,
        "--tls-cert",
        pki["server.pem"],
        "--tls-key",
        pki["server.key"],
        "--tls-client-ca",
        pki["ca.pem"],
        "--audit-every",
        "0",
    )
    try:
        emit(
            GrpcExporter(endpoint=f"127.0.0.1:{grpc_port}", credentials=_grpc_credentials(pki, True)),
            "grpc-mtls",
        )
        emit(
            HttpExporter(
                endpoint=http_url,
                certificate_file=pki["ca.pem"],
                client_key_file=pki["client.key"],
                client_certificate_file=pki["client.pem"],
            ),
            "http-mtls",
        )
        emit(
            GrpcExporter(
                endpoint=f"127.0.0.1:{grpc_port}", credentials=_grpc_credentials(pki, False), timeout=3
            ),
            "grpc-nocert",
        )
        emit(HttpExporter(endpoint=http_url, certificate_file=pki["ca.pem"], timeout=3), "http-nocert")
    finally:
        assert stop_server(proc) == 0
    assert _stored(db) == {"grpc-mtls", "http-mtls"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--tls-cert", "x.pem"], "--tls-cert and --tls-key together"),
        (["--tls-client-ca", "ca.pem"], "needs --tls-cert"),
        (["--token-header", "x-api-key"], "needs a token"),
        (["--api", "0.0.0.0:4319"], "loopback only with a token"),
        (["--api", "127.0.0.1.nip.io:0"], "loopback only with a token"),  # a name, not loopback by name
    ],
)
def test_access_settings_are_checked_before_listening(tmp_path, args, message):
    env = {k: v for k, v in os.environ.items() if k != "CTXAUDIT_TOKEN"}
    r = _ctxaudit("serve", "--db", str(tmp_path / "x.duckdb"), *args, env=env)
    assert r.returncode == 2 and message in r.stderr, r.stderr


@pytest.mark.slow
def test_bad_token_and_tls_files_are_usage_errors(tmp_path, pki):
    short = tmp_path / "short"
    short.write_text("abc")
    r = _ctxaudit("serve", "--db", str(tmp_path / "x.duckdb"), "--token-file", str(short))
    assert r.returncode == 2 and "at least 16 characters" in r.stderr
    r = _ctxaudit("serve", "--db", str(tmp_path / "x.duckdb"), "--token-file", str(tmp_path / "missing"))
    assert r.returncode == 2 and "cannot read the token file" in r.stderr
    r = _ctxaudit(
        "serve",
        "--db",
        str(tmp_path / "x.duckdb"),
        "--tls-cert",
        pki["client.pem"],
        "--tls-key",
        pki["server.key"],
    )
    assert r.returncode == 2 and "cannot use the TLS files" in r.stderr  # a key that is not the certificate's
    assert not (tmp_path / "x.duckdb").exists()  # nothing started


@pytest.mark.slow
def test_beyond_loopback_without_a_token_warns(tmp_path, token_file):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "audit",
            "serve",
            "--db",
            str(tmp_path / "w.duckdb"),
            "--grpc",
            "0.0.0.0:0",
            "--http",
            "off",
            "--api",
            "off",
            "--audit-every",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "CTXAUDIT_TOKEN"},
    )
    try:
        assert "ready" in proc.stdout.readline()
    finally:
        assert stop_server(proc) == 0
    assert "without a token: anyone who can reach it can write spans" in proc.stderr.read()


def test_token_checks():
    auth = TokenAuth.load(None, "X-API-Key", env={"CTXAUDIT_TOKEN": TOKEN})
    assert auth.allows([("Authorization", f"Bearer {TOKEN}")]) and auth.allows(
        [("authorization", f"bearer {TOKEN}")]
    )
    assert auth.allows([("x-api-key", TOKEN)])
    assert not auth.allows([("authorization", TOKEN)])  # not a bearer token
    assert not auth.allows([("authorization", f"Bearer {TOKEN[:-1]}")]) and not auth.allows([])
    assert not auth.allows([("authorization", f"Bearer {TOKEN}x")])
    assert not auth.allows([("x-other", TOKEN)])
    assert auth.allows(
        [("authorization", "Bearer wrong-one-000000000"), ("x-api-key", TOKEN)]
    )  # either may carry it
    assert TokenAuth.load(None, env={}) is None


@pytest.mark.slow
def test_unauthenticated_grpc_calls_are_refused_before_decompression(tmp_path, token_file):
    """A gzip message of 8 KB that inflates to 8 MiB costs the server no more to refuse without
    the token than a message of a few bytes: the token is checked from the metadata before the
    message is read (gRPC's core, left to decompress, inflated it first: 40 ms of CPU a call)."""
    import gzip
    import random

    import psutil

    from tests.grpc_raw import grpc_call
    from tests.otlp_builders import request, span

    rng = random.Random(7)
    bomb = request([span(rng.randbytes(16), rng.randbytes(8), attrs={"blob": "x" * (8 << 20)})])
    bomb = gzip.compress(bomb.SerializeToString())
    assert len(bomb) < 16 << 10
    small = request([span(rng.randbytes(16), rng.randbytes(8))]).SerializeToString()
    proc, grpc_port, _ = start_server(
        str(tmp_path / "cpu.duckdb"), "--token-file", token_file, "--audit-every", "0"
    )
    target = f"127.0.0.1:{grpc_port}"
    server = psutil.Process(proc.pid)

    def cpu_of(message: bytes, compressed: bool, calls: int = 60) -> float:
        before = server.cpu_times()
        for _ in range(calls):
            answer = grpc_call(
                target, message, compressed=compressed, encoding="gzip" if compressed else None
            )
            assert answer["grpc-status"] == str(grpc.StatusCode.UNAUTHENTICATED.value[0])
        after = server.cpu_times()
        return after.user + after.system - before.user - before.system

    try:
        plain = [cpu_of(small, False), cpu_of(small, False)]
        compressed = cpu_of(bomb, True)
        print(f"server CPU for 60 refused calls: plain {plain} s, gzip {compressed:.3f} s")
        # CPU time is counted in clock ticks (10 ms): a floor keeps the ratio meaningful
        assert compressed < 3 * max(sum(plain) / 2, 0.05), (compressed, plain)
        bearer = (("authorization", f"Bearer {TOKEN}"),)
        assert (
            grpc_call(target, bomb, compressed=True, encoding="gzip", metadata=bearer)["grpc-status"] == "0"
        )
        health = wait_loaded(proc.api_url, token=TOKEN)  # acknowledged, then loaded
        assert health["unauthenticated_requests"] == 180 and health["committed_spans"] == 1
    finally:
        assert stop_server(proc) == 0


def test_loopback_is_a_literal_address_or_localhost():
    from collector_ext.addresses import is_loopback

    for host in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1", "localhost", "LocalHost"):
        assert is_loopback(host), host
    for host in (
        "127.0.0.1.nip.io",
        "127.evil.example",
        "0.0.0.0",
        "::",
        "10.1.2.3",
        "127.1",
        "localhost.lan",
    ):
        assert not is_loopback(host), host


@pytest.mark.slow
def test_ctxaudits_clients_present_a_client_certificate(tmp_path, pki, token_file, monkeypatch):
    """With --tls-client-ca the read API requires a client certificate too: `--server` commands
    and the UI present one from $CTXAUDIT_CLIENT_CERT and $CTXAUDIT_CLIENT_KEY, and every TLS
    failure is named as one, with what to set."""
    stranger = trustme.CA().issue_cert("intruder@example.test")
    stranger.cert_chain_pems[0].write_to_path(tmp_path / "stranger.pem")
    stranger.private_key_pem.write_to_path(tmp_path / "stranger.key")
    proc, _, _ = start_server(
        str(tmp_path / "mtls-api.duckdb"),
        *("--tls-cert", pki["server.pem"], "--tls-key", pki["server.key"]),
        *("--tls-client-ca", pki["ca.pem"], "--token-file", token_file, "--audit-every", "0"),
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTXAUDIT_")} | {"CTXAUDIT_TOKEN": TOKEN}
    for name in ("CTXAUDIT_CA_FILE", "CTXAUDIT_CLIENT_CERT", "CTXAUDIT_CLIENT_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CTXAUDIT_TOKEN", TOKEN)
    try:
        with pytest.raises(StoreError, match="TLS: .*CERTIFICATE_VERIFY_FAILED.*CTXAUDIT_CA_FILE"):
            RemoteReader(proc.api_url).stats()
        monkeypatch.setenv("CTXAUDIT_CA_FILE", pki["ca.pem"])
        with pytest.raises(StoreError, match="TLS: .*requires a client certificate.*CTXAUDIT_CLIENT_CERT"):
            RemoteReader(proc.api_url).stats()
        monkeypatch.setenv("CTXAUDIT_CLIENT_CERT", str(tmp_path / "stranger.pem"))
        monkeypatch.setenv("CTXAUDIT_CLIENT_KEY", pki["client.key"])
        with pytest.raises(StoreError, match="cannot use the client certificate"):  # not its key
            RemoteReader(proc.api_url)
        monkeypatch.setenv("CTXAUDIT_CLIENT_KEY", str(tmp_path / "stranger.key"))
        with pytest.raises(StoreError, match="TLS: .*refused the client certificate"):  # another CA's
            RemoteReader(proc.api_url).stats()
        monkeypatch.setenv("CTXAUDIT_CLIENT_CERT", pki["client.pem"])
        monkeypatch.setenv("CTXAUDIT_CLIENT_KEY", pki["client.key"])
        assert RemoteReader(proc.api_url).stats().spans == 0
        tls = {"CTXAUDIT_CA_FILE": pki["ca.pem"]}
        denied = _ctxaudit("stats", "--server", proc.api_url, env=env | tls)
        assert denied.returncode == 1 and "requires a client certificate" in denied.stderr, denied.stderr
        assert "is the server running" not in denied.stderr
        tls |= {"CTXAUDIT_CLIENT_CERT": pki["client.pem"], "CTXAUDIT_CLIENT_KEY": pki["client.key"]}
        allowed = _ctxaudit("stats", "--server", proc.api_url, "--json", env=env | tls)
        assert allowed.returncode == 0 and json.loads(allowed.stdout)["spans"] == 0, allowed.stderr
    finally:
        assert stop_server(proc) == 0
