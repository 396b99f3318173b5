"""Splice-in scores on a tiny random GPT-2: 1 for an identity reconstruction, 0 for zero ablation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sasa.analysis.splice import is_causal_lm, load_causal_lm, sae_reconstruct, splice_scores
from sasa.errors import SasaError
from sasa.trainer import SAE, SAEConfig


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(1, 64, size=(6, 12))


@pytest.mark.parametrize("hookpoint", ["resid_post.0", "resid_pre.1", "mlp_out.0", "attn_out.1"])
def test_identity_scores_one_and_zero_ablation_scores_zero(gpt2_dir, tokens, hookpoint):
    lm = load_causal_lm(gpt2_dir)
    ident = splice_scores(lm, hookpoint, lambda x: x, tokens, batch_size=4)
    assert ident.ce_score == pytest.approx(1.0, abs=1e-6) and ident.kl_score == pytest.approx(1.0, abs=1e-6)
    assert ident.ce_sae == pytest.approx(ident.ce_clean, abs=1e-6) and ident.kl_sae == pytest.approx(0, abs=1e-7)
    zero = splice_scores(lm, hookpoint, torch.zeros_like, tokens, batch_size=4)
    assert zero.ce_score == pytest.approx(0.0, abs=1e-6) and zero.kl_score == pytest.approx(0.0, abs=1e-6)
    assert zero.kl_zero > 0 and zero.ce_zero != zero.ce_clean
    assert zero.n_tokens == tokens.size - len(tokens)  # next-token targets


def test_kept_positions_and_an_sae_in_between(gpt2_dir, tokens):
    lm = load_causal_lm(gpt2_dir)
    keep = np.ones_like(tokens, dtype=bool)
    keep[:, 0] = False  # a BOS-like position keeps its clean activation
    r = splice_scores(lm, "resid_post.0", torch.zeros_like, tokens, keep_NT=keep)
    full = splice_scores(lm, "resid_post.0", torch.zeros_like, tokens)
    assert r.ce_zero != full.ce_zero
    sae = SAE(SAEConfig(d_in=32, groups=16, rank=2, top_s=4), seed=0).eval()
    s = splice_scores(lm, "resid_post.0", sae_reconstruct(sae), tokens)
    assert np.isfinite(s.ce_score) and np.isfinite(s.kl_score) and s.kl_sae > 0


def test_encoders_are_refused(tmp_path):
    from transformers import BertConfig, BertModel
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=64)).save_pretrained(tmp_path)
    assert not is_causal_lm(str(tmp_path))
    with pytest.raises(SasaError, match="not a causal LM"):
        load_causal_lm(str(tmp_path))
