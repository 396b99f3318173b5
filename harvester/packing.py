"""Tokenise documents and pack them into fixed-length sequences, deterministically.

Packing (no padding) keeps every position a real token, so nothing is wasted and the cache
needs no pad mask in practice. Documents are joined into one stream with a separator token
(EOS, else SEP) between them, and the stream is cut into ``ctx_len`` sequences under one of
three BOS policies, recorded in the cache:

- ``seq``: every sequence is ``[BOS] + ctx_len-1 stream tokens`` (BOS, or CLS for encoders):
  position 0 is always the same attention sink, which a read-time ``bos`` mask drops.
- ``doc``: BOS goes before every document and the stream is cut anywhere.
- ``none``: no BOS at all.

The tail that does not fill a whole shard is dropped: the cache holds whole shards only.
Packing runs on the driver, before any worker starts, because the cache's size must be known
when it is created; a fast tokenizer packs well over 100k tokens/s, which no forward pass
outruns, and the packed int32 ids cost 4 bytes a token in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from sasa.harvester.corpus import DocumentSource
from sasa.errors import SasaError

_TOKENIZE_BATCH = 256  # documents per tokenizer call (the fast tokenizer batches in Rust)


class SpecialTokens(NamedTuple):
    bos: int | None
    sep: int | None
    pad: int | None

    def attrs(self, policy: str) -> dict:
        """``special_token_ids`` for the cache: the read-time masks."""
        ids = lambda x: [] if x is None else [int(x)]  # noqa: E731
        return {"bos": ids(self.bos) if policy != "none" else [], "sep": ids(self.sep),
                "pad": ids(self.pad)}


class Packed(NamedTuple):
    tokens_NC: np.ndarray     # int32 [n_seq, ctx_len]
    n_source_tokens: int      # document tokens read from the source (some possibly unused)
    shard_seqs: int           # sequences per shard, possibly reduced to fit a small dataset


def special_tokens(tokenizer) -> SpecialTokens:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    return SpecialTokens(bos, sep, tokenizer.pad_token_id)


def tokenize(texts: Iterable, tokenizer) -> Iterator[list[int]]:
    """Token ids of each document, without special tokens."""
    batch: list[str] = []

    def flush():
        out = tokenizer(batch, add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False, verbose=False)["input_ids"]
        batch.clear()
        return out
    for text in texts:
        if not isinstance(text, str):
            raise SasaError(f"expected text documents, got a {type(text).__name__}; a column of "
                            "token ids must be named input_ids")
        if text:
            batch.append(text)
        if len(batch) >= _TOKENIZE_BATCH:
            yield from flush()
    if batch:
        yield from flush()


def _checked_ids(docs: Iterable, vocab_size: int) -> Iterator[list[int]]:
    for doc in docs:
        ids = [int(i) for i in doc]
        if ids and (min(ids) < 0 or max(ids) >= vocab_size):
            raise SasaError(f"input_ids hold token id {max(ids) if max(ids) >= vocab_size else min(ids)}"
                            f" outside the model's vocabulary [0, {vocab_size}); tokenise with "
                            "this model's tokenizer")
        yield ids


def pack(docs: Iterable[list[int]], *, ctx_len: int, n_seq: int, policy: str,
         special: SpecialTokens, progress: bool = False) -> tuple[np.ndarray, int]:
    """Up to ``n_seq`` packed sequences from a stream of token-id documents, and how many
    document tokens were read."""
    if policy in ("seq", "doc") and special.bos is None:
        raise SasaError(f"the tokenizer has no BOS or CLS token for --bos {policy}; "
                        "pass --bos none")
    body = ctx_len - 1 if policy == "seq" else ctx_len
    out = np.empty((n_seq, ctx_len), dtype=np.int32)
    buf: list[int] = []
    pos, n, n_ids = 0, 0, 0  # buf[pos:] is not packed yet; compacted now and then, not per row
    bar = tqdm(total=n_seq * ctx_len, unit="tok", unit_scale=True, desc="tokenising",
               disable=not progress, leave=False)
    for ids in docs:
        n_ids += len(ids)
        if policy == "doc":
            buf.append(special.bos)
        buf.extend(ids)
        if policy != "doc" and special.sep is not None:
            buf.append(special.sep)
        while len(buf) - pos >= body and n < n_seq:
            if policy == "seq":
                out[n, 0] = special.bos
                out[n, 1:] = buf[pos:pos + body]
            else:
                out[n] = buf[pos:pos + body]
            pos += body
            n += 1
            bar.update(ctx_len)
        if n == n_seq:
            break
        if pos >= 1 << 16:
            del buf[:pos]
            pos = 0
    bar.close()
    return out[:n], n_ids


def pack_source(source: DocumentSource, tokenizer, *, ctx_len: int, n_seq: int, shard_seqs: int,
                policy: str, progress: bool = False) -> Packed:
    """Tokenise and pack ``source`` into whole shards of ``shard_seqs`` sequences.

    A dataset smaller than one shard gets a single shard of everything it has.
    """
    docs = source.documents()
    ids = (_checked_ids(docs, len(tokenizer)) if source.kind == "input_ids"
           else tokenize(docs, tokenizer))
    special = special_tokens(tokenizer)
    tokens, n_ids = pack(ids, ctx_len=ctx_len, n_seq=n_seq, policy=policy, special=special,
                         progress=progress)
    if n_ids == 0:
        raise SasaError(f"dataset {source.name!r} is empty: it yields no tokens")
    if len(tokens) == 0:
        raise SasaError(f"dataset {source.name!r} yields fewer tokens than one sequence of "
                        f"ctx_len={ctx_len}; pass a smaller --ctx-len or more data")
    shard_seqs = min(shard_seqs, len(tokens))
    keep = len(tokens) // shard_seqs * shard_seqs
    return Packed(np.ascontiguousarray(tokens[:keep]), n_ids, shard_seqs)
