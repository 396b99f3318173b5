"""SAEs that travel: our exports loaded by the real SAELens and sparsify, theirs scored by sasa eval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from sasa.analysis.synth import write_synthetic_cache
from sasa.analysis.synthetic import SyntheticSpec
from sasa.cli import main
from sasa.errors import SasaError
from sasa.interop import export_sae, load_any_sae
from sasa.store import open_cache
from sasa.trainer import SAE, SAEConfig, load_sae, save_sae

torch.set_num_threads(1)
D = 16
SPEC = SyntheticSpec(d=D, features_per_dim={1: 4, 2: 4}, mean_active=2.0)

# name -> our config; every exportable kind: SASA (token and batch gate, and the threshold a
# batch gate late in training leaves), TopK (the native SAELens/sparsify one, and the batch-gate
# and threshold ones that need the sasa architecture), ReLU.
OURS = {
    "sasa": dict(arch="sasa", groups=6, rank=3, top_s=2),
    "sasa-batch": dict(arch="sasa", groups=6, rank=2, top_s=2, gate="batch", codes="relu"),
    "topk": dict(arch="topk", groups=24, top_s=4, nuc_lambda=1e-3, auxk_alpha=0.05),
    "topk-batch": dict(arch="topk", groups=24, top_s=4, gate="batch"),
    "sasa-late": dict(arch="sasa", groups=6, rank=3, top_s=2, batch_gate_from=0.8),
    "topk-late": dict(arch="topk", groups=24, top_s=4, batch_gate_from=0.8),
    "relu": dict(arch="relu", groups=24, l1_coeff=3e-3),
}
SAELENS_ARCH = {"sasa": "sasa", "sasa-batch": "sasa", "topk": "topk", "topk-batch": "sasa",
                "sasa-late": "sasa", "topk-late": "sasa", "relu": "standard"}


class Ran(NamedTuple):
    returncode: int
    stderr: str


@pytest.fixture
def cli(capsys):
    """Run the sasa command in this process (the libraries are imported once per session)."""
    def run(*args) -> Ran:
        capsys.readouterr()
        code = main([str(a) for a in args])
        return Ran(code, capsys.readouterr().err)
    return run


def make_ours(name: str, folder: Path, seed: int = 0) -> Path:
    """A saved SAE of ours with non-zero biases (so b_dec / b_enc placement is tested)."""
    sae = SAE(SAEConfig(d_in=D, **OURS[name]), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_dec_D.copy_(torch.randn(D, generator=gen))
        sae.b_enc_GR.copy_(0.1 * torch.randn(sae.b_enc_GR.shape, generator=gen))
        sae.W_enc_GRD.add_(0.3 * torch.randn(sae.W_enc_GRD.shape, generator=gen))
        sae.tokens_since_fired_G.copy_(torch.arange(sae.cfg.groups))
        if sae.cfg.batch_gate_from is not None:  # trained: a threshold some groups reach
            score = sae.pre_codes(x_random()).square().sum(-1)
            sae.gate_threshold.fill_(float(score.flatten().quantile(0.8)))
    save_sae(sae, folder)
    (folder / "train.json").write_text(json.dumps({"member": {"name": folder.name, "hookpoint": "resid_post.2"}}))
    return folder


def x_random(n=64, seed=7) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


@pytest.fixture(scope="module")
def cache_url(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("syn") / "cache")
    write_synthetic_cache(url, spec=SPEC, n_tokens=2048, ctx_len=16, shard_seqs=64, progress=False)
    return url


@pytest.mark.parametrize("name", list(OURS))
def test_saelens_loads_our_export_and_computes_what_we_compute(name, tmp_path):
    import sae_lens

    import sasa.interop.saelens_sasa  # noqa: F401  (registers the sasa architecture)

    ours = load_sae(make_ours(name, tmp_path / name))
    out = export_sae(tmp_path / name, "saelens", tmp_path / "exp", model="gpt2")
    theirs = sae_lens.SAE.load_from_disk(out)
    assert theirs.cfg.architecture() == SAELENS_ARCH[name]
    assert theirs.cfg.metadata.model_name == "gpt2" and theirs.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    # the config fields SAELens itself writes for this architecture, no more, no fewer
    written = json.loads((out / "cfg.json").read_text())
    assert set(theirs.cfg.to_dict()) == set(written)
    x = x_random()
    with torch.no_grad():
        mine = ours(x)
        z = theirs.encode(x)
        torch.testing.assert_close(z, mine.codes_BGR.reshape(len(x), -1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(z), mine.x_hat_BD, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(x), mine.x_hat_BD, rtol=1e-5, atol=1e-5)
        assert (z != 0).sum() > 0
        # [batch, pos, d], as HookedSAETransformer hands activations over
        torch.testing.assert_close(theirs.encode(x.reshape(4, 16, D)), z.reshape(4, 16, -1), rtol=1e-5, atol=1e-5)


def test_sparsify_loads_our_topk_export_and_computes_what_we_compute(tmp_path):
    from sparsify import SparseCoder

    ours = load_sae(make_ours("topk", tmp_path / "topk"))
    out = export_sae(tmp_path / "topk", "sparsify", tmp_path / "exp")
    theirs = SparseCoder.load_from_disk(out)
    written = json.loads((out / "cfg.json").read_text())
    assert set(theirs.cfg.to_dict()) | {"d_in"} == set(written)
    x = x_random()
    with torch.no_grad():
        mine = ours(x)
        enc = theirs.encode(x)
        dense = torch.zeros(len(x), theirs.num_latents).scatter_(1, enc.top_indices, enc.top_acts)
        torch.testing.assert_close(dense, mine.codes_BGR.reshape(len(x), -1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(enc.top_acts, enc.top_indices), mine.x_hat_BD, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(x).sae_out, mine.x_hat_BD, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("to,names", [("saelens", list(OURS)), ("sparsify", ["topk"])])
def test_export_then_import_round_trip_is_exact(to, names, tmp_path):
    for name in names:
        folder = make_ours(name, tmp_path / name)
        ours = load_sae(folder)
        back = load_any_sae(export_sae(folder, to, tmp_path / to / name))
        assert back.sae.cfg == ours.cfg and type(back.sae) is SAE
        assert back.info["member"]["hookpoint"] == "resid_post.2"
        theirs, mine = back.sae.state_dict(), ours.state_dict()
        for key in ("W_enc_GRD", "b_enc_GR", "W_dec_GRD", "b_dec_D", "gate_threshold"):
            assert torch.equal(theirs[key], mine[key]), (name, key)


def test_sparsify_refuses_what_it_cannot_express_in_one_line(tmp_path, cli):
    for name, word in (("sasa", "SASA"), ("relu", "TopK only"), ("topk-batch", "gate=batch"),
                       ("topk-late", "batch_gate_from")):
        folder = make_ours(name, tmp_path / name)
        with pytest.raises(SasaError, match=word):
            export_sae(folder, "sparsify", tmp_path / "out" / name)
    r = cli("export", str(tmp_path / "topk-batch"), str(tmp_path / "sasa"), "--to", "sparsify",
            "--out", str(tmp_path / "cli"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "sparsify" in r.stderr
    assert not (tmp_path / "cli").exists()  # refused before anything was written


def library_fvu(cache_url: str, hookpoint: str, forward, tokens: int) -> float:
    """FVU of ``forward`` over the rows sasa eval reads (the cache's first, BOS/pad excluded)."""
    cache = open_cache(cache_url)
    xs, done = [], 0
    for batch in cache.batches(hookpoint, 512, shuffle=False, epochs=1, exclude=("bos", "pad")):
        xs.append(batch[: tokens - done])
        done += len(xs[-1])
        if done >= tokens:
            break
    x = torch.cat(xs).float()
    with torch.no_grad():
        x_hat = forward(x)
    x, x_hat = x.double(), x_hat.double()
    return float((x - x_hat).square().sum() / (x - x.mean(0)).square().sum())


def saelens_made(arch: str, folder: Path) -> Path:
    """An SAE that SAELens makes and saves itself (random init, biases perturbed)."""
    import sae_lens as sl

    torch.manual_seed(0)
    if arch == "batchtopk":  # a training checkpoint: SAELens saves these as architecture batchtopk
        sae = sl.BatchTopKTrainingSAE(sl.BatchTopKTrainingSAEConfig(d_in=D, d_sae=32, k=3))
        sae.topk_threshold.fill_(0.05)
    else:
        make = {"standard": (sl.StandardSAE, sl.StandardSAEConfig, {}),
                "topk": (sl.TopKSAE, sl.TopKSAEConfig, {"k": 3}),
                "jumprelu": (sl.JumpReLUSAE, sl.JumpReLUSAEConfig, {})}
        cls, cfg_cls, kw = make[arch]
        sae = cls(cfg_cls(d_in=D, d_sae=32, **kw))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
        if arch == "jumprelu":
            sae.threshold.uniform_(0, 0.2)
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    sae.save_model(folder)
    return folder


def test_saelens_and_sparsify_made_saes_evaluate_to_their_own_fvu(cache_url, tmp_path, cli):
    import sae_lens as sl
    from sparsify import SparseCoder, SparseCoderConfig

    hp, tokens = "synthetic", 1536
    runs = tmp_path / "foreign"
    folders = {arch: saelens_made(arch, runs / f"saelens-{arch}") for arch in ("standard", "topk", "jumprelu")}
    torch.manual_seed(1)
    coder = SparseCoder(D, SparseCoderConfig(num_latents=32, k=3))
    with torch.no_grad():
        coder.b_dec.normal_()
    coder.save_to_disk(runs / "sparsify-topk")
    folders["sparsify"] = runs / "sparsify-topk"
    forwards = {arch: sl.SAE.load_from_disk(f) for arch, f in folders.items() if arch != "sparsify"}
    forwards["sparsify"] = lambda x: SparseCoder.load_from_disk(folders["sparsify"])(x).sae_out

    r = cli("eval", "--cache", cache_url, "--sae", str(runs), "--hookpoint", hp, "--tokens", str(tokens),
            "--splice-seqs", "0", "--no-progress")
    assert r.returncode == 0, r.stderr
    for arch, folder in folders.items():
        report = json.loads((folder / "eval.json").read_text())
        assert report["n_tokens"] == tokens
        assert report["fvu"] == pytest.approx(library_fvu(cache_url, hp, forwards[arch], tokens), rel=1e-5)
        assert report["source"] == ("sparsify:topk" if arch == "sparsify" else f"saelens:{arch}")
        assert report["synthetic"]["n_samples"] > 0  # splitting / recovery against the planted truth
    r = cli("report", "--sweep", str(runs), "--out", str(tmp_path / "report.html"))
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "report.html").read_text()
    assert all(f.name in page for f in folders.values())


