"""``sasa info`` through the real command line (a subprocess, as a user runs it)."""

from __future__ import annotations

import json
import subprocess
import sys

from store_helpers import build


def sasa(*args):
    return subprocess.run([sys.executable, "-m", "sasa", *args], capture_output=True, text=True, timeout=120)


def test_info_text_json_and_verify(tmp_path):
    build(tmp_path / "c", shards=[0, 1, 2], dtype="bfloat16")
    out = sasa("info", str(tmp_path / "c"))
    assert out.returncode == 0, out.stderr
    assert "384 committed of 512" in out.stdout and "3 committed, 1 pending" in out.stdout
    assert "test-model" in out.stdout and "resid_post.1" in out.stdout
    info = json.loads(sasa("info", str(tmp_path / "c"), "--json", "--verify").stdout)
    assert info["tokens_committed"] == 384 and info["problems"] == []
    assert info["hookpoints"]["resid_post.2"]["d"] == 8 and info["size_bytes"] > 0

    # corrupt one byte of one activation chunk of shard 1: --verify names the shard and array
    chunk = tmp_path / "c" / "acts" / "resid_post.2" / "c" / "5" / "0"  # rows 160..191: shard 1
    data = bytearray(chunk.read_bytes())
    data[7] ^= 0xFF
    chunk.write_bytes(bytes(data))
    out = sasa("info", str(tmp_path / "c"), "--verify")
    assert out.returncode == 1
    assert "shard 1: acts/resid_post.2 checksum mismatch" in out.stdout
    assert "shard 0" not in out.stdout


def test_info_errors_are_one_line(tmp_path):
    out = sasa("info", str(tmp_path / "missing"))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"sasa: error: no sasa cache at '{tmp_path / 'missing'}' (the location does not exist); "
        f"check the URL, or create one with `sasa harvest --out {tmp_path / 'missing'}`"]
    out = sasa("info", str(tmp_path), "--storage-options", "{bad json")
    assert out.returncode == 2 and "--storage-options is not valid JSON" in out.stderr
    assert "Traceback" not in out.stderr
