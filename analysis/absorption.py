"""Feature absorption on the first-letter task (SAEBench / Chanin et al. 2024), with groups as units.

The task: does a word start with the letter L? A linear probe on the model's activations knows;
an SAE that has a "starts with L" unit should fire it on every such word. *Absorption* is when
that unit stays silent on a word because some other, more specific unit (say "the word 'short'")
has absorbed the direction and fires instead.

What we do (SAEBench's ``absorption_first_letter`` eval, kept small; the defaults are SAEBench's
where one exists):
1. Words: single vocabulary tokens that are whole lowercase ASCII words (for MiniLM's WordPiece
   vocabulary: no ``##`` continuation pieces), at most ``max_words_per_letter`` per letter;
   letters with fewer than ``min_words_per_letter`` words are skipped. Split train / test.
2. Prompt ``"{word} has the first letter:"`` through the model; the activation at the word's
   position and the SAE's hookpoint is the example (SAEBench adds in-context examples before it;
   a bidirectional encoder such as MiniLM sees the whole template anyway).
3. A multinomial logistic probe over the letters on the train words; its per-letter weight row,
   normalised, is the letter's probe direction w_L.
4. Per letter, k-sparse probing on the SAE's units: units ranked by the difference of their mean
   activation (||z_g||) on L-words and on the rest; k grows from 1 while adding the k-th unit
   raises a logistic probe's test F1 by more than ``f1_jump`` (0.03). The first k units are the
   letter's *main units*; k is the number of split features.
5. Absorption rate of L (SAEBench's full-absorption score): over test L-words that the probe
   classifies correctly, the fraction on which no main unit is active while some other active
   unit's contribution D_g z_g has cosine >= ``cos_threshold`` (0.025) with w_L.
   Absorption fraction: over the same words, the share of the reconstruction's positive
   projection on w_L that comes from non-main units (SAEBench's partial absorption, simplified:
   no projection-ratio thresholds).
With groups as units, "active" is "kept by the gate" and the unit's activation is ||z_g||, so an
r = 1 ReLU/TopK SAE reduces to the latent-level definition.
"""

from __future__ import annotations

import functools
import string
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sasa.errors import SasaError
from sasa.models import BUILTIN_MODEL


@dataclass(frozen=True)
class AbsorptionConfig:
    """Settings of the first-letter absorption eval."""

    model: str = BUILTIN_MODEL
    """Model the SAE was trained on (folder, hub name, or the bundled MiniLM)."""
    hookpoint: str = "resid_post.3"
    """Hookpoint the SAE reads."""
    template: str = "{word} has the first letter:"
    """Prompt; the activation is taken at the word's token."""
    max_words_per_letter: int = 150
    """Words sampled per letter (keeps the eval a few seconds on a CPU)."""
    min_words_per_letter: int = 20
    """Letters with fewer single-token words are skipped."""
    min_word_len: int = 2
    """Shortest word used."""
    test_fraction: float = 0.3
    """Fraction of each letter's words held out for F1 and absorption."""
    max_k: int = 10
    """Largest k of the k-sparse probes."""
    f1_jump: float = 0.03
    """Minimum F1 gain for the k-th unit to count as a split feature (SAEBench)."""
    cos_threshold: float = 0.025
    """Minimum cosine between an absorbing unit's contribution and the probe (SAEBench)."""
    probe_steps: int = 300
    """Full-batch Adam steps of the letter probe."""
    batch_size: int = 64
    """Prompts per model forward."""
    seed: int = 0
    """Word sampling and train/test split."""

    def __post_init__(self):
        if "{word}" not in self.template:
            raise SasaError(f"absorption template {self.template!r} needs a {{word}} placeholder")
        if not 0 < self.test_fraction < 1:
            raise SasaError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.max_k < 1 or self.min_words_per_letter < 4:
            raise SasaError("max_k must be >= 1 and min_words_per_letter >= 4")


class WordActs(NamedTuple):
    """Activations of the first-letter prompts."""

    words: list[str]
    letters_N: np.ndarray
    """Index of each word's first letter in ``letters``."""
    letters: list[str]
    acts_ND: torch.Tensor
    """Activation at the word's position, float32."""
    train_N: np.ndarray
    """bool: in the training split."""


class LetterResult(NamedTuple):
    letter: str
    main_units: list[int]
    """The letter's main units (groups), best first; len = number of split features."""
    f1_by_k: list[float]
    """Test F1 of the k-sparse probe for k = 1..max_k."""
    n_probe_true_positives: int
    absorption_rate: float
    absorption_fraction: float


