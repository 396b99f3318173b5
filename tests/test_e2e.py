"""The README's main job, end to end through the `sasa` command (subprocesses), at a small size;
and the README's two commands are exactly what CI runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from recon_reference import recon_reference

from sasa.store import open_cache

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    block = re.search(r"## Set-up: two commands.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [ln for ln in block.group(1).splitlines() if ln and not ln.startswith("#")]


def test_readme_commands_are_what_ci_runs():
    main, tests = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == tests
    assert main.endswith("sasa demo --out runs/demo") and tests.endswith("python -m pytest -q")
    # the same installation steps (the test command first adds Chromium, for the browser tests)
    assert main.split(" && ")[:3] == tests.split(" && ")[-4:-1]


def test_demo_pipeline_end_to_end(tmp_path):
    main, _ = readme_commands()
    demo = main.split(" && ")[-1].split()
    assert demo[:3] == ["sasa", "demo", "--out"]
    out = tmp_path / "demo"  # the README's command with its output moved and its sizes shrunk
    small = ["--tokens", "8192", "--width", "128", "--active", "8", "--batch-size", "256", "--eval-tokens", "2048"]
    done = subprocess.run([sys.executable, "-m", "sasa", "demo", "--out", str(out), *small],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "demo finished" in done.stdout and "$ sasa harvest" in done.stdout

    info = json.loads(subprocess.run([sys.executable, "-m", "sasa", "info", str(out / "cache"), "--json"],
                                     capture_output=True, text=True, timeout=120).stdout)
    assert info["tokens_committed"] >= 8192 - 128 and set(info["hookpoints"]) == {"resid_post.2", "resid_post.4"}
    assert info["model"] and info["hookpoints"]["resid_post.4"]["d"] == 384

    saes = sorted(p for p in (out / "sweep").iterdir() if (p / "sae.safetensors").exists())
    assert len(saes) == 8  # SASA r = 1-8, TopK twice and ReLU on one hookpoint, TopK on the other
    cache = open_cache(out / "cache")
    for folder in saes:
        ev = json.loads((folder / "eval.json").read_text())
        ref = recon_reference(cache, folder, ev["hookpoint"], ev["n_tokens"])
        assert 0 < ref["fvu"] < 1
        for key in ("fvu", "explained_variance", "mse"):
            assert ev[key] == pytest.approx(ref[key], rel=1e-4), (folder.name, key)
        if not folder.name.startswith("relu"):  # s * r = k = 8 active coordinates per token,
            # on average where a batch gate's threshold decides (it keeps more on unseen text)
            late = json.loads((folder / "config.json").read_text())["config"]["batch_gate_from"]
            assert abs(ev["l0_coords"] - 8) < (2.0 if late is not None else 0.5)
    html = (out / "report.html").read_text()
    assert html.lstrip().lower().startswith("<!doctype html") and html.count("data:image/png;base64,") >= 3
    for folder in saes:
        assert folder.name in html
