"""The configuration of one sparse autoencoder: SASA, TopK or ReLU + L1 (docs/sasa.md).

Every choice the SASA paper leaves open is a field here, defaulting to what docs/sasa.md
describes; ``__post_init__`` resolves the architecture's defaults and rejects impossible
combinations with one-line errors.
"""

from __future__ import annotations

from dataclasses import dataclass

from sasa.errors import SasaError
from sasa.fields import check_fields

ARCHS = ("sasa", "topk", "relu")
CODES = ("signed", "relu")
GATES = ("token", "batch")
NUC_ON = ("map", "decoder", "encoder")
INIT_ENCODER = ("transpose", "random")
DECODES = ("auto", "dense", "sparse")
CONSOLIDATE = ("anneal", "none")
GATHER_INTO = ("host", "silent")


@dataclass
class SAEConfig:
    """One sparse autoencoder. ``None`` fields resolve to the architecture's default."""

    d_in: int
    """Width of the input activations (d)."""

    groups: int
    """Number of groups G. For topk/relu this is the number of latents (width)."""

    arch: str = "sasa"
    """"sasa" (grouped subspaces, Top-s gate), "topk" (Gao et al. 2024) or "relu" (ReLU + L1)."""

    rank: int | None = None
    """Block size r of each group's subspace. Default: 4 for sasa, 1 (required) for topk/relu."""

    top_s: int = 8
    """Groups kept per token: s for sasa, k for topk. Unused by relu."""

    codes: str | None = None
    """"signed" (no nonlinearity: a point on a circle needs negative coordinates) or "relu".
    Default: "signed" for sasa, "relu" for topk/relu. sasa with rank=1 and codes="relu" is
    exactly a TopK SAE."""

    gate: str = "token"
    """"token": Top-s groups per token. "batch": Top s*B groups over the whole batch of B tokens
    (a token may get more or fewer than s; the average is s)."""

    batch_gate_from: float | str | None = "auto"
    """Fraction of the run from which the gate is "batch" (the top s*B groups over the batch,
    as BatchTopK keeps latents) instead of ``gate``; None: ``gate`` throughout; "auto" (the
    default): 0.8 under ``consolidate: anneal`` (sasa, r >= 2), else None. A token whose
    features outnumber s then keeps more groups and a sparse one fewer, so no group needs a
    spare copy of a frequent feature for the tokens where slots run out. An SAE trained with
    the batch gate (here or with ``gate="batch"``) keeps a running mean of the smallest score
    it kept (``SAE.gate_threshold``) and in eval mode keeps every group whose squared code norm
    reaches it: a rule per token, at s groups per token on average on data like the training
    data (on other text more or fewer: report the L0 beside the FVU). Why 0.8 by default, and
    why not earlier: docs/train.md, "The batch gate late in the run"."""

    nuc_lambda: float = 0.0
    """Weight of the nuclear-norm penalty sum_g ||.||_* (0 disables it and skips the SVDs)."""

    nuc_on: str = "map"
    """What the nuclear norm acts on: "map" = P_g = D_g E_g (= ||E_g||_* when D_g is
    orthonormal), "encoder" = E_g, "decoder" = D_g (an ablation: constant r per group while
    D_g is orthonormal, so it only acts on non-orthonormal decoders)."""

    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss (Gao et al.: dead units reconstruct the residual). 0 disables."""

    auxk_k: int | None = None
    """Dead units used per token by AuxK. Default: enough groups for d/2 coordinates
    (max(1, d_in // (2 * rank))), capped at ``groups``; d/2 follows EleutherAI/sparsify."""

    dead_tokens: int = 10_000_000
    """A unit that has not been active for this many tokens counts as dead (for AuxK)."""

    l1_coeff: float = 1e-3
    """relu only: weight of the L1 penalty sum_i |z_i| * ||d_i|| (per token, batch mean)."""

    init_encoder: str = "transpose"
    """"transpose": E_g = D_g^T at init (Gao et al.; measured in bench/SPLITTING.md to leave
    fewer dead units and converge faster). "random": an independent uniform init."""

    decode: str = "auto"
    """How the codes are decoded (and the encoder's backward run); the results are the same up
    to float rounding, only the cost differs. "dense": one [B, G*r] @ [G*r, d] matmul per
    decode, gradients by dense matmuls (the reference). "sparse": only the kept (token,
    coordinate) pairs are touched (embedding_bag over W_dec rows, a gathered encoder backward);
    cost ~ s*r/(G*r) of the dense decode. A token's number of kept groups may vary (batch
    gate). ReLU SAEs have no fixed number of active codes and always decode densely.
    "auto": sparse on CPU when s*r <= G*r / 8 (measured crossover ~G*r/8), dense elsewhere."""

    consolidate: str | None = None
    """How SASA training reaches the consolidated optimum (one group per multi-dimensional
    feature when r >= d_i; measured in bench/RESULTS_consolidation.md). "anneal": two schedules
    over the run, the second annealed to 0 by its end (by the lr decay with the token gate
    throughout), the batch gate for its last 20% (``batch_gate_from``), and a periodic step: (1)
    the s ramp (``s_start``...): the gate keeps fewer groups than features early on, so a group
    that holds part of a feature leaves the rest in the error and turns its spare dimensions to
    it, instead of a spare slot letting a second group take it; (2) a group-sparsity penalty on
    the kept codes (``group_lasso``...), which makes a split or duplicated feature cost more
    than a consolidated one, and on its schedule a term on the covariance of the groups' code
    energies (``energy_cov``); (3) the gather step (``gather_every``), which moves slices of one
    feature held by different groups into one. Optional periodic steps: merge (``merge_every``),
    revive (``revive_every``), unpack (``unpack_every``). "none": the plain objective (Top-s,
    FVU + AuxK + rank penalty).
    Default: "anneal" for sasa with r >= 2; "none" for r = 1 and topk/relu, whose groups are
    one direction each, with no subspace to consolidate. At r = 1 on MiniLM after 4.2M tokens
    the procedure costs: held-out FVU 0.1036 against 0.0945 with "none", both with the late
    batch gate (14% of the latents dead against none; with the token gate 0.1260 against
    0.1092; bench/RESULTS_minilm.md, rounds 7, 11, 13 and 15); on synthetic planted
    data in a 512-step run its s ramp works as a k ramp and r = 1 gains (0.0332 against 0.1174,
    bench/RESULTS_analysis.md), as a TopK with a k ramp would."""

    group_lasso: float = 0.1
    """Weight of the group-sparsity penalty ``mean_b sum_g (||z_bg|| / rms)^p`` over the kept
    groups, rms = sqrt(mean_b ||x_b - mean||^2) of the batch (so the weight is dimensionless);
    0 disables it."""

    group_lasso_power: float = 0.5
    """p of the penalty. p = 1 (group lasso) charges a feature split into orthogonal parts
    (||v1|| + ||v2|| > ||v1 + v2||) but not two aligned copies; p < 1 charges both
    (sqrt(1/2) + sqrt(1/2) > 1). Computed as (||z||^2 / rms^2 + 1e-4)^(p/2), finite at 0."""

    group_lasso_hold: float = 0.5
    """Fraction of the penalty's span (``group_lasso_tokens``) with the full group-sparsity
    weight."""

    group_lasso_end: float | None = None
    """Fraction of the penalty's span by which that weight has been annealed linearly to 0. None
    (the default): 1.0 (the end of the span: of a run up to ``group_lasso_tokens``) when the
    batch gate runs late (``batch_gate_from``), where it charges the copies the token phase
    grew, which the batch gate no longer needs; else 0.8, so a token-gate run's lr decay runs
    on the plain objective (bench/SPLITTING.md, rounds 8, 12 and 13)."""

    group_lasso_tokens: int | None = 2_097_152
    """The group penalty's span: ``group_lasso_hold`` and ``group_lasso_end`` are fractions of
    the run's first this many training tokens (all of a shorter run, so runs of up to 2M tokens
    train as with None); None: of the whole run. The energy term and the revive step keep to
    the penalty's schedule; the gather step and the batch gate keep to fractions of the whole
    run. Past the span a run trains on the plain objective. At 4.2M tokens on MiniLM that
    lowered held-out FVU by 4-9% at r = 2, 4 and 8 against None, and on the Gaussian planted
    shape D at 4M it brought FVU from 1.10-1.20x the planted oracle's to 0.91-1.02x
    (bench/SPLITTING.md, round 15, which also says what it costs shape E)."""

    energy_cov: float = 0.03
    """Weight of the between-group energy term (``terms.energy_cross_share``): the share
    of the variance of a token's code energy sum_g ||z_g||^2 that lies between groups,
    sum_{g != h} Cov(||z_g||^2, ||z_h||^2) / Var(sum_g ||z_g||^2) over the batch, on the
    group-sparsity penalty's schedule (``group_lasso_hold``, ``group_lasso_end``). Slices of
    one feature in two groups switch on together, so the term charges them; whole independent
    features, packed into one group or not, cost nothing; groups never kept together have
    negative covariance, so while s is small it also spreads the tokens over the groups.
    0 disables (the default before round 11 of bench/SPLITTING.md, which measures it)."""

    s_start: int | None = 1
    """s ramp: the gate keeps ``s_start`` groups per token until ``s_ramp_from`` of the ramp's
    span, then s grows linearly (rounded) to ``top_s`` at ``s_ramp_to``. None: no ramp."""

    s_ramp_from: float = 0.1
    """Fraction of the ramp's span (``s_ramp_tokens``) at s_start."""

    s_ramp_to: float = 0.3
    """Fraction of the ramp's span at which s reaches top_s."""

    s_ramp_tokens: int | None = 2_097_152
    """The s ramp's span: ``s_ramp_from`` and ``s_ramp_to`` are fractions of the run's first
    this many training tokens (all of a shorter run); None: of the whole run. The penalty has
    its own span (``group_lasso_tokens``); the periodic steps keep to fractions of the whole
    run. 2M is the longest budget at which the planted benchmarks measured every shape with the
    whole-run ramp (runs up to it train as with None); a longer run keeps its s = 1 phase short
    instead of at 10% of the run, which on MiniLM retires groups for good (bench/SPLITTING.md,
    rounds 2 and 7). Shorter spans put the ramp inside the lr warm-up: on MiniLM at 4.2M tokens a 1M
    span left 9-20% of the groups silent (2M: 33-56%) and 6-14% lower FVU at every r, but on planted
    data at 2M it kept features split on more seeds (round 7). Above 2M the span cost planted data
    nothing measurable with ``gather_energy`` 0: shape D at 4M, 3 of 9 seeds on target against 2 of
    9 with None; shape E (seeds 0-2), 3 of 3 against 2 of 3 (round 9)."""

    revive_every: int = 0
    """Steps between revive steps (``sasa.trainer.consolidate.revive_silent``): groups kept on
    no token of the last ``revive_every`` batches are re-seeded at the residual of the batch's
    worst-reconstructed tokens, until the penalty ends (``group_lasso_end`` of its span);
    0 disables."""

    merge_every: int = 0
    """Steps between merge steps (``sasa.trainer.consolidate.merge_and_reseed``: two co-firing
    groups whose joint contribution fits in r dimensions become one, the other is re-seeded at
    the residual); 0 disables (the default: it did not help, bench/SPLITTING.md)."""

    merge_from: float = 0.05
    """Fraction of the run's steps before the first merge step."""

    merge_until: float = 0.6
    """Fraction of the run's steps after which no merge step runs."""

    merge_jaccard: float = 0.5
    """Two groups are merge candidates when kept together on at least this fraction of the
    tokens where either is kept."""

    merge_min: int = 16
    """... and on at least this many tokens of the batch."""

    merge_tail: float = 0.05
    """... and their joint contribution on shared tokens leaves at most this fraction of its
    energy outside its top-r principal subspace."""

    unpack_every: int = 0
    """Steps between unpack steps (``sasa.trainer.unpack.unpack_packed``: a group whose codes
    fall into independent blocks holds several features, and each block but the largest moves
    to a group kept on no token of the batch); 0 disables (the default). 25 takes most packing out
    and brings FVU to the planted oracle's on overlapping 1-6-D shapes, but splits 1-D
    features more on others (bench/RESULTS_consolidation.md, round 4)."""

    unpack_from: float = 0.5
    """Fraction of the run's steps before the first unpack step."""

    unpack_until: float = 0.8
    """Fraction of the run's steps after which no unpack step runs."""

    unpack_dep: float = 1.3
    """Two unmixed sources of a group belong to one feature when both are on together on at
    least this multiple of the tokens independence predicts (one feature with probability p:
    ~1/p; two independent ones: 1)."""

    unpack_full: bool = False
    """Unpack only the groups whose blocks fill all r dimensions (packed past capacity: one of
    the features they hold cannot be whole there). With ``unpack_every`` 25: every seed of the
    disjoint planted shape on target at 1M tokens, but worse on two others
    (bench/RESULTS_consolidation.md, round 5)."""

    unpack_min_share: float = 0.05
    """Directions and blocks below this share of a group's code energy are ignored."""

    gather_every: int = 25
    """Steps between gather steps (``sasa.trainer.gather.gather_slices``: blocks of different
    groups that are on only together are slices of one feature and move into one group); 0
    disables. Runs only under ``consolidate: anneal``. At 25, through the streaming trainer on
    four planted shapes, three seeds: every seed of the disjoint shape on target by 512k tokens
    (without it: by 2M), no shape with a larger worst count or fewer seeds on target, the
    others as they were by 2M (bench/RESULTS_consolidation.md, round 6); MiniLM in
    bench/RESULTS_minilm.md (round 7)."""

    gather_from: float = 0.5
    """Fraction of the run's steps before the first gather step."""

    gather_until: float = 0.8
    """Fraction of the run's steps after which no gather step runs."""

    gather_ratio: float = 4.0
    """Two blocks are slices of one feature when each is on at least this many times more
    often while the other is on than while it is off (independent features: 1)."""

    gather_on: float = 0.1
    """A block is on where its code energy exceeds this fraction of its mean over the tokens
    where its group is kept."""

    gather_energy: float = 3.0
    """> 0: the gather step also links two blocks whose on-ratios are both >= 2 (not 4) when
    each one's mean code energy while the other is on is at least this multiple of that while
    it is off: a thin slice of a Gaussian feature is "off" on part of its feature's tokens, but
    its energy still follows the feature. 0: the on-test alone (the default before round 10 of
    bench/SPLITTING.md). What 3 gains on planted data and costs on MiniLM: the module
    docstring of ``sasa.trainer.gather``."""

    gather_corr: float = 0.15
    """> 0: while the group penalty is on, the gather step also links two blocks of different
    groups whose code energies over the batch correlate at least this much (Pearson). It finds
    what the on-ratio tests miss: a feature that spills out of a group the penalty packed past
    r, whose slice in that group is "on" on many of the other features' tokens too, so its
    on-ratios stay low while its energy still follows the feature. 0: off (the default before
    round 17). What 0.15 gains on planted data and does on MiniLM: the module docstring of
    ``sasa.trainer.gather``."""

    gather_into: str = "host"
    """Where the gather step moves a feature's slices: "host", into the group that holds most
    of them when they fit beside its other blocks (else as "silent"); "silent", into a group
    kept on no token of the batch, else a host holding nothing else (the default before round
    18 of bench/SPLITTING.md). What "host" gains on planted data and does on MiniLM: the module
    docstring of ``sasa.trainer.gather``."""

    def __post_init__(self) -> None:
        check_fields(self)  # YAML / CLI values: one-line errors naming the field and its type
        if self.arch not in ARCHS:
            raise SasaError(f"unknown SAE arch {self.arch!r}; use one of {', '.join(ARCHS)}")
        if self.d_in < 1 or self.groups < 1:
            raise SasaError(f"d_in and groups must be positive (got d_in={self.d_in}, "
                            f"groups={self.groups})")
        if self.rank is None:
            self.rank = 4 if self.arch == "sasa" else 1
        if self.rank < 1:
            raise SasaError(f"rank must be >= 1 (got {self.rank})")
        if self.arch != "sasa" and self.rank != 1:
            raise SasaError(f"arch {self.arch} has one direction per latent; set rank=1 "
                            f"(got {self.rank}) or use arch='sasa'")
        if self.rank > self.d_in:
            raise SasaError(f"rank {self.rank} exceeds d_in {self.d_in}; a group's subspace "
                            "cannot be wider than the input")
        if self.codes is None:
            self.codes = "signed" if self.arch == "sasa" else "relu"
        if self.codes not in CODES:
            raise SasaError(f"unknown codes {self.codes!r}; use 'signed' or 'relu'")
        if self.arch == "relu" and self.codes != "relu":
            raise SasaError("arch relu needs codes='relu' (or leave codes unset)")
        if self.arch != "relu" and not 1 <= self.top_s <= self.groups:
            raise SasaError(f"top_s must be in 1..groups (got s={self.top_s} > G={self.groups})"
                            if self.top_s > self.groups else
                            f"top_s must be >= 1 (got {self.top_s})")
        if self.gate not in GATES:
            raise SasaError(f"unknown gate {self.gate!r}; use 'token' or 'batch'")
        if self.nuc_lambda < 0:
            raise SasaError(f"nuc_lambda must be >= 0 (got {self.nuc_lambda})")
        if self.nuc_on not in NUC_ON:
            raise SasaError(f"unknown nuc_on {self.nuc_on!r}; use one of {', '.join(NUC_ON)}")
        if self.auxk_alpha < 0:
            raise SasaError(f"auxk_alpha must be >= 0 (got {self.auxk_alpha})")
        if self.auxk_k is None:
            self.auxk_k = min(self.groups, max(1, self.d_in // (2 * self.rank)))
        if not 1 <= self.auxk_k <= self.groups:
            raise SasaError(f"auxk_k must be in 1..groups (got {self.auxk_k}, G={self.groups})")
        if self.dead_tokens < 1:
            raise SasaError(f"dead_tokens must be >= 1 (got {self.dead_tokens})")
        if self.l1_coeff < 0:
            raise SasaError(f"l1_coeff must be >= 0 (got {self.l1_coeff})")
        if self.decode not in DECODES:
            raise SasaError(f"unknown decode {self.decode!r}; use one of {', '.join(DECODES)}")
        if self.init_encoder not in INIT_ENCODER:
            raise SasaError(f"unknown init_encoder {self.init_encoder!r}; use 'transpose' "
                            "or 'random'")

        if self.consolidate is None:
            self.consolidate = "anneal" if self.arch == "sasa" and self.rank > 1 else "none"
        if self.consolidate not in CONSOLIDATE:
            raise SasaError(f"unknown consolidate {self.consolidate!r}; use one of "
                            f"{', '.join(CONSOLIDATE)}")
        if self.consolidate != "none" and self.arch != "sasa":
            raise SasaError(f"consolidate={self.consolidate!r} is for arch sasa; set "
                            "consolidate='none' for topk/relu")
        if self.batch_gate_from == "auto":
            self.batch_gate_from = 0.8 if self.consolidate == "anneal" else None
        if self.batch_gate_from is not None and not (
                self.arch != "relu" and isinstance(self.batch_gate_from, (int, float))
                and 0 <= self.batch_gate_from <= 1):
            raise SasaError("batch_gate_from must be a fraction of the run in [0, 1], None or "
                            f"'auto', for sasa or topk (got {self.batch_gate_from!r}, arch "
                            f"{self.arch})")
        if self.group_lasso_end is None:
            self.group_lasso_end = 0.8 if self.batch_gate_from is None else 1.0
        for span in ("s_ramp_tokens", "group_lasso_tokens"):
            if getattr(self, span) is not None and getattr(self, span) < 1:
                raise SasaError(f"{span} must be >= 1, or None for the whole run (got "
                                f"{getattr(self, span)})")
        if self.group_lasso < 0:
            raise SasaError(f"group_lasso must be >= 0 (got {self.group_lasso})")
        if self.s_start is not None and not 1 <= self.s_start:
            raise SasaError(f"s_start must be >= 1 (got {self.s_start})")
        if self.energy_cov < 0:
            raise SasaError(f"energy_cov must be >= 0 (0: off; got {self.energy_cov})")
        if self.gather_energy < 0:
            raise SasaError(f"gather_energy must be >= 0 (0: off; got {self.gather_energy})")
        if self.gather_into not in GATHER_INTO:
            raise SasaError(f"unknown gather_into {self.gather_into!r}; use one of "
                            f"{', '.join(GATHER_INTO)}")
        if not 0 <= self.gather_corr <= 1:
            raise SasaError(f"gather_corr must be in [0, 1] (0: off; got {self.gather_corr})")
        if not 0 <= self.s_ramp_from <= self.s_ramp_to <= 1:
            raise SasaError("need 0 <= s_ramp_from <= s_ramp_to <= 1 (got "
                            f"{self.s_ramp_from}, {self.s_ramp_to})")
        if self.revive_every < 0:
            raise SasaError(f"revive_every must be >= 0 (got {self.revive_every})")
        if self.merge_every < 0 or self.merge_min < 1:
            raise SasaError(f"merge_every must be >= 0 and merge_min >= 1 (got "
                            f"{self.merge_every}, {self.merge_min})")
        if not (0 <= self.merge_from <= self.merge_until <= 1 and 0 < self.merge_jaccard <= 1
                and 0 <= self.merge_tail < 1):
            raise SasaError("need 0 <= merge_from <= merge_until <= 1, 0 < merge_jaccard <= 1 "
                            "and 0 <= merge_tail < 1")
        if not 0 <= self.group_lasso_hold <= self.group_lasso_end <= 1:
            raise SasaError("need 0 <= group_lasso_hold <= group_lasso_end <= 1 (got "
                            f"{self.group_lasso_hold}, {self.group_lasso_end})")

    @property
    def n_coords(self) -> int:
        """Total code coordinates n = G * r."""
        return self.groups * self.rank
