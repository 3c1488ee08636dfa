"""Empirical privacy audit with canaries: insert, train, then measure membership leakage.

Procedure (``run_audit``):

1. **Canaries.** M image–caption pairs: a uniform random-noise image and the caption
   ``"canary w1 … wk"``, whose k words are the *secret*, drawn uniformly from a fixed public list
   (:data:`SECRET_WORDS`; the secret space has ``len(SECRET_WORDS)**k`` elements). Each canary is
   independently inserted into the training set with probability ``insert_prob`` (a secret coin)
   or held out. Secrets, images and coins come from explicit generators seeded by ``seed`` (or by
   ``os.urandom`` when None).
2. **Train** the configured run (DP or σ = 0) on the base data plus the inserted canaries; N grows
   by the number inserted, so it is a different data set, and the report says so.
3. **Measure** with the trained captioner: the membership score of a canary is minus its
   per-sample loss (higher = more likely a member); the AUC of inserted vs held-out scores;
   the exposure of each secret (Carlini et al. 2019); and an empirical ε lower bound from a
   threshold test with Clopper–Pearson intervals (Jagielski et al. 2020, Nasr et al. 2021), the
   threshold chosen on a fixed half of the canaries and the bound computed on the other half (so the
   bound keeps its stated confidence; see :func:`epsilon_lower_bound`).

Caveat printed with every report: the M canaries are scored in one training run, not M separately
trained models. Steinke, Nasr & Jagielski (2023, "Privacy auditing with one (1) training run") show
that such one-run audits are valid but loose. The bound is an audit figure for the operator, never a
privacy guarantee.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dpcap.errors import ConfigError, DataError

# Public, fixed list of 256 nouns, each one BPE token of open_clip's vocabulary (checked in the tests). A large
# list matters: a held-out canary's words are then mostly unseen in training, which is what makes a secret rare.
SECRET_WORDS = (
    "apple anchor banana bridge candle castle cloud desert dragon engine falcon forest garden guitar hammer "
    "island jacket kettle ladder lemon magnet mirror needle ocean pencil pepper piano planet rabbit rocket tiger "
    "violin acorn almond arrow attic badge bakery balloon bamboo barrel basket beacon beaver bell bench berry "
    "bicycle blanket boat bottle bracelet brick broom bucket butter button cabin cactus camel camera canoe canyon "
    "carpet carrot cheese cherry chimney church circus clock coconut compass copper cotton crayon crown cup "
    "curtain daisy diamond dolphin donkey door eagle feather fence flute fountain fox frog giraffe glove goat "
    "grape hammock harbor helmet honey horse jelly jungle kangaroo kite koala lamp lantern leaf library lion "
    "lizard lobster map marble meadow melon meteor monkey moon mountain mushroom napkin necklace nest noodle oak "
    "olive onion orchard otter owl paddle palace panda parrot peach peanut pearl penguin pillow pine pizza "
    "pumpkin puzzle quilt radio rainbow raven ribbon river robot rope rose ruby sailor salad sandal saturn scarf "
    "school shark sheep shell ship shovel skate sled snail snake sock spoon squirrel stamp star stone storm sugar "
    "sunflower swan sword table teapot tent thunder ticket tomato tower tractor train tree trumpet tulip turtle "
    "umbrella unicorn valley vase village volcano waffle wallet water whale wheel whistle willow wolf wool yogurt "
    "zipper coral comet cookie crystal dune ember fern fig glacier granite hazel iris ivory jade jasmine lava "
    "lemonade lotus maple mango mint nectar oasis orbit papaya pebble plum prism quartz reef saffron sapphire "
    "sesame silk slate spruce summit thistle timber topaz tundra velvet walnut wheat zinc badger"
).split()
CANARY_PREFIX = "canary"
NOTE = (
    "one-run audit: M canaries scored in one training run; the threshold is chosen on half of the canaries and "
    "the Clopper-Pearson bound computed on the other half; epsilon_lower_bound is an empirical figure for the "
    "operator (Steinke et al. 2023 give the rigorous one-run analysis); only the accountant's epsilon is a "
    "guarantee, and only for a run with private = true"
)


# ---------------------------------------------------------------- secrets and canaries


@dataclass(frozen=True)
class SecretSpace:
    """Secrets ``s ∈ [0, |W|^k)`` written as k words, the base-|W| digits of s (most significant first)."""

    words: tuple[str, ...] = tuple(SECRET_WORDS)
    length: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 1:
            raise ConfigError(f"secret length must be a positive integer, got {self.length!r}")
        if len(set(self.words)) != len(self.words) or len(self.words) < 2:
            raise ConfigError("the secret word list needs at least 2 distinct words")

    @property
    def size(self) -> int:
        return len(self.words) ** self.length

    def caption(self, secret: int) -> str:
        """``"canary w1 … wk"`` for secret index ``secret``."""
        digits = []
        for _ in range(self.length):
            secret, digit = divmod(int(secret), len(self.words))
            digits.append(self.words[digit])
        return " ".join([CANARY_PREFIX, *reversed(digits)])

    def others(self, secret: int, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` distinct secrets uniformly from the space minus ``secret`` (for exposure)."""
        if not 0 <= count < self.size:
            raise ConfigError(f"need 0 <= candidates - 1 < {self.size} (the secret space), got {count}")
        draw = rng.choice(self.size - 1, size=count, replace=False)
        return draw + (draw >= secret)