def test_a_saelens_sae_splices_into_a_causal_lm_as_saelens_runs_it(tmp_path):
    import numpy as np
    import sae_lens as sl
    from transformers import GPT2Config, GPT2LMHeadModel

    from sasa.analysis.evaluate import EvalConfig, evaluate
    from sasa.analysis.splice import load_causal_lm, splice_scores
    from sasa.store import create_cache

    torch.manual_seed(0)
    lm_dir = tmp_path / "lm"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=D, n_head=2, vocab_size=64, n_positions=16)).save_pretrained(lm_dir)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 64, (64, 16)).astype(np.int32)
    ids[:, 0] = 0  # BOS
    url = str(tmp_path / "cache")
    w = create_cache(url, hookpoints={"resid_post.0": D}, ctx_len=16, n_seq=64, shard_seqs=64, dtype="float32",
                     attrs={"harvest": {"config": {"model": str(lm_dir)}}, "special_token_ids": {"bos": [0], "pad": []}})
    w.write_shard(0, ids, {"resid_post.0": rng.standard_normal((1024, D)).astype(np.float32)})
    folder = saelens_made("jumprelu", tmp_path / "jumprelu")  # hook_name blocks.0.hook_resid_post
    ev = evaluate(EvalConfig(cache=url, sae=str(folder), progress=False, splice_seqs=4, contexts=0)).report
    assert ev["hookpoint"] == "resid_post.0"
    theirs = sl.SAE.load_from_disk(folder)
    ref = splice_scores(load_causal_lm(str(lm_dir)), "resid_post.0", lambda x: theirs(x.float()), ids[:4],
                        keep_NT=ids[:4] != 0)
    assert ev["splice"]["ce_score"] == pytest.approx(ref.ce_score, rel=1e-5)
    assert ev["splice"]["kl_score"] == pytest.approx(ref.kl_score, rel=1e-5)
    assert ev["splice"]["ce_sae"] != ev["splice"]["ce_clean"]


