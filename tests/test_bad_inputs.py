"""Bad inputs and faults, table-driven: each one line on stderr, exit status 2, nothing changed.

Every case runs the real ``sasa`` command in this process (``sasa.cli.main``) against a real
synthetic cache and a real trained run in one workspace. Each case asserts the exit status,
that stderr is exactly one ``sasa: error:`` line naming the problem, and that no file or folder
of the workspace was added, removed or changed (a snapshot of every path and its bytes before
and after). docs/reliability.md lists the same case ids; ``test_docs_list_every_case`` keeps
the two in step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Callable, NamedTuple

import pytest

from sasa.errors import SasaError
from workspace import TOKENS, TRAIN, Workspace, make_workspace, run_cli, snapshot

ROOT = Path(__file__).resolve().parents[1]
HARVEST = ["--workers", "0", "--tokens", "256", "--ctx-len", "16", "--no-progress"]
EVAL = ["--no-progress", "--splice-seqs", "0", "--contexts", "0"]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


class Case(NamedTuple):
    id: str
    """Names the case here and in docs/reliability.md."""
    argv: Callable[[Workspace], list[str]]
    """Builds the command line; may first damage a copy of the cache or run."""
    expect: str
    """A piece of the one-line message (a regex)."""


def _live_lock(ws: Workspace) -> list[str]:
    run = ws.copy(ws.run, "locked")
    (run / ".sasa-lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                "started": time.time(), "token": "live"}))
    return ["train", "--cache", str(ws.cache), *TRAIN, *TOKENS, "--out", str(run)]


def _bad_sweep_entry(ws: Workspace) -> list[str]:
    sweep = ws.file("no-saes.yaml", f"cache: {ws.cache}\ntokens: 2048\n")
    return ["sweep", str(sweep), "--out", str(ws.root / "cases" / "new")]


CASES = [
    # -- damaged files: name the file and the fix ------------------------------------------
    Case("cache-root-zarr-json-truncated", lambda ws: ["info", str(_damage(ws, "zarr.json"))],
         r"root metadata .*zarr.json is damaged"),
    Case("cache-array-zarr-json-truncated", lambda ws: ["info", str(_damage(ws, "acts/synthetic/zarr.json"))],
         r"array acts/synthetic: its metadata .* is damaged"),
    Case("train-on-array-zarr-json-truncated", lambda ws: [
        "train", "--cache", str(_damage(ws, "acts/synthetic/zarr.json")), *TRAIN, *TOKENS,
        "--out", str(ws.root / "cases" / "new")], r"acts/synthetic/zarr.json\) is damaged"),
    Case("eval-on-array-zarr-json-truncated", lambda ws: [
        "eval", "--cache", str(_damage(ws, "acts/synthetic/zarr.json")), "--sae", str(ws.sae), *EVAL],
        r"acts/synthetic/zarr.json\) is damaged"),
    Case("cache-tokens-chunk-garbage", lambda ws: ["info", str(_damage(ws, "tokens/c/3/0", garbage=True))],
         r"cannot describe .*Zstd.*sasa info --verify"),
    Case("cache-chunk-object-missing", lambda ws: ["info", str(_damage(ws, "acts/synthetic/c/1/0", delete=True))],
         r"chunk object\(s\) of committed shards are missing"),
    Case("sae-safetensors-truncated", lambda ws: ["eval", "--cache", str(ws.cache), "--sae",
                                                  str(_damage_sae(ws, "sae.safetensors")), *EVAL],
         r"sae.safetensors is damaged"),
    Case("sae-config-json-truncated", lambda ws: ["eval", "--cache", str(ws.cache), "--sae",
                                                  str(_damage_sae(ws, "config.json")), *EVAL],
         r"config.json is damaged \(not valid JSON"),
    Case("sae-weights-without-config", lambda ws: ["eval", "--cache", str(ws.cache), "--sae",
                                                   str(_damage_sae(ws, "config.json", delete=True)), *EVAL],
         r"is neither a saved SAE nor a run folder"),
    Case("sae-train-json-truncated", lambda ws: ["eval", "--cache", str(ws.cache), "--sae",
                                                 str(_damage_sae(ws, "train.json")), *EVAL],
         r"train.json is not valid JSON"),
    Case("run-json-truncated-on-rerun", lambda ws: ["train", "--cache", str(ws.cache), *TRAIN, *TOKENS,
                                                    "--out", str(_damage_run(ws, "run.json"))],
         r"holds an earlier run with a different config \(.*run.json is damaged\)"),
    Case("checkpoint-truncated-on-resume", lambda ws: [
        "train", "--cache", str(ws.cache), *TRAIN, *TOKENS, "--resume",
        "--out", str(_damage_run(ws, "checkpoints/worker-0.pt"))], r"checkpoint .*worker-0.pt is damaged"),
    Case("dataset-binary-txt", lambda ws: ["harvest", "--out", str(ws.root / "cases" / "new"), *HARVEST,
                                           "--dataset", str(ws.file("bin.txt", bytes(range(256)) * 8))],
         r"bin.txt' holds binary data"),
    Case("dataset-binary-jsonl", lambda ws: ["harvest", "--out", str(ws.root / "cases" / "new"), *HARVEST,
                                             "--dataset", str(ws.file("bin.jsonl", bytes(range(256)) * 8))],
         r"bin.jsonl' holds binary data"),
    Case("dataset-latin1-txt", lambda ws: ["harvest", "--out", str(ws.root / "cases" / "new"), *HARVEST,
                                           "--dataset", str(ws.file("latin.txt", "caf\xe9 au lait\n".encode("latin-1")))],
         r"is not UTF-8 text \(line 1"),
    Case("dataset-parquet-garbage", lambda ws: ["harvest", "--out", str(ws.root / "cases" / "new"), *HARVEST,
                                                "--dataset", str(ws.file("bad.parquet", b"PAR1 not parquet"))],
         r"bad.parquet' is not a readable Parquet file"),
    Case("dataset-jsonl-line-not-json", lambda ws: [
        "harvest", "--out", str(ws.root / "cases" / "new"), *HARVEST, "--dataset",
        str(ws.file("bad.jsonl", '{"text": "one"}\n{"text": "two"}\nnot json\n'))],
        r"bad.jsonl' line 3 is not JSON"),
    # -- unwritable --out, refused before any work ------------------------------------------
    Case("train-out-under-a-file", lambda ws: ["train", "--cache", str(ws.cache), *TRAIN, *TOKENS,
                                               "--out", str(ws.file("plain", "x") / "run")],
         r"cannot be created: .*plain is a file"),
    Case("train-out-is-a-url", lambda ws: ["train", "--cache", str(ws.cache), *TRAIN, *TOKENS,
                                           "--out", "s3://bucket/run"], r"--out s3://bucket/run is a URL"),
    Case("train-out-is-a-file", lambda ws: ["train", "--cache", str(ws.cache), *TRAIN, *TOKENS,
                                            "--out", str(ws.file("plain2", "x"))], r"is a file, not a folder"),
    Case("sweep-out-unwritable", lambda ws: ["sweep", str(_sweep_file(ws)), "--out", "/proc/sasa-run"],
         r"--out /proc/sasa-run is not writable"),
    Case("synth-out-unwritable", lambda ws: ["synth", "--out", "/proc/sasa-cache", "--no-progress"],
         r"--out /proc/sasa-cache is not writable"),
    Case("report-out-under-a-file", lambda ws: ["report", "--sweep", str(ws.run), "--out",
                                                str(ws.file("plain3", "x") / "r.html")], r"plain3 is a file"),
    Case("harvest-out-unwritable", lambda ws: ["harvest", "--out", "/proc/sasa-cache", *HARVEST],
         r"--out /proc/sasa-cache is not writable"),
    Case("eval-out-unwritable", lambda ws: ["eval", "--cache", str(ws.cache), "--sae", str(ws.sae), *EVAL,
                                            "--out", "/proc/eval.json"], r"eval output /proc/eval.json is not writable"),
    # -- nonsense values ----------------------------------------------------------------------
    Case("train-log-every-0", lambda ws: ["train", "--cache", str(ws.cache), *TRAIN, *TOKENS, "--log-every", "0",
                                          "--out", str(ws.root / "cases" / "new")], r"log_every must be >= 1"),
    Case("train-log-every-negative", lambda ws: ["train", "--cache", str(ws.cache), *TRAIN, *TOKENS,
                                                 "--log-every", "-1", "--out", str(ws.root / "cases" / "new")],
         r"log_every must be >= 1"),
    Case("train-checkpoint-every-negative", lambda ws: [
        "train", "--cache", str(ws.cache), *TRAIN, *TOKENS, "--checkpoint-every", "-1",
        "--out", str(ws.root / "cases" / "new")], r"checkpoint_every must be >= 0"),
    Case("train-device-tpu", lambda ws: ["train", "--cache", str(ws.cache), *TRAIN, *TOKENS, "--device", "tpu",
                                         "--out", str(ws.root / "cases" / "new")], r"unknown device 'tpu'"),
    Case("train-tokens-0", lambda ws: ["train", "--cache", str(ws.cache), *TRAIN, "--tokens", "0",
                                       "--out", str(ws.root / "cases" / "new")], r"tokens must be positive"),
    Case("train-seed-negative", lambda ws: ["train", "--cache", str(ws.cache), *TRAIN, *TOKENS, "--seed", "-1",
                                            "--out", str(ws.root / "cases" / "new")], r"seed must be >= 0"),
    Case("train-nuc-every-0", lambda ws: ["train", "--cache", str(ws.cache), *TRAIN, *TOKENS, "--nuc-every", "0",
                                          "--out", str(ws.root / "cases" / "new")], r"nuc_every must be >= 1"),
    Case("train-lr-negative", lambda ws: ["train", "--cache", str(ws.cache), *TRAIN, *TOKENS, "--lr", "-1",
                                          "--out", str(ws.root / "cases" / "new")], r"lr must be positive"),
    Case("train-unknown-hookpoint", lambda ws: ["train", "--cache", str(ws.cache), *TRAIN, *TOKENS,
                                                "--hookpoint", "resid_post.9", "--out", str(ws.root / "cases" / "new")],
         r"hookpoint 'resid_post.9' is not in"),
    Case("train-cache-missing", lambda ws: ["train", "--cache", str(ws.root / "nowhere"), *TRAIN, *TOKENS,
                                            "--out", str(ws.root / "cases" / "new")], r"no sasa cache at"),
    Case("train-resume-and-overwrite", lambda ws: ["train", "--cache", str(ws.cache), *TRAIN, *TOKENS,
                                                   "--resume", "--overwrite", "--out", str(ws.run)],
         r"pass one of them"),
    Case("train-resume-without-checkpoint", lambda ws: ["train", "--cache", str(ws.cache), *TRAIN, *TOKENS,
                                                        "--resume", "--out", str(ws.root / "cases" / "new")],
         r"--resume: no checkpoint"),
    Case("sweep-file-is-a-folder", lambda ws: ["sweep", str(ws.run), "--out", str(ws.root / "cases" / "new")],
         r"sweep file .* is a folder"),
    Case("sweep-file-missing", lambda ws: ["sweep", str(ws.root / "none.yaml"), "--out", str(ws.root / "cases" / "new")],
         r"sweep file .* does not exist"),
    Case("sweep-file-invalid-yaml", lambda ws: ["sweep", str(ws.file("bad.yaml", "saes: [\n")),
                                                "--out", str(ws.root / "cases" / "new")], r"is not valid YAML"),
    Case("sweep-file-without-saes", _bad_sweep_entry, r"needs a non-empty list 'saes:'"),
    Case("sweep-value-wrong-type", lambda ws: [
        "sweep", str(ws.file("types.yaml", f"cache: {ws.cache}\nsaes:\n  - {{hookpoint: synthetic, groups: 8, rank: two}}\n")),
        "--out", str(ws.root / "cases" / "new")], r"SAE entry 0: rank must be an integer"),
    Case("synth-ctx-len-0", lambda ws: ["synth", "--out", str(ws.root / "cases" / "new"), "--ctx-len", "0",
                                        "--no-progress"], r"ctx_len must be a whole number >= 1"),
    Case("synth-tokens-0", lambda ws: ["synth", "--out", str(ws.root / "cases" / "new"), "--tokens", "0",
                                       "--no-progress"], r"n_tokens must be a whole number >= 1"),
    Case("synth-feature-seed-negative", lambda ws: ["synth", "--out", str(ws.root / "cases" / "new"),
                                                    "--feature-seed", "-1", "--no-progress"],
         r"feature seed must be >= 0"),
    Case("synth-bad-features", lambda ws: ["synth", "--out", str(ws.root / "cases" / "new"), "--features", "1-8",
                                           "--no-progress"], r"write DIM:COUNT pairs"),
    Case("synth-out-holds-other-files", lambda ws: ["synth", "--out", str(ws.run), "--no-progress"],
         r"holds files that are not a sasa cache"),
    Case("info-bad-storage-options", lambda ws: ["info", str(ws.cache), "--storage-options", "{bad"],
         r"--storage-options is not valid JSON"),
    Case("eval-several-saes-one-out", lambda ws: ["eval", "--cache", str(ws.cache), "--sae", str(ws.sae), str(ws.sae),
                                                  *EVAL, "--out", str(ws.root / "cases" / "e.json")],
         r"--out names one file"),
    Case("report-sweep-missing", lambda ws: ["report", "--sweep", str(ws.root / "nowhere"), "--out",
                                             str(ws.root / "cases" / "r.html")], r"sweep folder .* does not exist"),
    Case("harvest-dataset-missing", lambda ws: ["harvest", "--out", str(ws.root / "cases" / "new"), *HARVEST,
                                                "--dataset", str(ws.root / "none.txt")], r"dataset .* not found"),
    Case("harvest-hub-model-offline", lambda ws: ["harvest", "--out", str(ws.root / "cases" / "new"), *HARVEST,
                                                  "--model", "sasa-test-org/no-such-model"],
         r"not a folder on disk nor in the local hub cache, and the hub is unreachable"),
    Case("harvest-model-folder-missing", lambda ws: ["harvest", "--out", str(ws.root / "cases" / "new"), *HARVEST,
                                                     "--model", str(ws.root / "no-model")], r"no such folder"),
    # -- lost work: a second or changed run into a used --out ------------------------------
    Case("out-in-use-by-live-run", _live_lock, r"is in use by a live run"),
    Case("changed-rerun-without-resume", lambda ws: ["train", "--cache", str(ws.cache), *TRAIN, "--tokens", "4096",
                                                     "--out", str(ws.run)],
         r"holds an earlier run with a different config \(tokens: 2048 -> 4096\); pass --resume"),
    Case("resume-with-changed-config", lambda ws: ["train", "--cache", str(ws.cache), *TRAIN, "--tokens", "4096",
                                                   "--resume", "--out", str(ws.run)],
         r"was written by a different run config"),
]


def _damage(ws: Workspace, key: str, *, garbage: bool = False, delete: bool = False) -> Path:
    cache = ws.copy(ws.cache, f"cache-{uuid.uuid4().hex[:6]}")
    path = cache / key
    if delete:
        path.unlink()
    elif garbage:
        path.write_bytes(b"not a zstd frame" * 4)
    else:
        truncate(path)
    return cache


def _damage_sae(ws: Workspace, name: str, *, delete: bool = False) -> Path:
    sae = ws.copy(ws.sae, f"sae-{uuid.uuid4().hex[:6]}")
    (sae / name).unlink() if delete else truncate(sae / name)
    return sae


def _damage_run(ws: Workspace, name: str) -> Path:
    run = ws.copy(ws.run, f"run-{uuid.uuid4().hex[:6]}")
    truncate(run / name)
    return run


def _sweep_file(ws: Workspace) -> Path:
    return ws.file("ok.yaml", f"cache: {ws.cache}\ntokens: 2048\nbatch_size: 256\ndevice: cpu\n"
                              "saes:\n  - {hookpoint: synthetic, groups: 8, rank: 2, top_s: 2}\n")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    return make_workspace(tmp_path_factory.mktemp("bad-inputs"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case: Case, ws: Workspace, capsys):
    argv = case.argv(ws)
    if any(a.startswith("/proc/") for a in argv) and not Path("/proc").is_dir():
        pytest.skip("needs Linux /proc for an unwritable path")
    before = snapshot(ws.root)
    rc, _, err = run_cli(argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("sasa: error: "), err
    assert re.search(case.expect, lines[0]), lines[0]
    assert snapshot(ws.root) == before


def test_docs_list_every_case():
    text = (ROOT / "docs" / "reliability.md").read_text()
    listed = set(re.findall(r"^\| `([a-z0-9-]+)` \|", text, flags=re.M))
    assert listed == {c.id for c in CASES} | set(OTHER_CASES)
    elsewhere = re.findall(r"^\| `(tests/[a-z_]+\.py)::(test_[a-z_]+)` \|", text, flags=re.M)
    assert len(elsewhere) >= 10
    for path, name in elsewhere:  # each names a test that exists
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), flags=re.M), (path, name)


# -- faults whose right answer is not an error: each says so and keeps everything ---------------
OTHER_CASES = ["verify-reports-damaged-array-metadata", "verify-reports-undecodable-chunk",
               "verify-reports-missing-chunk-object",
               "resume-of-finished-run-changes-nothing", "same-command-rerun-reproduces",
               "two-live-processes-then-sigkill", "ray-run-holds-its-folder", "dead-owner-lock-taken-over", "torn-lock-taken-over", "overwrite-replaces-only-its-run", "report-marks-unfinished-saes",
               "create-cache-race", "create-cache-claim-exclusive-on-s3", "create-cache-bad-sizes",
               "save-sae-is-atomic"]


@pytest.mark.parametrize("key,expect", [
    ("acts/synthetic/zarr.json", "its metadata (acts/synthetic/zarr.json) is damaged"),
    ("tokens/c/3/0", "shard 3: cannot read tokens"),
    ("acts/synthetic/c/1/0", "shard 1: cannot read acts/synthetic (shard 1 of {cache} is committed but its chunk "
                             "object acts/synthetic/c/1/0 is missing (deleted, or not yet visible on the object store))")],
    ids=OTHER_CASES[:3])
def test_verify_reports_damage_instead_of_crashing(key, expect, ws: Workspace, capsys):
    cache = _damage(ws, key, garbage=key.startswith("tokens"), delete="/c/1/" in key)
    expect = expect.format(cache=cache)
    before = snapshot(ws.root)
    rc, out, err = run_cli(["info", str(cache), "--verify"], capsys)
    assert rc == 1 and "Traceback" not in err
    assert "1 problem(s):" in out and expect in out
    assert snapshot(ws.root) == before


def test_resume_of_a_finished_run_and_the_same_command_change_nothing(ws: Workspace, capsys):
    before = snapshot(ws.run)
    rc, _, err = run_cli(["train", "--cache", str(ws.cache), *TRAIN, *TOKENS, "--resume", "--out", str(ws.run)], capsys)
    assert rc == 0, err
    assert snapshot(ws.run) == before
    meta = json.loads((ws.sae / "train.json").read_text())
    assert meta["final"] is not None and meta["final"]["step"] == 8
    # the same command again without --resume retrains, to the same bytes (deterministic)
    rc, _, err = run_cli(["train", "--cache", str(ws.cache), *TRAIN, *TOKENS, "--out", str(ws.run)], capsys)
    assert rc == 0, err
    assert snapshot(ws.run) == before


def test_report_marks_unfinished_saes(ws: Workspace, tmp_path, capsys):
    from sasa.trainer import MemberConfig, TrainConfig, train

    cfg = TrainConfig(cache=str(ws.cache), members=[MemberConfig("synthetic", {"groups": 8, "rank": 2, "top_s": 2})],
                      tokens=4096, batch_size=256, log_every=2, device="cpu")
    run = tmp_path / "run"
    train(cfg, run, until_step=6, progress=False)  # stops as a preemption would: no SAE saved
    shutil.copytree(ws.sae, run / "finished")
    rc, out, err = run_cli(["report", "--sweep", str(run), "--out", str(tmp_path / "r.html")], capsys)
    assert rc == 0, err
    name = cfg.members[0].name
    assert "1 of 2 SAE(s) did not finish" in out and f"{name} (step 6 of 16)" in out
    html = (tmp_path / "r.html").read_text()
    assert f"{name} (unfinished, step 6 of 16)" in html and "finished (unfinished" not in html


def test_save_sae_is_atomic(ws: Workspace, tmp_path):
    """Saving over an SAE leaves no temporaries, and the state a crash between the renames
    leaves (weights without config.json) is refused, not loaded."""
    from sasa.trainer import SAE, SAEConfig, load_sae, save_sae

    folder = shutil.copytree(ws.sae, tmp_path / "sae")
    new = SAE(SAEConfig(d_in=16, groups=4, rank=2, top_s=1), seed=3)
    save_sae(new, folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in ws.sae.iterdir())
    assert load_sae(folder).cfg.groups == 4
    (folder / "config.json").unlink()
    with pytest.raises(SasaError, match="is not a saved SAE"):
        load_sae(folder)