class AbsorptionResult(NamedTuple):
    probe_accuracy: float
    """Test accuracy of the letter probe on the activations (sanity: should be high)."""
    letters: list[LetterResult]
    mean_absorption_rate: float
    mean_absorption_fraction: float
    mean_split_features: float

    def to_json(self) -> dict:
        return {"probe_accuracy": self.probe_accuracy, "mean_absorption_rate": self.mean_absorption_rate,
                "mean_absorption_fraction": self.mean_absorption_fraction,
                "mean_split_features": self.mean_split_features,
                "letters": [r._asdict() for r in self.letters]}


def letter_words(tokenizer, cfg: AbsorptionConfig) -> list[tuple[str, int]]:
    """(word, token id) of whole-word vocabulary tokens, capped per letter (deterministic)."""
    rng = np.random.default_rng(cfg.seed)
    by_letter: dict[str, list[tuple[str, int]]] = {c: [] for c in string.ascii_lowercase}
    for tok, i in sorted(tokenizer.get_vocab().items()):
        word = tok.lstrip("\u0120\u2581")  # byte-level BPE / sentencepiece word-start marks
        if word.isascii() and word.isalpha() and word.islower() and len(word) >= cfg.min_word_len \
                and not tok.startswith("##"):
            by_letter[word[0]].append((word, i))
    out = []
    for c, items in by_letter.items():
        if len(items) < cfg.min_words_per_letter:
            continue
        pick = rng.permutation(len(items))[:cfg.max_words_per_letter]
        out += [items[j] for j in sorted(pick)]
    return out


@functools.lru_cache(maxsize=4)
def word_activations(cfg: AbsorptionConfig, *, progress: bool = False) -> WordActs:
    """Run the model on the prompts and keep the hookpoint's activation at each word.

    Cached per config: ``sasa eval --absorption`` over a sweep evaluates many SAEs on the same
    model and hookpoint, and the forward passes (~25 s on 2 CPU cores) are the same for each."""
    from sasa.hookpoints import parse_hookpoint
    from sasa.capture import ActivationCapture
    from sasa.models import load_model, load_tokenizer, resolve_model_source

    source = resolve_model_source(cfg.model)
    tokenizer = load_tokenizer(source)
    hp = parse_hookpoint(cfg.hookpoint)
    prompts, words = [], []
    for word, wid in letter_words(tokenizer, cfg):
        ids = tokenizer(cfg.template.format(word=word))["input_ids"]
        if wid in ids:  # the word stayed one token inside the prompt
            prompts.append((ids, ids.index(wid)))
            words.append(word)
    if not prompts:
        raise SasaError(f"no single-token words found in {cfg.model}'s vocabulary for the first-letter task")
    model = load_model(source, keep_layers=hp.layer + 1)
    capture = ActivationCapture(model, [hp])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    acts = []
    try:
        for lo in tqdm(range(0, len(prompts), cfg.batch_size), desc="absorption acts", disable=not progress):
            chunk = prompts[lo:lo + cfg.batch_size]
            T = max(len(ids) for ids, _ in chunk)
            # Pad on the right: the word sits before any padding, and with bidirectional attention
            # the padding would leak in, so prompts of one length (the common case) go together.
            ids_BT = torch.full((len(chunk), T), pad, dtype=torch.long)
            for b, (ids, _) in enumerate(chunk):
                ids_BT[b, :len(ids)] = torch.tensor(ids)
            out = capture(ids_BT)[hp.name]
            pos = torch.tensor([p for _, p in chunk])
            acts.append(out[torch.arange(len(chunk)), pos].float().clone())
    finally:
        capture.remove()
    letters = sorted({w[0] for w in words})
    letters_N = np.array([letters.index(w[0]) for w in words])
    rng = np.random.default_rng(cfg.seed + 1)
    train_N = np.ones(len(words), dtype=bool)
    for li in range(len(letters)):
        idx = rng.permutation(np.flatnonzero(letters_N == li))
        train_N[idx[:max(1, int(round(cfg.test_fraction * len(idx))))]] = False
    return WordActs(words, letters_N, letters, torch.cat(acts), train_N)


