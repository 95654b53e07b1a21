"""Session fixtures shared by all test tiers.

`s3_server`: a moto S3 server in a separate process on 127.0.0.1 (a free port), the loopback stand-in
for MinIO/Ceph/R2. Fake credentials are set in the environment only while the fixture is alive and
restored afterwards; tests using the fixture get the `integration` marker automatically.
`fault_proxy`: a fault-injecting reverse proxy (tests/faultproxy.py) in front of that server, per test.
`http_files`: a directory served over http:// on 127.0.0.1, per test (image URLs); `http_fault_proxy`: a
fault proxy in front of it.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

# Distinctive fake credentials, so a test can prove they never leak into outputs.
FAKE_ACCESS_KEY = "gbtest-access-key-0000"
FAKE_SECRET_KEY = "gbtest-secret-do-not-log-0000"
KEY_ENV, SECRET_ENV = "GB_TEST_S3_KEY", "GB_TEST_S3_SECRET"
REGION = "us-east-1"


@dataclass
class S3Server:
    endpoint_url: str
    access_key: str = FAKE_ACCESS_KEY
    secret_key: str = FAKE_SECRET_KEY
    key_env: str = KEY_ENV
    secret_env: str = SECRET_ENV

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name=REGION,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
        )

    def create_bucket(self, name: str | None = None) -> str:
        """Create a fresh bucket (client call: s3fs mkdir fails for us-east-1) and return its name."""
        name = name or f"gb-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def put_tree(self, local_dir, bucket: str, prefix: str = "") -> list[str]:
        """Upload every file under `local_dir` to s3://bucket/prefix/<relative path> (directly, not
        through a fault proxy); returns the s3:// URLs, sorted."""
        client, urls = self.client(), []
        for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            key = "/".join(x for x in (prefix.strip("/"), path.relative_to(local_dir).as_posix()) if x)
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
            urls.append(f"s3://{bucket}/{key}")
        return urls

    def env(self, endpoint_url: str | None = None) -> dict[str, str]:
        """Variables a subprocess (the CLI, a Ray worker's runtime_env) needs to reach this server with
        `storage()`'s credential names; `endpoint_url` also sets AWS_ENDPOINT_URL (e.g. a fault proxy's)."""
        values = {self.key_env: self.access_key, self.secret_env: self.secret_key, "AWS_ACCESS_KEY_ID": self.access_key,
                  "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": REGION,
                  "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        if endpoint_url:
            values["AWS_ENDPOINT_URL"] = endpoint_url
        return values

    def storage(self, **options):
        """StorageOptions pointing at this server (credentials via the NAMED env variables)."""
        from schemas.job import StorageOptions

        values = {"endpoint_url": self.endpoint_url, "region": REGION, "key_env": self.key_env, "secret_env": self.secret_env}
        values.update(options)
        return StorageOptions(**values)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(url: str, process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited with code {process.returncode}")
        try:
            opener.open(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server did not answer on {url} within {timeout_s:.0f} s")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    env = {
        "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY,
        KEY_ENV: FAKE_ACCESS_KEY,
        SECRET_ENV: FAKE_SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp_path_factory.mktemp("aws") / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path_factory.mktemp("aws") / "credentials"),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        process = subprocess.Popen(
            [sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            endpoint = f"http://127.0.0.1:{port}"
            _wait_until_up(endpoint + "/", process)
            yield S3Server(endpoint_url=endpoint)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


@pytest.fixture()
def fault_proxy(s3_server):
    """A `faultproxy.FaultProxy` in front of the session's moto server, with no faults until the test
    sets rules (`fault_proxy.set_rules([Fault("503", share=0.15)])`); point clients at it with
    `s3_server.storage(endpoint_url=fault_proxy.url)`. Stopped after the test."""
    from faultproxy import FaultProxy

    proxy = FaultProxy(s3_server.endpoint_url, lifetime_s=900).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@dataclass
class HttpFiles:
    """Files served over http:// on 127.0.0.1 from `root` (a tiny `http.server`)."""

    root: "Path"
    base_url: str

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def add(self, name: str, data: bytes) -> str:
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return self.url(name)


@pytest.fixture()
def http_files(tmp_path):
    """`HttpFiles` over a fresh directory; the server thread stops after the test."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    root = tmp_path / "http_root"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="http-files", daemon=True)
    thread.start()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("NO_PROXY", "127.0.0.1,localhost")
            patch.setenv("no_proxy", "127.0.0.1,localhost")
            yield HttpFiles(root=root, base_url=f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture()
def http_fault_proxy(http_files):
    """A `faultproxy.FaultProxy` in front of `http_files` (image URLs: `http_fault_proxy.url + "/name"`)."""
    from faultproxy import FaultProxy

    proxy = FaultProxy(http_files.base_url, lifetime_s=900).start()
    try:
        yield proxy
    finally:
        proxy.stop()


def pytest_collection_modifyitems(config, items):
    """Tests that use the S3 server (or live under tests/integration/) are integration tests."""
    for item in items:
        if "s3_server" in getattr(item, "fixturenames", ()) or "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)
