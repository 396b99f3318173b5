"""Configs of a training run: the run's shared settings and the SAEs it trains.

A run (``sasa train`` or ``sasa sweep``) reads one cache once and feeds every batch to every
member; the members differ in architecture, width, r, s/k, lambda, lr and hookpoint. The
resolved config is saved as JSON beside the outputs; storage options (credentials) never are.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from sasa.errors import SasaError
from sasa.fields import check_fields, coerce_mapping
from sasa.store.options import DEFAULT_EXCLUDE
from sasa.trainer.sae_config import SAEConfig

SAE_FIELDS = {f.name for f in dataclasses.fields(SAEConfig)}
#: d_in used to check an SAE's settings before the cache (and so its width) is known.
UNKNOWN_WIDTH = 1 << 30


@dataclass
class MemberConfig:
    """One SAE of a run."""

    hookpoint: str
    """Hookpoint of the cache it trains on."""
    sae: dict
    """SAEConfig fields: arch, groups, rank, top_s, ... d_in may be left out (it is the cache's
    width); when given it must match the cache."""
    lr: float | None = None
    """Adam learning rate. Default 2e-4 / sqrt(n / 2^14), n = groups * rank (docs/sasa.md)."""
    name: str | None = None
    """Output folder name; default built from the settings, e.g. sasa-resid_post.3-G512-r4-s8."""
    seed: int | None = None
    """Seed of this SAE's initialisation. Default: the run's ``seed``. Never depends on the
    member's place in the sweep, so an SAE trains to the same weights alone or in any sweep."""

    def __post_init__(self):
        check_fields(self)
        unknown = set(self.sae) - SAE_FIELDS
        if unknown:
            raise SasaError(f"unknown SAE setting(s) {sorted(unknown)}; known: {', '.join(sorted(SAE_FIELDS))}")
        if "groups" not in self.sae:
            raise SasaError(f"SAE on {self.hookpoint} needs 'groups' (the number of groups or latents)")
        self.sae = coerce_mapping(SAEConfig, self.sae)
        if self.lr is not None and not self.lr > 0:
            raise SasaError(f"lr must be positive, got {self.lr}")
        # Every setting is checked now, before any cache is opened; the real d_in comes later.
        cfg = SAEConfig(**{"d_in": UNKNOWN_WIDTH, **self.sae})
        if self.name is None:
            parts = [cfg.arch, self.hookpoint, f"G{cfg.groups}"]
            if cfg.arch == "sasa":
                parts.append(f"r{cfg.rank}")
            if cfg.arch != "relu":
                parts.append(f"s{cfg.top_s}")
            if cfg.nuc_lambda:
                parts.append(f"nuc{cfg.nuc_lambda:g}")
            if cfg.arch == "relu":
                parts.append(f"l1{cfg.l1_coeff:g}")
            self.name = "-".join(str(p) for p in parts)
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise SasaError(f"SAE name {self.name!r} cannot be a folder name")

    def init_seed(self, run_seed: int) -> int:
        """The seed of this SAE's initialisation (its own ``seed``, else the run's)."""
        return run_seed if self.seed is None else self.seed

    def sae_config(self, d_in: int) -> SAEConfig:
        if self.sae.get("d_in", d_in) != d_in:
            raise SasaError(f"SAE {self.name} has d_in={self.sae['d_in']} but {self.hookpoint} in the "
                            f"cache has width {d_in}; drop d_in or pick the matching hookpoint")
        return SAEConfig(**{**self.sae, "d_in": d_in})

    def resolved_lr(self, sae_cfg: SAEConfig) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(sae_cfg.n_coords / 2**14)