@dataclass(frozen=True)
class Canary:
    """One canary: its index, secret, caption, image file and whether its coin inserted it."""

    index: int
    secret: int
    caption: str
    image: str
    inserted: bool


def make_canaries(
    out_dir: str | os.PathLike,
    count: int,
    *,
    image_size: int,
    space: SecretSpace,
    rng: np.random.Generator,
    coins: np.random.Generator,
    insert_prob: float = 0.5,
) -> list[Canary]:
    """Write ``count`` random-noise PNGs into ``out_dir`` with distinct random secrets; flip each coin.

    Images are ``image_size``² uniform RGB noise, so no two canaries look alike and the model sees
    them at their native size. Both groups must be non-empty (else a DataError: change seed/count).
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise ConfigError(f"canaries must be an integer >= 2, got {count!r}")
    if not 0 < insert_prob < 1:
        raise ConfigError(f"insert_prob must be in (0, 1), got {insert_prob!r}")
    if count > space.size:
        raise ConfigError(f"{count} canaries exceed the secret space ({space.size})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    secrets = rng.choice(space.size, size=count, replace=False)
    inserted = coins.random(count) < insert_prob
    if inserted.all() or not inserted.any():
        raise DataError(f"all {count} canary coins fell the same way; use more canaries or another seed")
    canaries = []
    for i, (secret, member) in enumerate(zip(secrets.tolist(), inserted.tolist())):
        pixels = rng.integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8)
        path = out / f"canary-{i:05d}.png"
        _atomic_write(path, _png(pixels))
        canaries.append(Canary(i, int(secret), space.caption(secret), str(path.resolve()), bool(member)))
    return canaries


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---------------------------------------------------------------- training data


def build_audit_data(base: str | os.PathLike, canaries: Sequence[Canary], out_dir: str | os.PathLike) -> dict[str, Any]:
    """Shards of the base data plus the inserted canaries (last); returns build_shards' summary.

    ``base`` is a shard folder (with ``sizes.json``) or anything ``build_shards`` accepts (built first
    into ``out_dir/base-shards``). Each base sample becomes a manifest row with its image bytes unchanged,
    its caption and its metadata fields (plus ``"audit": "base"`` and ``"base_id"``); the inserted
    canaries' rows (``"audit": "canary"``, ``"canary": index``) come last; the manifest is built into
    ``out_dir/shards`` and the staged base images are removed. Held-out canaries never enter it.
    """
    from dpcap.data.build import SIZES_FILE, build_shards

    out = Path(out_dir)
    base = Path(base)
    if not (base / SIZES_FILE).is_file():
        build_shards(base, out / "base-shards")
        base = out / "base-shards"
    rows = _export_shards(base, out / "base")
    rows += [
        {"image": c.image, "caption": c.caption, "audit": "canary", "canary": c.index} for c in canaries if c.inserted
    ]
    manifest = out / "manifest.jsonl"
    _atomic_write(manifest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
    summary = build_shards(manifest, out / "shards", overwrite=True)
    shutil.rmtree(out / "base")  # the staged copies of the base images: the shards now hold them
    summary["base_samples"] = summary["written"] - sum(c.inserted for c in canaries)
    return summary


def _export_shards(shard_dir: Path, dest: Path) -> list[dict[str, Any]]:
    """Every sample of a shard folder as a manifest row; its image bytes copied into ``dest``."""
    from dpcap.data.index import ShardIndex

    index = ShardIndex(shard_dir)
    dest.mkdir(parents=True, exist_ok=True)
    rows = []
    for shard, path in enumerate(index.shard_paths):
        fd = os.open(path, os.O_RDONLY)
        try:
            for gid, row in enumerate(index.rows(shard).tolist(), start=int(index.starts[shard])):
                sample = _export_sample(fd, row, gid, dest)
                rows += [sample] if sample is not None else []
        finally:
            os.close(fd)
    return rows


def _export_sample(fd: int, row: list[int], gid: int, dest: Path) -> dict[str, Any] | None:
    """One manifest row; None for a caption that is not UTF-8 (the reader would skip it in training too)."""
    image, caption, meta = (os.pread(fd, size, offset) for offset, size in zip(row[0::2], row[1::2]))
    try:
        text = caption.decode("utf-8")
    except UnicodeDecodeError:
        return None
    try:
        fields = json.loads(meta.decode("utf-8"))
    except ValueError:
        fields = {}
    fields = {k: v for k, v in (fields if isinstance(fields, dict) else {}).items() if k != "id"}
    path = dest / f"{gid:010d}.{_image_ext(image)}"
    _atomic_write(path, image)
    return {**fields, "image": str(path.resolve()), "caption": text, "audit": "base", "base_id": gid}


def _image_ext(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return (im.format or "bin").lower()
    except Exception:  # any undecodable image: build_shards will count it as corrupt
        return "bin"


# ---------------------------------------------------------------- measuring


@torch.no_grad()
def _per_row(model: torch.nn.Module, method: str, images: torch.Tensor, tokens: torch.Tensor, size: int) -> np.ndarray:
    """``model.<method>(images[i:j], tokens[i:j])`` over chunks on the model's device, as float64 numpy."""
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    fn = getattr(model, method)
    out = [
        fn(images[i : i + size].to(device), tokens[i : i + size].to(device)).cpu() for i in range(0, len(tokens), size)
    ]
    return torch.cat(out).double().numpy() if out else np.zeros(0)


