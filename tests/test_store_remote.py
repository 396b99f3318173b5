"""Storage faults on a real S3 endpoint (moto on loopback): each one is a one-line error naming
the URL, the cause and the fix; an endpoint that goes away mid-harvest stops the harvest with
such a line, and a rerun once it is back finishes a cache byte-identical to an uninterrupted one.

"Killing the server" is done by a TCP relay in front of moto (``Relay``): stopping it refuses
new connections and cuts open ones, exactly as a dead endpoint does, while moto keeps its
objects so the same endpoint can come back. Throttling is an HTTP server that answers every
request as S3 does when it throttles (503 SlowDown).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from sasa.cli import main
from sasa.errors import SasaError
from sasa.store import open_cache, remote
from store_helpers import build, snapshot
from conftest import free_port


class Relay:
    """A TCP relay 127.0.0.1:port -> upstream that can be stopped and started again."""

    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self.port = free_port()
        self.sockets: list[socket.socket] = []
        self.listener = None
        self.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(64)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def stop(self) -> None:
        self.listener.close()
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self.sockets = []

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(remote, "RETRY_DELAYS_S", (0.05, 0.1))


#: botocore retries underneath sasa's own retries; one attempt keeps the tests fast.
FEW_RETRIES = {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def auth_s3():
    """A moto server that checks credentials (a separate process: the switch is process-wide),
    with a bucket holding one object, a read-write user and a read-only user.

    moto's credential check rejects s3fs's *listing* requests even with the right keys (its
    signature of the list query differs), so these tests use requests that do not list: a GET
    and a PUT through ``CacheStore``, and ``sasa info`` with wrong keys."""
    import boto3
    port = free_port()
    setup_actions = 8  # requests allowed before credentials are checked: the setup below
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(setup_actions))
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        kw = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                  aws_secret_access_key="setup")
        s3 = boto3.client("s3", **kw)
        s3.create_bucket(Bucket="sasa-auth")
        s3.put_object(Bucket="sasa-auth", Key="cache/zarr.json", Body=b"{}")
        iam = boto3.client("iam", **kw)
        options = {}
        for user, actions in (("rw", ["s3:*"]), ("ro", ["s3:GetObject", "s3:ListBucket"])):
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName=user, PolicyDocument=json.dumps(
                {"Version": "2012-10-17",
                 "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            options[user] = {"endpoint_url": endpoint, "key": key["AccessKeyId"],
                             "secret": key["SecretAccessKey"]}
        yield "s3://sasa-auth/cache", options
    finally:
        proc.terminate()
        proc.wait()


def test_wrong_credentials_and_write_permission(auth_s3, fast_retries, capsys):
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync
    url, options = auth_s3
    proto = default_buffer_prototype()
    for user in ("ro", "rw"):  # the right keys read
        assert sync(remote.open_store(url, True, options[user]).get("zarr.json", proto)).to_bytes() == b"{}"
    wrong = {**options["rw"], "secret": "not-the-secret"}
    assert main(["info", url, "--storage-options", json.dumps(wrong)]) == 2
    line = one_line(capsys)
    # s3fs >= 2026.6 reads with a HEAD first, whose 403 carries no error code (wrong keys and
    # missing rights look alike: "access denied ... credentials are wrong or ..."); older s3fs
    # GETs, and the SignatureDoesNotMatch code names the cause ("wrong credentials for ...").
    either = rf"(access denied reading {url} .*credentials are wrong|wrong credentials for {url} )"
    assert re.search(either, line)
    assert "not-the-secret" not in line
    with pytest.raises(SasaError, match=either):
        sync(remote.open_store(url, True, wrong).get("zarr.json", proto))
    data = proto.buffer.from_bytes(b"[]")
    sync(remote.open_store(url, False, options["rw"]).set("x.json", data))
    with pytest.raises(SasaError, match=rf"permission denied writing {url} .*s3:PutObject.*another --out"):
        sync(remote.open_store(url, False, options["ro"]).set("x.json", data))


def test_no_credentials(s3, s3_url, monkeypatch, capsys):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()  # an earlier test's filesystem with these options had keys
    so = json.dumps({"endpoint_url": s3.endpoint_url})
    try:
        assert main(["info", s3_url, "--storage-options", so]) == 2
    finally:  # fsspec caches filesystems by their options: drop the one without credentials
        s3fs.S3FileSystem.clear_instance_cache()
    line = one_line(capsys)
    assert f"no credentials for {s3_url}" in line and "AWS_ACCESS_KEY_ID" in line


def test_missing_bucket(s3, capsys, tmp_path):
    url = "s3://no-such-bucket-here/cache"
    assert main(["info", url, "--storage-options", json.dumps(s3.storage_options)]) == 2
    assert "bucket 'no-such-bucket-here' of s3://no-such-bucket-here/cache does not exist" in one_line(capsys)
    with pytest.raises(SasaError, match="bucket 'no-such-bucket-here' .* does not exist: create it"):
        build(url, storage_options=s3.storage_options)


def test_endpoint_down_then_back(s3, s3_url, fast_retries, capsys):
    """A dead endpoint reads as unreachable, not as throttling, even when the URL holds "503"
    (random cache prefixes do: that once made this test flaky)."""
    url = f"{s3_url}/run-5038"
    relay = Relay(int(s3.endpoint_url.rsplit(":", 1)[1]))
    so = {**s3.storage_options, "endpoint_url": relay.endpoint, **FEW_RETRIES}
    build(url, storage_options=so)
    cache = open_cache(url, so)
    relay.stop()
    with pytest.raises(SasaError, match=rf"cannot reach the storage of {url} .* server is up"):
        cache.read_rows("resid_post.1", 0, 128)
    assert main(["info", url, "--storage-options", json.dumps(so)]) == 2
    assert "cannot reach the storage of" in one_line(capsys)
    relay.start()
    assert cache.read_rows("resid_post.1", 0, 128).shape == (128, 16)
    relay.stop()


@pytest.mark.slow  # ~30 s: three small harvests, one of them on a dying endpoint
def test_harvest_survives_the_endpoint_going_away(s3, s3_url, gpt2, tmp_path, fast_retries):
    """Kill the endpoint after the first committed shard: the harvest stops with one line; a
    rerun after it is back ends byte-identical to an uninterrupted harvest."""
    import s3fs
    from harvest_fixtures import SAMPLE_DOCS, write_jsonl
    from sasa.harvester.config import HarvestConfig
    from sasa.harvester.harvest import harvest

    relay = Relay(int(s3.endpoint_url.rsplit(":", 1)[1]))
    so = {**s3.storage_options, "endpoint_url": relay.endpoint, **FEW_RETRIES}
    data = write_jsonl(tmp_path / "d.jsonl", SAMPLE_DOCS[:40])

    def config(url, storage_options=so):  # one object per shard: the layout meant for S3
        return HarvestConfig(out=url, model=gpt2, dataset=str(data), hookpoints=("resid_post.1",),
                             tokens=8 * 16 * 16, ctx_len=16, shard_seqs=16, dtype="fp32",
                             shard_objects=True, workers=0, progress=False,
                             storage_options=storage_options)

    reference = str(tmp_path / "reference")  # the same objects, byte for byte, on any backend
    harvest(config(reference, {}))
    url = f"{s3_url}/interrupted"
    errors = []
    run = threading.Thread(target=lambda: errors.append(_raises(harvest, config(url))))
    run.start()
    fs = s3fs.S3FileSystem(**s3.storage_options, skip_instance_cache=True)
    flags = f"{url.removeprefix('s3://')}/shards/committed/c"
    for _ in range(2000):
        fs.invalidate_cache()
        if fs.exists(flags) and fs.ls(flags):
            break
        time.sleep(0.01)
    relay.stop()
    run.join(120)
    relay.start()
    committed = len(fs.ls(flags, refresh=True))
    assert 1 <= committed < 8, "the harvest finished before the endpoint went away"
    (err,) = errors
    assert isinstance(err, SasaError) and "\n" not in str(err), err
    assert f"cannot reach the storage of {url}" in str(err) and "rerun the same command" in str(err)
    harvest(config(url))
    assert snapshot(url, so) == snapshot(reference)
    assert open_cache(url, so).layout.shard_objects
    relay.stop()


def _raises(fn, *args):
    try:
        fn(*args)
    except Exception as err:  # noqa: BLE001 - returned to the test thread
        return err
    return None


def test_harvest_command_sets_shard_objects(s3, s3_url, gpt2, tmp_path):
    from harvest_fixtures import SAMPLE_DOCS, write_jsonl
    import s3fs
    data = write_jsonl(tmp_path / "d.jsonl", SAMPLE_DOCS[:20])
    assert main(["harvest", "--out", s3_url, "--storage-options", json.dumps(s3.storage_options),
                 "--model", gpt2, "--dataset", str(data), "--hookpoints", "resid_post.1",
                 "--tokens", "1024", "--ctx-len", "16", "--shard-seqs", "16", "--shard-objects",
                 "--workers", "0", "--no-progress"]) == 0
    cache = open_cache(s3_url, s3.storage_options)
    assert cache.layout.shard_objects
    assert cache.acts("resid_post.1").shards == (cache.layout.shard_rows, 32)  # zarr sharding
    fs = s3fs.S3FileSystem(**s3.storage_options, skip_instance_cache=True)
    objects = fs.ls(f"{s3_url.removeprefix('s3://')}/acts/resid_post.1/c")
    assert len(objects) == cache.n_shards == 4  # one object per shard
    assert "shard_objects" not in cache.attrs["harvest"]["config"]  # the layout records it


def test_throttling_that_outlasts_the_retries(fast_retries, capsys):
    """An endpoint that answers every request with S3's 503 SlowDown."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class SlowDown(BaseHTTPRequestHandler):
        def _answer(self):
            body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                    b"<Message>Please reduce your request rate.</Message></Error>")
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body) if self.command != "HEAD" else 0))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_PUT = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowDown)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        so = {"endpoint_url": f"http://127.0.0.1:{server.server_port}", "key": "k", "secret": "s",
              **FEW_RETRIES}
        assert main(["info", "s3://busy-bucket/cache", "--storage-options", json.dumps(so)]) == 2
    finally:
        server.shutdown()
    line = one_line(capsys)
    assert "kept throttling requests to s3://busy-bucket/cache" in line and "read_concurrency" in line


def test_s3_reads_a_chunk_in_one_request(s3, s3_url):
    """s3fs's default asks for an object's size (a HEAD) before every whole-object read; the
    cache's store reads with one GET (``remote.with_defaults``), and the caller's own setting
    wins."""
    build(s3_url, storage_options=s3.storage_options)
    cache = open_cache(s3_url, s3.storage_options)
    assert cache.group.store._store.fs.max_concurrency == 1
    assert len(list(cache.batches("resid_post.1", 64))) > 4
    assert remote.with_defaults(s3_url, {"max_concurrency": 4}) == {"max_concurrency": 4}
    assert remote.with_defaults("memory://x", None) is None
    assert remote.with_defaults("/a/folder", {}) == {}