@dataclass
class TrainConfig:
    """Settings shared by every SAE of a run."""

    cache: str
    """Cache URL (a folder or any fsspec URL)."""
    members: list[MemberConfig]
    """The SAEs to train, all from the same read pass."""
    tokens: int = 10_000_000
    """Training tokens per SAE (rows after BOS/padding exclusion; epochs repeat as needed)."""
    batch_size: int = 4096
    """Tokens per step."""
    seed: int = 0
    """Seeds SAE initialisation and the reader's shuffle."""
    warmup_steps: int = 1000
    """Linear lr warm-up (capped at 10% of the steps for short runs)."""
    decay_frac: float = 0.2
    """Linear lr decay to 0 over this last fraction of the steps."""
    log_every: int = 50
    """Steps between metric lines (the only host syncs of the loop)."""
    checkpoint_every: int = 500
    """Steps between checkpoints (model, optimiser and reader state); 0 = only at the end."""
    nuc_every: int = 4
    """Apply the nuclear-norm penalty every k-th step with weight k * nuc_lambda: the same
    average pull on the singular values, while the batched SVDs (17-32% of a SASA step with
    r >= 2 when run every step, 5-11% at k = 4: bench/RESULTS_train.md, section 1) are paid
    once per k steps. 1 = every step."""
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    """Rows left out of training batches: special-token kinds, and ``"high_norm"`` /
    ``"high_norm:K"`` for rows above K (10) x the median norm (``sasa.store.masks``)."""
    shuffle_rows: int | None = None
    """Rows per shuffle window (default: about 1 GiB of activations)."""
    device: str = "auto"
    """"auto" (cuda when available), "cpu", "cuda", "cuda:1", ..."""
    cpu_threads: int | None = None
    """torch threads on CPU. Default: one core fewer than the machine has (at least 1), leaving a
    core for the reader; oversubscribed OpenMP threads spin and can make a step 10x slower."""
    autocast: bool = True
    """bf16 autocast of the SAE forward on CUDA (the constraint steps and SVDs stay fp32)."""
    workers: int = 0
    """Ray actors to spread the members over (one GPU each when the cluster has GPUs); 0 = this process."""
    storage_options: dict | None = field(default=None, repr=False)
    """fsspec options for the cache (may hold credentials: never saved)."""

    def __post_init__(self):
        check_fields(self)
        if not self.members:
            raise SasaError("a run needs at least one SAE")
        names = [m.name for m in self.members]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SasaError(f"SAE names must be unique; repeated: {', '.join(dupes)} (set 'name')")
        for key in ("tokens", "batch_size"):
            if getattr(self, key) <= 0:
                raise SasaError(f"{key} must be positive, got {getattr(self, key)}")
        if not 0 <= self.decay_frac < 1:
            raise SasaError(f"decay_frac must be in [0, 1), got {self.decay_frac}")
        if self.nuc_every < 1:
            raise SasaError(f"nuc_every must be >= 1, got {self.nuc_every}")
        if self.seed < 0:
            raise SasaError(f"seed must be >= 0 (numpy's generators take no negative seed), got {self.seed}")
        if self.log_every < 1:
            raise SasaError(f"log_every must be >= 1 (steps between metric lines), got {self.log_every}")
        if self.checkpoint_every < 0:
            raise SasaError(f"checkpoint_every must be >= 0 (0 = only at the end), got {self.checkpoint_every}")
        if self.workers < 0:
            raise SasaError(f"workers must be >= 0, got {self.workers}")
        self.exclude = tuple(self.exclude)

    @property
    def steps(self) -> int:
        return -(-self.tokens // self.batch_size)

    @property
    def hookpoints(self) -> list[str]:
        return sorted({m.hookpoint for m in self.members})

    def to_json(self) -> dict:
        """The resolved config without storage options."""
        d = dataclasses.asdict(self)
        d.pop("storage_options")
        d["exclude"] = list(self.exclude)
        return d


RUN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)} - {"members", "storage_options"}


def load_sweep(path: str | Path, **overrides) -> TrainConfig:
    """A TrainConfig from a sweep YAML: run settings at the top level, ``saes:`` a list of SAEs.

    Each SAE entry takes ``hookpoint``, ``lr``, ``name`` and SAEConfig fields; a ``defaults:``
    mapping is merged under every entry. ``overrides`` (from the command line) win.
    """
    import yaml

    path = Path(path)
    if path.is_dir():
        raise SasaError(f"sweep file {path} is a folder; pass the sweep YAML file itself")
    if not path.is_file():
        raise SasaError(f"sweep file {path} does not exist")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SasaError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("saes"), list) or not doc["saes"]:
        raise SasaError(f"{path} needs a non-empty list 'saes:' of SAE entries")
    defaults = doc.pop("defaults", {}) or {}
    entries = doc.pop("saes")
    unknown = set(doc) - RUN_KEYS
    if unknown:
        raise SasaError(f"{path}: unknown run setting(s) {sorted(unknown)}; known: {', '.join(sorted(RUN_KEYS))}")
    members = []
    for i, entry in enumerate(entries):
        entry = {**defaults, **entry}
        try:
            hookpoint = entry.pop("hookpoint")
        except KeyError:
            raise SasaError(f"{path}: SAE entry {i} has no 'hookpoint'") from None
        try:
            members.append(MemberConfig(hookpoint=hookpoint, lr=entry.pop("lr", None),
                                        name=entry.pop("name", None), seed=entry.pop("seed", None),
                                        sae=entry))
        except SasaError as err:
            raise SasaError(f"{path}: SAE entry {i}: {err}") from None
    run = {**doc, **{k: v for k, v in overrides.items() if v is not None}}
    if "cache" not in run:
        raise SasaError(f"{path} names no cache; add 'cache: URL' or pass --cache")
    try:
        return TrainConfig(members=members, **run)
    except SasaError as err:
        raise SasaError(f"{path}: {err}") from None
