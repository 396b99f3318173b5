"""The output-folder lock of a Ray-distributed run: its driver holds it while the actors train."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time

import pytest

from sasa.cli import main


@pytest.mark.slow  # Ray start-up and one actor: ~55 s on the loaded 2-core VM, most of it ray.init
def test_a_ray_run_holds_its_folder_until_it_ends(tmp_path, capsys):
    import ray

    from sasa.analysis.synth import write_synthetic_cache
    from sasa.analysis.synthetic import SyntheticSpec
    from sasa.trainer import MemberConfig, TrainConfig
    from sasa.trainer.distributed import train_distributed

    cache = str(tmp_path / "cache")
    write_synthetic_cache(cache, spec=SyntheticSpec(d=16, features_per_dim={1: 4, 2: 2}),
                          n_tokens=2048, ctx_len=16, shard_seqs=32, progress=False)
    saes = [{"groups": 8, "rank": 2, "top_s": 2}]
    cfg = TrainConfig(cache=cache, members=[MemberConfig("synthetic", s) for s in saes], tokens=2048,
                      batch_size=256, device="cpu", workers=1)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(json.dumps({"cache": cache, "tokens": 2048, "batch_size": 256, "device": "cpu", "workers": 1,
                                 "saes": [{"hookpoint": "synthetic", **s} for s in saes]}))
    out, lock = tmp_path / "run", tmp_path / "run" / ".sasa-lock"
    ray_dir = tempfile.mkdtemp(prefix="sasa-ray-")  # socket paths must stay short
    ray.init(num_cpus=1, include_dashboard=False, _temp_dir=ray_dir, log_to_driver=False)
    result = {}
    runner = threading.Thread(target=lambda: result.update(r=train_distributed(cfg, out)))
    try:
        runner.start()
        deadline = time.monotonic() + 60
        # the lock is created (O_EXCL) and then filled: wait for its content, as a second run does
        while not (lock.exists() and lock.read_text().strip()):
            assert runner.is_alive() and time.monotonic() < deadline
            time.sleep(0.02)
        assert json.loads(lock.read_text())["pid"] == os.getpid()  # the driver's, not an actor's
        capsys.readouterr()
        assert main(["sweep", str(sweep), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert f"{out} is in use by a live run ({socket.gethostname()} pid {os.getpid()}" in err
        runner.join(timeout=300)
    finally:
        runner.join(timeout=300)
        ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert not lock.exists() and set(result["r"].saes) == {m.name for m in cfg.members}