def _fit_logistic(x_NK: torch.Tensor, y_N: torch.Tensor, n_classes: int, steps: int,
                  weight_decay: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-batch Adam logistic regression on centred inputs scaled by one number (per-dimension
    scaling would blow up directions that barely vary in training); returns (W [C, K], b [C])
    for the raw inputs."""
    mu = x_NK.mean(0)
    sd = (x_NK - mu).square().sum(1).mean().sqrt().clamp_min(1e-6)
    z = (x_NK - mu) / sd
    w = torch.zeros(n_classes, x_NK.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        loss = F.cross_entropy(z @ w.T + b, y_N) + weight_decay * w.square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        w_raw = w / sd
        return w_raw, b - w_raw @ mu


def _f1(pred: np.ndarray, truth: np.ndarray) -> float:
    tp = float((pred & truth).sum())
    denom = float(pred.sum() + truth.sum())
    return 2 * tp / denom if denom else 0.0


@torch.no_grad()
def absorption(sae, data: WordActs, cfg: AbsorptionConfig) -> AbsorptionResult:
    """First-letter absorption of an SAE whose input is the hookpoint of ``data``."""
    if sae.cfg.d_in != data.acts_ND.shape[1]:
        raise SasaError(f"the SAE reads width {sae.cfg.d_in} but {cfg.hookpoint} of {cfg.model} has "
                        f"width {data.acts_ND.shape[1]}; pass the hookpoint and model it was trained on")
    x = data.acts_ND
    y = torch.as_tensor(data.letters_N)
    tr, te = torch.as_tensor(data.train_N), torch.as_tensor(~data.train_N)
    with torch.enable_grad():
        w_CD, b_C = _fit_logistic(x[tr], y[tr], len(data.letters), cfg.probe_steps)
    pred_N = (x @ w_CD.T + b_C).argmax(1)
    probe_acc = float((pred_N[te] == y[te]).float().mean())

    out = sae(x)
    codes_NGR = out.codes_BGR.float()
    act_NG = codes_NGR.norm(dim=-1)
    active_NG = out.active_BG
    dec_GRD = sae.W_dec_GRD.detach().float()
    results = []
    for li, letter in enumerate(data.letters):
        pos_N = (y == li)
        diff_G = act_NG[tr & pos_N].mean(0) - act_NG[tr & ~pos_N].mean(0)
        order = torch.argsort(diff_G, descending=True)[:cfg.max_k]
        f1s, k_main = [], 1
        for k in range(1, len(order) + 1):
            feats = act_NG[:, order[:k]]
            with torch.enable_grad():
                w, b = _fit_logistic(feats[tr], pos_N[tr].long(), 2, 150)
            p = ((feats[te] @ w.T + b).argmax(1) == 1).numpy()
            f1s.append(_f1(p, pos_N[te].numpy()))
            if k > 1 and f1s[-1] - f1s[-2] > cfg.f1_jump and k_main == k - 1:
                k_main = k
        main = order[:k_main]
        w_D = F.normalize(w_CD[li], dim=0)
        tp = torch.nonzero(te & pos_N & (pred_N == li)).flatten()
        absorbed, fractions = 0, []
        for n in tp.tolist():
            contrib_GD = torch.einsum("gr,grd->gd", codes_NGR[n], dec_GRD)
            proj_G = contrib_GD @ w_D
            is_main = torch.zeros_like(proj_G, dtype=torch.bool)
            is_main[main] = True
            pos_proj = proj_G.clamp_min(0)
            total = float(pos_proj.sum())
            fractions.append(float(pos_proj[~is_main].sum()) / total if total > 0 else 0.0)
            if not bool(active_NG[n, main].any()):
                cos_G = proj_G / contrib_GD.norm(dim=1).clamp_min(1e-12)
                cand = active_NG[n] & ~is_main
                if bool(cand.any()) and float(cos_G[cand].max()) >= cfg.cos_threshold:
                    absorbed += 1
        n_tp = len(tp)
        results.append(LetterResult(letter, [int(g) for g in main], f1s, n_tp,
                                    absorbed / n_tp if n_tp else float("nan"),
                                    float(np.mean(fractions)) if fractions else float("nan")))
    rates = [r.absorption_rate for r in results if np.isfinite(r.absorption_rate)]
    fracs = [r.absorption_fraction for r in results if np.isfinite(r.absorption_fraction)]
    return AbsorptionResult(probe_acc, results, float(np.mean(rates)) if rates else float("nan"),
                            float(np.mean(fracs)) if fracs else float("nan"),
                            float(np.mean([len(r.main_units) for r in results])))
