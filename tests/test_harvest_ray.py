"""Ray actors: one actor, two actors, a killed actor and a killed driver all give the bytes of
the in-process reference run. One local Ray session (2 CPUs) serves the whole module."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from harvest_fixtures import SAMPLE_DOCS, make_gpt2, tree_digest, write_jsonl

from sasa.harvester.config import HarvestConfig
from sasa.harvester.harvest import harvest
from sasa.store import open_cache

import ray  # noqa: E402  (a hard dependency: a broken Ray fails these tests, never skips them)

N_SHARDS = 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("harvest")
    model = make_gpt2(d / "gpt2", n_layer=3, n_embd=64, n_positions=64)
    data = write_jsonl(d / "docs.jsonl", SAMPLE_DOCS * 3)
    kw = dict(model=str(model), dataset=str(data), hookpoints=("resid_pre.1", "resid_post.2"),
              tokens=N_SHARDS * 8 * 64, ctx_len=64, shard_seqs=8, batch_size=8,
              progress=False)
    ref = harvest(HarvestConfig(out=str(d / "ref"), workers=0, **kw))
    assert ref.n_shards == N_SHARDS
    return kw, tree_digest(d / "ref")


def test_two_actors_give_the_reference_bytes(ray_session, setup, tmp_path):
    """(One actor: the rerun in the killed-driver test finishes a cache with a single actor.)"""
    kw, ref = setup
    result = harvest(HarvestConfig(out=str(tmp_path / "c"), workers=2, **kw))
    assert result.shards_run == N_SHARDS
    assert tree_digest(tmp_path / "c") == ref


def _wait_for_commits(url: str, at_least: int, timeout: float = 120.0) -> int:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            n = len(open_cache(url).committed_shards())
            if n >= at_least:
                return n
        except Exception:  # not created yet
            pass
        time.sleep(0.02)
    raise TimeoutError(f"no {at_least} committed shards in {url} after {timeout} s")


def test_killed_actor_is_replaced_and_bytes_match(ray_session, setup, tmp_path):
    kw, ref = setup
    out = str(tmp_path / "c")
    errors = []
    runner = threading.Thread(target=lambda: _run(errors, HarvestConfig(out=out, workers=2, **kw)))
    runner.start()
    done_at_kill = _wait_for_commits(out, 1)
    names = [n for n in ray.util.list_named_actors() if n.startswith("sasa-harvest-")]
    ray.kill(ray.get_actor(sorted(names)[0]))
    runner.join(timeout=300)
    assert not runner.is_alive() and not errors, errors
    assert done_at_kill < N_SHARDS
    assert tree_digest(tmp_path / "c") == ref


def _run(errors, config):
    try:
        harvest(config)
    except BaseException as err:  # surfaced by the test thread
        errors.append(err)


def test_killed_driver_then_rerun_gives_the_same_bytes(ray_session, setup, tmp_path):
    kw, ref = setup
    out = str(tmp_path / "c")
    script = textwrap.dedent(f"""
        import ray
        from sasa.harvester.config import HarvestConfig
        from sasa.harvester.harvest import harvest
        ray.init(address={ray_session!r}, logging_level="warning")
        harvest(HarvestConfig(out={out!r}, workers=2, **{kw!r}))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        done_at_kill = _wait_for_commits(out, 2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert done_at_kill < N_SHARDS
    partial = open_cache(out)
    assert not partial.complete and partial.n_tokens < partial.n_seq * partial.ctx_len
    result = harvest(HarvestConfig(out=out, workers=1, **kw))
    assert 0 < result.shards_run < N_SHARDS
    assert tree_digest(tmp_path / "c") == ref
