"""Checking every committed shard of a cache: checksums, shapes, finite values.

A problem is reported as one line naming the shard, the array and what to do; ``verify``
never modifies the cache. Damage anywhere (an array's metadata that no longer parses, a chunk
that no longer decodes, a chunk object that is gone) is reported, never raised: this is the
tool a user runs to find damage.
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from sasa.errors import SasaError
from sasa.store import layout as L
from sasa.store.cache import Cache
from sasa.store.stats import non_finite


def _short(err: Exception) -> str:
    if isinstance(err, SasaError):  # the store's own account (e.g. an absent chunk object)
        return str(err).split(";")[0]
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}"[:160]


def check_arrays(group, lay: L.Layout) -> list[str]:
    """Problems with the cache's arrays themselves: missing, metadata that does not parse,
    or a shape that does not match the layout."""
    expected = {L.TOKENS: (lay.n_seq, lay.ctx_len), L.COMMITTED: (lay.n_shards,),
                L.CHECKSUMS: (lay.n_shards, 1 + len(lay.hookpoints))}
    for hp, d in lay.hookpoints.items():
        expected[L.acts_path(hp)] = (lay.n_rows, d)
        expected[L.norms_path(hp)] = (lay.n_rows,)
        for name in ("count", "mean", "m2"):
            expected[L.stats_path(hp, name)] = (lay.n_shards, d) if name != "count" else (lay.n_shards,)
    problems = []
    for path, shape in expected.items():
        try:
            array = group[path]
        except KeyError:
            problems.append(f"array {path} is missing; the cache is damaged, re-harvest it")
            continue
        except Exception as err:  # a torn or edited zarr.json
            problems.append(f"array {path}: its metadata ({path}/zarr.json) is damaged ({_short(err)}); "
                            "restore the file from a copy, or re-harvest the cache")
            continue
        if array.shape != shape:
            problems.append(f"array {path} has shape {array.shape}, expected {shape}; the cache is "
                            "damaged, re-harvest it")
    return problems


def refuse_damaged(cache: Cache) -> None:
    """Raise the first problem ``check_arrays`` finds, as one line (commands that read a cache
    call it after opening one; ``sasa info --verify`` lists every problem instead)."""
    damaged = check_arrays(cache.group, cache.layout)
    if damaged:
        raise SasaError(f"{damaged[0]} (run `sasa info --verify {cache.url}` for every problem)")


def verify(cache: Cache, progress: bool = True) -> list[str]:
    """Problems found in the arrays and the committed shards (empty when the cache is sound)."""
    lay = cache.layout
    problems = check_arrays(cache.group, lay)
    if problems:
        return problems

    try:
        crc_table = cache.group[L.CHECKSUMS][:]
    except Exception as err:
        return [f"array {L.CHECKSUMS} cannot be read ({_short(err)}); the cache is damaged, re-harvest it"]
    names = [L.TOKENS] + [L.acts_path(hp) for hp in lay.hookpoints]
    fix = "re-harvest it: delete the object shards/committed/c/{s} and rerun the harvest command"
    for s in tqdm(cache.committed_shards(), desc="verify", unit="shard", disable=not progress):
        blocks = {}
        try:
            blocks[L.TOKENS] = cache.tokens[s * lay.shard_seqs:(s + 1) * lay.shard_seqs]
            for hp in lay.hookpoints:
                blocks[L.acts_path(hp)] = cache.acts(hp)[s * lay.shard_rows:(s + 1) * lay.shard_rows]
        except Exception as err:  # a chunk that no longer decodes; report, keep checking
            problems.append(f"shard {s}: cannot read {names[len(blocks)]} ({_short(err)}); "
                            f"{fix.format(s=s)}")
            continue
        for j, name in enumerate(names):
            got = L.crc32(np.ascontiguousarray(blocks[name]))
            if got != int(crc_table[s, j]):
                problems.append(f"shard {s}: {name} checksum mismatch (stored {int(crc_table[s, j]):#010x}, "
                                f"data {got:#010x}): its chunk objects were modified or corrupted; {fix.format(s=s)}")
        for hp in lay.hookpoints:
            bad = non_finite(blocks[L.acts_path(hp)], lay.dtype)
            if bad:
                problems.append(f"shard {s}: {L.acts_path(hp)} holds {bad} NaN/Inf values; {fix.format(s=s)}")
    return problems
