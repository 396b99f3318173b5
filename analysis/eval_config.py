"""The settings of one ``sasa eval`` (a light module: the CLI reads its defaults from here
without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sasa.errors import SasaError
from sasa.fields import check_fields
from sasa.store.options import DEFAULT_EXCLUDE


@dataclass
class EvalConfig:
    """One evaluation of one SAE on one cache."""

    cache: str
    """Cache URL (opened read-only)."""
    sae: str
    """Folder of a trained SAE: ours, or a SAELens or sparsify one (``sasa.interop.foreign``)."""
    hookpoint: str | None = None
    """Hookpoint to evaluate on; default: the one in the SAE's train.json, or the cache's only one."""
    tokens: int | None = 1 << 20
    """Tokens to evaluate (the cache's first rows, BOS/padding excluded); capped at the cache.
    None: every committed row (the only setting for a pass over Ray workers)."""
    batch_size: int = 4096
    """Tokens per forward."""
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    """Rows left out, as in training (special-token kinds, ``high_norm[:K]``; ``sasa.store.masks``)."""
    contexts: int = 8
    """Top contexts kept per group (0: none)."""
    window: int = 8
    """Tokens shown on each side of a context's token."""
    tokenizer: str | None = None
    """Tokenizer (model folder or name) to decode contexts; default: the one the cache names."""
    view_tokens: int = 16384
    """Tokens whose codes are kept for the 2-D views of groups (r >= 2)."""
    view_groups: int = 6
    """Groups shown in 2-D (the most active ones)."""
    synth_samples: int = 4096
    """Tokens scored against the ground truth of a synthetic cache."""
    splice_seqs: int = 32
    """Sequences for the splice-in scores (causal LMs only; 0: skip)."""
    model: str | None = None
    """Model for splice-in and absorption; default: the model the cache was harvested from."""
    absorption: bool = False
    """Also run the first-letter absorption eval (loads the model)."""
    device: str = "cpu"
    """Where the SAE runs: cpu, cuda, auto."""
    out: str | None = None
    """eval.json path; default <sae>/eval.json (contexts/codes Parquet files go beside it)."""
    storage_options: dict | None = field(default=None, repr=False)
    """fsspec options for the cache (never saved)."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self):
        check_fields(self)
        for key in ("tokens", "batch_size"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise SasaError(f"{key} must be positive, got {getattr(self, key)}")
        for key in ("contexts", "window", "view_tokens", "synth_samples", "splice_seqs"):
            if getattr(self, key) < 0:
                raise SasaError(f"{key} must be >= 0, got {getattr(self, key)}")
        self.exclude = tuple(self.exclude)

    @property
    def out_path(self) -> Path:
        return Path(self.out) if self.out else Path(self.sae) / "eval.json"