def load_canary_images(canaries: Sequence[Canary], transform: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    """``(M, 3, S, S)``: the canary PNGs through the training transform (same bytes as in the shards)."""
    tensors = []
    for c in canaries:
        with Image.open(c.image) as im:
            tensors.append(transform(im))
    return torch.stack(tensors)


def check_canary_tokens(tokenizer: Callable, captions: Sequence[str]) -> torch.Tensor:
    """Tokenize the captions; a ConfigError if the context length cuts any secret short."""
    tokens = tokenizer(list(captions))
    decoded = tokenizer.decode(tokens) if hasattr(tokenizer, "decode") else list(captions)
    cut = [c for c, d in zip(captions, decoded) if d != c]
    if cut:
        raise ConfigError(f"model.context_length is too short for the canary caption {cut[0]!r}; raise it")
    return tokens


def membership_scores(
    model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor, *, batch_size: int = 256
) -> np.ndarray:
    """Score ``s_i = −ℓ_i``, minus the per-sample caption loss (Yeom et al. 2018 loss attack)."""
    model.eval()
    return -_per_row(model, "per_sample_loss", images, tokens, batch_size)


def exposures(
    model: torch.nn.Module,
    images: torch.Tensor,
    canaries: Sequence[Canary],
    space: SecretSpace,
    tokenizer: Callable,
    *,
    candidates: int,
    rng: np.random.Generator,
    batch_size: int = 256,
) -> np.ndarray:
    """Exposure of each canary's secret (Carlini et al. 2019, "The Secret Sharer", §4):

    ``exposure = log2 R − log2 rank``, where ``rank`` (1 = best) is the true secret's place among R
    candidates — itself and R − 1 other secrets drawn uniformly from the space — ordered by the caption
    log-likelihood ``log p(caption | image)`` given the canary's image. Ties count against the secret
    (rank = 1 + #others ≥ true), so exposure is never overstated; it lies in [0, log2 R].
    """
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 2:
        raise ConfigError(f"candidates must be an integer >= 2, got {candidates!r}")
    model.eval()
    out = np.empty(len(canaries))
    for i, c in enumerate(canaries):
        secrets = [c.secret, *space.others(c.secret, candidates - 1, rng).tolist()]
        tokens = tokenizer([space.caption(s) for s in secrets])
        rows = images[i : i + 1].expand(len(secrets), -1, -1, -1)
        logp = _per_row(model, "caption_logprob", rows, tokens, batch_size)
        rank = 1 + int(np.sum(logp[1:] >= logp[0]))
        out[i] = math.log2(candidates) - math.log2(rank)
    return out


# ---------------------------------------------------------------- statistics


def _scores(scores_in: Any, scores_out: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(scores_in, dtype=np.float64).ravel(), np.asarray(scores_out, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise DataError(f"need at least one inserted and one held-out score, got {a.size} and {b.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise DataError("membership scores must be finite")
    return a, b


def roc_auc(scores_in: Any, scores_out: Any) -> float:
    """AUC = P(s_in > s_out) + ½ P(s_in = s_out), by the Mann–Whitney U statistic on pooled average ranks:
    ``AUC = (R_in − n_in(n_in + 1)/2) / (n_in n_out)``, R_in the rank sum of the inserted scores."""
    from scipy.stats import rankdata

    a, b = _scores(scores_in, scores_out)
    ranks = rankdata(np.concatenate([a, b]), method="average")
    return float((ranks[: a.size].sum() - a.size * (a.size + 1) / 2) / (a.size * b.size))


def threshold_counts(scores_in: Any, scores_out: Any) -> dict[str, np.ndarray]:
    """For every threshold τ (+∞, then each distinct score, descending) the counts of the test
    "member iff s ≥ τ": true positives among inserted and false positives among held-out."""
    a, b = _scores(scores_in, scores_out)
    thresholds = np.concatenate([[np.inf], np.unique(np.concatenate([a, b]))[::-1]])
    a_sorted, b_sorted = np.sort(a), np.sort(b)
    tp = a.size - np.searchsorted(a_sorted, thresholds, side="left")
    fp = b.size - np.searchsorted(b_sorted, thresholds, side="left")
    return {"threshold": thresholds, "tp": tp, "fp": fp, "n_in": a.size, "n_out": b.size}


def roc_curve(scores_in: Any, scores_out: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` of the threshold tests, non-decreasing from (0, 0) to (1, 1)."""
    c = threshold_counts(scores_in, scores_out)
    return c["fp"] / c["n_out"], c["tp"] / c["n_in"]


def clopper_pearson(successes: Any, trials: Any, *, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Exact (Clopper–Pearson 1934) interval for a binomial proportion at two-sided level ``confidence``.

    With α = 1 − confidence: ``low = B⁻¹(α/2; k, n − k + 1)`` (0 when k = 0) and
    ``high = B⁻¹(1 − α/2; k + 1, n − k)`` (1 when k = n), B⁻¹ the beta quantile. Each end alone is a
    one-sided bound at level 1 − α/2. Vectorised over ``successes``.
    """
    from scipy.stats import beta

    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence!r}")
    k, n = np.asarray(successes, dtype=np.float64), np.asarray(trials, dtype=np.float64)
    alpha = 1 - confidence
    with np.errstate(invalid="ignore", divide="ignore"):
        low = np.where(k > 0, beta.ppf(alpha / 2, k, n - k + 1), 0.0)
        high = np.where(k < n, beta.ppf(1 - alpha / 2, k + 1, n - k), 1.0)
    return low, high


def _half_split(values: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``values`` in a pseudo-random order cut in two: ``⌊n/2⌋`` to choose the threshold, the rest for the bound."""
    order = rng.permutation(values.size)
    return values[order[: values.size // 2]], values[order[values.size // 2 :]]


def _threshold_epsilon(
    tp: Any, fp: Any, n_in: int, n_out: int, *, delta: float, confidence: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ε_lb, TPR_lo, FPR_hi)`` of threshold tests with ``tp``/``fp`` positives among ``n_in``/``n_out``."""
    tpr_lo, _ = clopper_pearson(tp, n_in, confidence=confidence)
    _, fpr_hi = clopper_pearson(fp, n_out, confidence=confidence)
    with np.errstate(divide="ignore", invalid="ignore"):
        eps1 = np.where(tpr_lo > delta, np.log((tpr_lo - delta) / fpr_hi), -np.inf)
        eps2 = np.where(1 - fpr_hi > delta, np.log((1 - fpr_hi - delta) / (1 - tpr_lo)), -np.inf)
    return np.nan_to_num(np.maximum(eps1, eps2), nan=-np.inf), tpr_lo, fpr_hi


def epsilon_lower_bound(
    scores_in: Any, scores_out: Any, *, delta: float, confidence: float = 0.95, split_seed: int = 0
) -> dict[str, Any]:
    """Empirical ε lower bound of a threshold test (Jagielski et al. 2020; Nasr et al. 2021), with the
    threshold chosen on half of the canaries and the bound computed on the other half.

    An (ε, δ)-DP mechanism forces every test to satisfy TPR ≤ e^ε FPR + δ and
    1 − FPR ≤ e^ε (1 − TPR) + δ (Kairouz et al. 2015), so for a threshold fixed in advance
    ``ε ≥ max(log((TPR − δ)/FPR), log((1 − FPR − δ)/(1 − TPR)))``; the rates are replaced by the
    Clopper–Pearson bounds TPR_lo and FPR_hi of the two-sided ``confidence`` interval. Each is a one-sided
    bound at level 1 − α/2 (α = 1 − confidence), so both hold together with probability ≥ ``confidence``
    (union bound) and then both terms of the max are ≤ ε: the result is a **one-sided** lower confidence
    bound on ε at that level.

    That holds only for a threshold chosen without the scores it is evaluated on: the maximum over all
    thresholds of the same scores over-claims (7–9 % of no-leak audits gave ε_lb > 0 at 0.95). So the
    inserted and the held-out scores are each shuffled by a fixed permutation (``numpy.random.default_rng
    (split_seed)``: deterministic, reproducible) and cut in two; the threshold (test "member iff s ≥ τ",
    τ midway between two adjacent scores) maximising the same ε bound on the first halves is evaluated once
    on the second halves, whose counts alone enter the bound. The order of the scores passed in must not
    depend on their values beyond what a fixed shuffle undoes (canary order is fine). The split costs power:
    the bound sees ⌈n/2⌉ canaries per side. Returns the bound, floored at 0 (0 also when a side has fewer
    than 2 scores), with the threshold and the second halves' rates that attain it, and the sizes of the two
    halves (``threshold_canaries``, ``bound_canaries``).
    """
    if not 0 <= delta < 1:
        raise ConfigError(f"delta must be in [0, 1), got {delta!r}")
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence!r}")
    a, b = _scores(scores_in, scores_out)
    rng = np.random.default_rng(split_seed)
    (pick_in, test_in), (pick_out, test_out) = _half_split(a, rng), _half_split(b, rng)
    zero = {
        "epsilon_lower_bound": 0.0,
        "threshold": None,
        "tpr": None,
        "fpr": None,
        "confidence": confidence,
        "threshold_canaries": {"inserted": int(pick_in.size), "held_out": int(pick_out.size)},
        "bound_canaries": {"inserted": int(test_in.size), "held_out": int(test_out.size)},
    }
    if pick_in.size == 0 or pick_out.size == 0:
        return zero
    c = threshold_counts(pick_in, pick_out)
    chosen = _threshold_epsilon(c["tp"], c["fp"], c["n_in"], c["n_out"], delta=delta, confidence=confidence)[0]
    best = int(np.argmax(chosen))
    if not chosen[best] > -np.inf or best == 0:  # no threshold of the first halves says anything (or τ = +∞)
        return zero
    above, below = c["threshold"][best], c["threshold"][best + 1] if best + 1 < c["threshold"].size else -np.inf
    tau = float(above / 2 + below / 2) if np.isfinite(below) else float(above)
    tp, fp = int(np.sum(test_in >= tau)), int(np.sum(test_out >= tau))
    eps, tpr_lo, fpr_hi = _threshold_epsilon(tp, fp, test_in.size, test_out.size, delta=delta, confidence=confidence)
    if not float(eps) > 0:
        return zero
    return {
        **zero,
        "epsilon_lower_bound": float(eps),
        "threshold": tau,
        "tpr": tp / test_in.size,
        "fpr": fp / test_out.size,
        "tpr_low": float(tpr_lo),
        "fpr_high": float(fpr_hi),
    }


def save_roc_png(scores_in: Any, scores_out: Any, path: str | os.PathLike, title: str = "") -> Path:
    """ROC curve of the membership scores with the chance diagonal (matplotlib Agg canvas, atomic)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fpr, tpr = roc_curve(scores_in, scores_out)
    fig = Figure(figsize=(4.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, label="loss attack")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    ax.set(xlabel="false positive rate (held-out)", ylabel="true positive rate (inserted)", xlim=(0, 1), ylim=(0, 1))
    ax.set_title(title, fontsize=8)
    ax.legend(loc="lower right")
    fig.tight_layout()
    from dpcap.eval.probe import save_figure_atomically

    return save_figure_atomically(fig, Path(path))


# ---------------------------------------------------------------- the audit


def _generators(seed: int | None) -> dict[str, np.random.Generator]:
    """Independent generators for canary content, coins and exposure candidates (os.urandom if no seed)."""
    entropy = seed if seed is not None else int.from_bytes(os.urandom(16), "little")
    children = np.random.SeedSequence(entropy).spawn(3)
    return dict(zip(("canaries", "coins", "candidates"), (np.random.default_rng(s) for s in children)))


def _eval_device(name: str) -> torch.device:
    """The training device setting for scoring: "auto" = the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _fresh_out(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"audit output {out} exists and is not an empty folder; choose a new one")
    out.mkdir(parents=True, exist_ok=True)
    return out


def evaluate_canaries(
    model: torch.nn.Module,
    canaries: Sequence[Canary],
    *,
    space: SecretSpace,
    transform: Callable[[Image.Image], torch.Tensor],
    tokenizer: Callable,
    candidates: int,
    rng: np.random.Generator,
    delta: float,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Scores, exposures, AUC and ε lower bound of a trained captioner on its canaries."""
    images = load_canary_images(canaries, transform)
    tokens = check_canary_tokens(tokenizer, [c.caption for c in canaries])
    scores = membership_scores(model, images, tokens)
    exposure = exposures(model, images, canaries, space, tokenizer, candidates=candidates, rng=rng)
    member = np.array([c.inserted for c in canaries])
    bound = epsilon_lower_bound(scores[member], scores[~member], delta=delta, confidence=confidence)
    return {
        "auc": roc_auc(scores[member], scores[~member]),
        "exposure": {"inserted": float(exposure[member].mean()), "held_out": float(exposure[~member].mean())},
        "max_exposure": math.log2(candidates),
        **bound,
        "scores": scores,
        "exposures": exposure,
    }


def run_audit(
    config_path: str | os.PathLike | None,
    overrides: Sequence[str] = (),
    *,
    out_dir: str | os.PathLike,
    canaries: int = 128,
    seed: int | None = None,
    base_source: str | os.PathLike | None = None,
    candidates: int = 256,
    secret_words: int = 3,
    insert_prob: float = 0.5,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Insert canaries, train the configured run, measure leakage; write ``report.json`` and ``roc.png``.

    ``out_dir`` (new or empty) receives ``canaries/`` (PNGs), ``data/`` (manifest and shards), ``run/``
    (the training run), ``canaries.json`` (per-canary secret, coin, score, exposure), ``report.json`` and
    ``roc.png``. The base data is ``base_source`` (a shard folder, or a folder/manifest to build) or else
    the config's ``data.shards``. Returns the report.
    """
    from dpcap.config import load_config
    from dpcap.data.reader import image_transform
    from dpcap.model.registry import get_config, get_tokenizer
    from dpcap.pipeline import load_run
    from dpcap.train.loop import train

    started = time.perf_counter()
    out = _fresh_out(out_dir)
    run_dir = out / "run"
    fixed = [*overrides, *([f"data.shards={base_source}"] if base_source is not None else []), f"run_dir={run_dir}"]
    config = load_config(config_path, fixed)
    model_cfg = get_config(config.model.size, **config.model.overrides())
    space, rngs = SecretSpace(length=secret_words), _generators(seed)
    tokenizer = get_tokenizer(config.model.size, **config.model.overrides())
    transform = image_transform(model_cfg.vision.image_size, model_cfg.image_mean, model_cfg.image_std)
    check_canary_tokens(tokenizer, [space.caption(space.size - 1)])
    made = make_canaries(
        out / "canaries",
        canaries,
        image_size=model_cfg.vision.image_size,
        space=space,
        rng=rngs["canaries"],
        coins=rngs["coins"],
        insert_prob=insert_prob,
    )
    data = build_audit_data(config.data.shards, made, out / "data")
    card = train(load_config(config_path, [*fixed, f"data.shards={data['out']}"]))
    model = load_run(run_dir)[0].to(_eval_device(config.train.device))
    found = evaluate_canaries(
        model,
        made,
        space=space,
        transform=transform,
        tokenizer=tokenizer,
        candidates=candidates,
        rng=rngs["candidates"],
        delta=card["delta"],
        confidence=confidence,
    )
    return _finish(out, made, found, card, data, seed=seed, space=space, started=started)


def _finish(
    out: Path,
    made: Sequence[Canary],
    found: dict[str, Any],
    card: dict[str, Any],
    data: dict[str, Any],
    *,
    seed: int | None,
    space: SecretSpace,
    started: float,
) -> dict[str, Any]:
    """Assemble the report; write canaries.json, report.json and roc.png."""
    scores, exposure = found.pop("scores"), found.pop("exposures")
    member = np.array([c.inserted for c in made])
    per_canary = [{**asdict(c), "score": float(s), "exposure": float(e)} for c, s, e in zip(made, scores, exposure)]
    _atomic_write(out / "canaries.json", json.dumps(per_canary, indent=1).encode("utf-8"))
    eps = card.get("epsilon")
    report = {
        **found,
        "epsilon": eps,
        "delta": card["delta"],
        "sigma": card["sigma"],
        "private": card["private"],
        "canaries": {"inserted": int(member.sum()), "held_out": int((~member).sum())},
        "num_samples": card["num_samples"],
        "base_samples": data["base_samples"],
        "skipped": data["skipped"],
        "steps": card["steps"],
        "sample_rate": card["sample_rate"],
        "secret_space": space.size,
        "seed": seed,
        "run_dir": card["run_dir"],
        "roc": str(out / "roc.png"),
        "seconds": round(time.perf_counter() - started, 1),
        "note": NOTE,
    }
    title = (
        f"AUC {report['auc']:.3f}, ε_lb {report['epsilon_lower_bound']:.2f}, ε {_fmt(eps)} (σ = {card['sigma']:.3g})"
    )
    save_roc_png(scores[member], scores[~member], out / "roc.png", title=title)
    _atomic_write(out / "report.json", json.dumps(report, indent=2).encode("utf-8"))
    return report


def _fmt(eps: float | None) -> str:
    return "∞" if eps is None or not math.isfinite(eps) else f"{eps:.2f}"
