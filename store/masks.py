"""Which rows a read leaves out: special tokens and, on request, high-norm rows.

Nothing is deleted from a cache: every position of every sequence is stored, and readers drop
rows at read time, so one cache serves every exclusion policy. An exclusion is a tuple of
kinds (``Cache.batches(..., exclude=...)``, ``TrainConfig.exclude``, ``EvalConfig.exclude``):

- a special-token kind the producer recorded in ``attrs["special_token_ids"]`` (``"bos"``,
  ``"pad"``, ...): rows whose token id is one of that kind's ids;
- ``"high_norm"`` or ``"high_norm:K"``: rows whose L2 norm (from ``norms/<hp>``) exceeds K times
  the hookpoint's median norm (``Cache.stats(hp)``, BOS and padding excluded; K defaults to
  ``HIGH_NORM_FACTOR``). Outlier rows with norms tens of times the median (attention sinks,
  "massive activations") otherwise dominate an MSE loss. When several hookpoints are read
  together, a row is dropped if it is high-norm in any of them, so the rows stay aligned.

This module is shared by the writer (statistics skip BOS and padding) and the readers; it
reads nothing itself.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from sasa.errors import SasaError

HIGH_NORM = "high_norm"
#: Default K of ``high_norm``: rows above 10x the median norm.
HIGH_NORM_FACTOR = 10.0


class Exclusion(NamedTuple):
    """A parsed exclusion policy."""

    special: tuple[str, ...]
    """Special-token kinds to drop."""
    norm_factor: float | None
    """Drop rows with norm > norm_factor * median norm; None keeps them."""


def parse_exclude(exclude) -> Exclusion:
    """``("bos", "pad", "high_norm:8")`` -> Exclusion(("bos", "pad"), 8.0)."""
    if isinstance(exclude, str):
        exclude = (exclude,)
    special, factor = [], None
    for kind in exclude:
        kind = str(kind)
        if kind == HIGH_NORM or kind.startswith(HIGH_NORM + ":"):
            text = kind.partition(":")[2]
            try:
                factor = float(text) if text else HIGH_NORM_FACTOR
            except ValueError:
                factor = float("nan")
            if not factor > 1:
                raise SasaError(f"bad exclusion {kind!r}: write high_norm or high_norm:K with "
                                "K > 1 (a multiple of the median norm)")
        else:
            special.append(kind)
    return Exclusion(tuple(special), factor)


def special_mask(tokens_flat: np.ndarray, special_ids: dict, kinds) -> np.ndarray:
    """True for rows whose token is one of the special ids of the given kinds."""
    ids = [i for kind in kinds for i in special_ids.get(kind, [])]
    if not ids:
        return np.zeros(tokens_flat.shape, dtype=bool)
    return np.isin(tokens_flat, np.asarray(ids, dtype=tokens_flat.dtype))


def high_norm_mask(norms_HN: np.ndarray, medians_H, factor: float) -> np.ndarray:
    """True for rows whose norm exceeds ``factor`` x its hookpoint's median in any hookpoint.

    ``norms_HN``: [hookpoints, rows] norms; ``medians_H``: each hookpoint's median norm."""
    limits_H1 = factor * np.asarray(medians_H, dtype=np.float64)[:, None]
    return np.any(norms_HN > limits_H1, axis=0)