def test_batchtopk_checkpoint_imports_as_the_jumprelu_saelens_saves_for_inference(tmp_path):
    import sae_lens as sl

    folder = saelens_made("batchtopk", tmp_path / "ckpt")
    assert json.loads((folder / "cfg.json").read_text())["architecture"] == "batchtopk"
    trained = sl.BatchTopKTrainingSAE.load_from_disk(folder)
    trained.save_inference_model(tmp_path / "inference")
    theirs = sl.SAE.load_from_disk(tmp_path / "inference")
    assert theirs.cfg.architecture() == "jumprelu"
    ours = load_any_sae(folder)
    assert ours.info["source"] == "saelens:batchtopk" and ours.info["member"]["hookpoint"] == "resid_post.0"
    x = x_random()
    with torch.no_grad():
        mine = ours.sae(x)
        torch.testing.assert_close(mine.codes_BGR.reshape(len(x), -1), theirs.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.x_hat_BD, theirs(x), rtol=1e-5, atol=1e-5)
        assert 0 < (mine.codes_BGR != 0).sum() < mine.codes_BGR.numel()


def test_a_pre_6_saelens_topk_config_reads_as_saelens_reads_it(tmp_path):
    import sae_lens as sl

    folder = saelens_made("topk", tmp_path / "old")
    (folder / "cfg.json").write_text(json.dumps({  # SAELens 5.x: flat, activation_fn_str, hook_point
        "d_in": D, "d_sae": 32, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "hook_point": "blocks.0.hook_resid_post", "hook_point_head_index": None,
        "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3}, "model_name": "gpt2"}))
    theirs = sl.SAE.load_from_disk(folder)
    ours = load_any_sae(folder)
    assert theirs.cfg.architecture() == "topk" and ours.sae.cfg.top_s == 3
    assert ours.info == {"member": {"name": "old", "hookpoint": "resid_post.0"}, "source": "saelens:topk"}
    x = x_random()
    with torch.no_grad():
        torch.testing.assert_close(ours.sae(x).x_hat_BD, theirs(x), rtol=1e-5, atol=1e-5)


def test_unknown_or_mismatched_folders_fail_in_one_line(cache_url, tmp_path, cli):
    import sae_lens as sl

    wide = sl.TopKSAE(sl.TopKSAEConfig(d_in=D + 1, d_sae=8, k=2))
    wide.save_model(tmp_path / "wide")
    gated = sl.GatedSAE(sl.GatedSAEConfig(d_in=D, d_sae=8))
    gated.save_model(tmp_path / "gated")
    saelens_made("topk", tmp_path / "noweights")
    (tmp_path / "noweights" / "sae_weights.safetensors").unlink()
    (tmp_path / "empty").mkdir()
    cases = {"wide": "width 17", "gated": "'gated' has no sasa equivalent", "noweights": "no weights",
             "empty": "neither a saved SAE"}
    for name, message in cases.items():
        r = cli("eval", "--cache", cache_url, "--sae", str(tmp_path / name), "--hookpoint", "synthetic",
                "--tokens", "256", "--splice-seqs", "0", "--no-progress")
        assert r.returncode == 2 and r.stderr.count("\n") == 1, (name, r.stderr)
        assert message in r.stderr, (name, r.stderr)


def test_loading_foreign_folders_imports_neither_library(tmp_path):
    saelens_made("jumprelu", tmp_path / "jumprelu")
    code = ("import sys; import sasa.cli, sasa.analysis.evaluate; from sasa.interop import load_any_sae; "
            f"load_any_sae({str(tmp_path / 'jumprelu')!r}); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'sae_lens', 'sparsify', 'transformer_lens'}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
