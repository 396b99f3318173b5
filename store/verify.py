"""Checking every committed shard of a cache: checksums, shapes, finite values.

A problem is reported as one line naming the shard, the array and what to do; ``verify``
never modifies the cache.
"""

from __future__ import annotations

import zlib

import numpy as np
from tqdm.auto import tqdm

from sasa.store import layout as L
from sasa.store.cache import Cache
from sasa.store.writer import non_finite


def verify(cache: Cache, progress: bool = True) -> list[str]:
    """Problems found in the committed shards (empty when the cache is sound)."""
    lay = cache.layout
    problems = []
    expected = {L.TOKENS: (lay.n_seq, lay.ctx_len)}
    for hp, d in lay.hookpoints.items():
        expected[L.acts_path(hp)] = (lay.n_rows, d)
        expected[L.norms_path(hp)] = (lay.n_rows,)
    for path, shape in expected.items():
        if path not in cache.group:
            problems.append(f"array {path} is missing; the cache is damaged, re-harvest it")
        elif cache.group[path].shape != shape:
            problems.append(f"array {path} has shape {cache.group[path].shape}, expected {shape}")
    if problems:
        return problems

    crc_table = cache.group[L.CHECKSUMS][:]
    names = [L.TOKENS] + [L.acts_path(hp) for hp in lay.hookpoints]
    fix = "re-harvest it: delete the object shards/committed/c/{s} and rerun the harvest command"
    for s in tqdm(cache.committed_shards(), desc="verify", unit="shard", disable=not progress):
        blocks = {}
        try:
            blocks[L.TOKENS] = cache.tokens[s * lay.shard_seqs:(s + 1) * lay.shard_seqs]
            for hp in lay.hookpoints:
                blocks[L.acts_path(hp)] = cache.acts(hp)[s * lay.shard_rows:(s + 1) * lay.shard_rows]
        except Exception as err:  # a chunk that no longer decodes; report, keep checking
            problems.append(f"shard {s}: cannot decode {names[len(blocks)]} ({type(err).__name__}: "
                            f"{err}); {fix.format(s=s)}")
            continue
        for j, name in enumerate(names):
            got = zlib.crc32(np.ascontiguousarray(blocks[name]))
            if got != int(crc_table[s, j]):
                problems.append(f"shard {s}: {name} checksum mismatch (stored {int(crc_table[s, j]):#010x}, "
                                f"data {got:#010x}): its chunk objects were modified or corrupted; {fix.format(s=s)}")
        for hp in lay.hookpoints:
            bad = non_finite(blocks[L.acts_path(hp)], lay.dtype)
            if bad:
                problems.append(f"shard {s}: {L.acts_path(hp)} holds {bad} NaN/Inf values; {fix.format(s=s)}")
    return problems
