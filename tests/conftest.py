"""Shared fixtures: a real S3 endpoint on loopback, and environment hygiene.

The S3 server is moto's (a real HTTP server); sasa reaches it through s3fs exactly as it would
reach AWS or MinIO, with the endpoint and credentials in ``storage_options``.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import NamedTuple

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One OpenMP thread per process: tests run beside Ray workers and subprocesses on 2 cores, where
# spinning OpenMP threads make torch ops up to 10x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")


class S3Endpoint(NamedTuple):
    endpoint_url: str
    bucket: str
    storage_options: dict


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server on 127.0.0.1 with one bucket; yields its endpoint and options."""
    from moto.server import ThreadedMotoServer
    import s3fs

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    options = {"endpoint_url": endpoint, "key": "sasa-test-key", "secret": "sasa-test-secret"}
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    fs.mkdir("sasa-test")
    yield S3Endpoint(endpoint, "sasa-test", options)
    server.stop()


@pytest.fixture
def s3_url(s3):
    """A fresh, empty prefix in the test bucket."""
    return f"s3://{s3.bucket}/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def memory_url():
    return f"memory://sasa-test/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory):
    """A tiny random GPT-2 with a locally trained BPE tokenizer, saved as a hub-style folder."""
    from harvest_fixtures import make_gpt2
    return str(make_gpt2(tmp_path_factory.mktemp("gpt2")))


@pytest.fixture(scope="session")
def mistral(tmp_path_factory):
    """A tiny random Mistral, saved the same way."""
    from harvest_fixtures import make_mistral
    return str(make_mistral(tmp_path_factory.mktemp("mistral")))


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    """A local Ray cluster for one test module (2 CPUs); yields its GCS address."""
    import ray  # a hard dependency; imported here so modules without Ray tests stay light

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning",
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
