"""Zero-shot classification by caption likelihood, with the class prompts shared in a prefix tree.

A captioner scores a prompt t = [SOT, t_1, …, t_m, EOT] for image x by its log-likelihood

    log p(t | x) = Σ_{j=1}^{m+1} log p(t_j | t_<j, x)                     (``Captioner.caption_logprob``)

and predicts the class whose prompts score highest (DP-Cap, Sander et al. 2024, §4.2; Tschannen et
al. 2023, "Image Captioners Are Scalable Vision Learners Too", §3.3).

Prompts share prefixes ("an emoji of …"), so the decoder runs over the *trie* of the tokenized
prompts instead of over every prompt: a node is one distinct prefix t_<j (the root is [SOT]) and is
evaluated once per image, giving the next-token distribution p(· | t_<j, x); an edge (node, token)
carries log p(token | node, x), and a prompt's score is the sum of the edges on its path. Nodes are
processed level by level (depth = position), each attending to the keys/values cached for its
ancestors, so a node costs one decoder position; the image tokens and their cross-attention keys
and values are computed once per image. The decoder cost is therefore the number of trie nodes,
not Σ_prompts length, and it grows only with the tokens in which prompts differ.

Several prompts per class (templates) are combined by ``reduce``: ``"mean"`` (default) averages the
log-likelihoods (the log of the geometric mean likelihood), ``"max"`` takes the best template, and
``"logmeanexp"`` gives log (1/T) Σ_τ p(t_τ | x), the likelihood of a uniform mixture of templates.
With ``length_norm`` each prompt's log-likelihood is divided by its number of scored tokens (m + 1)
first, so long class names are not penalised for their length.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dpcap.errors import ConfigError, DataError

DEFAULT_TEMPLATES: tuple[str, ...] = ("an emoji of {}",)
"""The demo data set's caption format (``dpcap.data.demo``)."""

REDUCTIONS = ("mean", "max", "logmeanexp")


@dataclass(frozen=True)
class PromptTrie:
    """Prefix tree of token sequences, laid out level by level for batched decoding.

    Nodes are the distinct proper prefixes t_<j (j ≥ 1) of the sequences, numbered by (length,
    tokens), so depth d occupies ``level_bounds[d] : level_bounds[d + 1]``. ``ancestors[d]`` is
    (n_d, d + 1): each depth-d node's path from its root to itself. Edges (node, next token) are
    sorted by node; ``prompt_edges`` (P, L_max) lists each sequence's edges, padded with ``num_edges``
    (an extra edge whose log-probability is 0).
    """

    tokens: torch.Tensor
    level_bounds: tuple[int, ...]
    ancestors: tuple[torch.Tensor, ...]
    edge_node: torch.Tensor
    edge_token: torch.Tensor
    prompt_edges: torch.Tensor
    prompt_lengths: torch.Tensor

    @property
    def num_nodes(self) -> int:
        """Decoder positions per image."""
        return int(self.tokens.numel())

    @property
    def num_edges(self) -> int:
        return int(self.edge_node.numel())

    @property
    def depth(self) -> int:
        return len(self.level_bounds) - 1

    @property
    def brute_force_positions(self) -> int:
        """Decoder positions per image when every sequence is run separately: Σ_prompts (length − 1)."""
        return int(self.prompt_lengths.sum())

    @classmethod
    def from_sequences(cls, sequences: Sequence[Sequence[int]]) -> PromptTrie:
        """Build the trie of ``sequences`` (each at least 2 tokens: a prefix token and a target)."""
        seqs = [tuple(int(t) for t in s) for s in sequences]
        if not seqs or min(len(s) for s in seqs) < 2:
            raise ConfigError("every prompt needs at least 2 tokens (start token and one target)")
        prefixes = sorted({s[:j] for s in seqs for j in range(1, len(s))}, key=lambda p: (len(p), p))
        node_of = {p: i for i, p in enumerate(prefixes)}
        depths = [len(p) - 1 for p in prefixes]
        bounds = tuple(int(b) for b in np.searchsorted(depths, np.arange(depths[-1] + 2)))
        edges = sorted({(node_of[s[:j]], s[j]) for s in seqs for j in range(1, len(s))})
        edge_of = {e: i for i, e in enumerate(edges)}
        width = max(len(s) for s in seqs) - 1
        paths = torch.full((len(seqs), width), len(edges), dtype=torch.int64)
        for row, s in enumerate(seqs):
            paths[row, : len(s) - 1] = torch.tensor([edge_of[(node_of[s[:j]], s[j])] for j in range(1, len(s))])
        return cls(
            tokens=torch.tensor([p[-1] for p in prefixes], dtype=torch.int64),
            level_bounds=bounds,
            ancestors=_ancestors(prefixes, node_of, bounds),
            edge_node=torch.tensor([e[0] for e in edges], dtype=torch.int64),
            edge_token=torch.tensor([e[1] for e in edges], dtype=torch.int64),
            prompt_edges=paths,
            prompt_lengths=torch.tensor([len(s) - 1 for s in seqs], dtype=torch.int64),
        )


def _ancestors(
    prefixes: list[tuple[int, ...]], node_of: dict[tuple[int, ...], int], bounds: tuple[int, ...]
) -> tuple[torch.Tensor, ...]:
    levels = []
    for d in range(len(bounds) - 1):
        level = prefixes[bounds[d] : bounds[d + 1]]
        levels.append(torch.tensor([[node_of[p[: i + 1]] for i in range(d + 1)] for p in level], dtype=torch.int64))
    return tuple(levels)


def tokenize_prompts(tokenizer: Callable[[list[str]], torch.Tensor], prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt's tokens up to and including the first EOT (``tokenizer.eot_id``, default 49407)."""
    from dpcap.data.tokenizer import EOT_ID

    eot = int(getattr(tokenizer, "eot_id", EOT_ID))
    rows = torch.as_tensor(tokenizer(list(prompts))).tolist()
    out = []
    for prompt, row in zip(prompts, rows):
        if eot not in row[1:]:
            raise DataError(f"tokenized prompt {prompt!r} has no end token {eot}")
        out.append(row[: row.index(eot, 1) + 1])
    return out


# ---------------------------------------------------------------- trie decoding


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, n, W) → (B, heads, n, W / heads), as ``Attention._split``."""
    b, n, w = x.shape
    return x.view(b, n, heads, w // heads).transpose(1, 2)


class _TrieDecoder:
    """Runs a `TextDecoder` over the trie nodes for one batch of images, with a per-node K/V cache.

    Mirrors ``TextDecoder.forward`` (embedding + learned position, pre-LN blocks of causal
    self-attention, cross-attention and MLP, final LayerNorm, vocabulary head) position by position:
    a depth-d node attends to the cached self-attention keys/values of its d ancestors and itself,
    which is what causal attention over the prefix computes at its last position.
    """

    def __init__(self, decoder: nn.Module, trie: PromptTrie, memory: torch.Tensor) -> None:
        self.dec, self.trie = decoder, trie
        batch, device, dtype = memory.shape[0], memory.device, memory.dtype
        width = decoder.token_embedding.embedding_dim
        self.cache = [
            (
                torch.empty(batch, trie.num_nodes, width, device=device, dtype=dtype),
                torch.empty(batch, trie.num_nodes, width, device=device, dtype=dtype),
            )
            for _ in decoder.blocks
        ]
        self.cross = [
            (
                _split_heads(b.cross_attn.k(memory), b.cross_attn.heads),
                _split_heads(b.cross_attn.v(memory), b.cross_attn.heads),
            )
            for b in decoder.blocks
        ]

    def node_logits(self, depth: int, start: int, stop: int) -> torch.Tensor:
        """(B, stop − start, V) float32 next-token logits of nodes ``start:stop`` (all at ``depth``)."""
        first = self.trie.level_bounds[depth]
        tokens = self.trie.tokens[start:stop].to(self.dec.head.weight.device)
        anc = self.trie.ancestors[depth][start - first : stop - first].to(tokens.device)
        x = self.dec.token_embedding(tokens) + self.dec.positions.weight[0, depth]
        x = x.unsqueeze(0).expand(self.cross[0][0].shape[0], -1, -1)
        for block, (k_cache, v_cache), (k_img, v_img) in zip(self.dec.blocks, self.cache, self.cross):
            x = x + self._self_attention(block, block.ln1(x), k_cache, v_cache, start, stop, anc)
            q = _split_heads(block.cross_attn.q(block.ln2(x)), block.cross_attn.heads)
            out = F.scaled_dot_product_attention(q, k_img, v_img)
            x = x + block.cross_attn.proj(out.transpose(1, 2).flatten(2))
            x = x + block.mlp(block.ln3(x))
        return self.dec.head(self.dec.ln_final(x)).float()

    @staticmethod
    def _self_attention(
        block: nn.Module,
        h: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        start: int,
        stop: int,
        anc: torch.Tensor,
    ) -> torch.Tensor:
        attn = block.self_attn
        k_cache[:, start:stop] = attn.k(h)
        v_cache[:, start:stop] = attn.v(h)
        b, n, w = h.shape
        heads, span = attn.heads, anc.shape[1]
        q = attn.q(h).reshape(b * n, 1, heads, w // heads).transpose(1, 2)
        k = k_cache[:, anc].reshape(b * n, span, heads, w // heads).transpose(1, 2)
        v = v_cache[:, anc].reshape(b * n, span, heads, w // heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return attn.proj(out.transpose(1, 2).reshape(b, n, w))


def _edge_logprobs(decoder: _TrieDecoder, trie: PromptTrie, positions_per_step: int) -> torch.Tensor:
    """(B, E + 1) float64: log p(edge token | edge node, image) for every edge, then a 0 pad column."""
    batch = decoder.cross[0][0].shape[0]
    out = torch.zeros(batch, trie.num_edges + 1, dtype=torch.float64, device=decoder.cross[0][0].device)
    step = max(1, positions_per_step // max(batch, 1))
    for depth in range(trie.depth):
        for start in range(trie.level_bounds[depth], trie.level_bounds[depth + 1], step):
            stop = min(start + step, trie.level_bounds[depth + 1])
            logits = decoder.node_logits(depth, start, stop)
            e0, e1 = (int(v) for v in torch.searchsorted(trie.edge_node, torch.tensor([start, stop])))
            rows = (trie.edge_node[e0:e1] - start).to(logits.device)
            cols = trie.edge_token[e0:e1].to(logits.device)
            picked = logits[:, rows, cols] - torch.logsumexp(logits, dim=-1)[:, rows]
            out[:, e0:e1] = picked.double()
    return out


def score_prompts(
    model: nn.Module,
    images: torch.Tensor,
    trie: PromptTrie,
    *,
    batch_size: int = 16,
    positions_per_step: int = 2048,
) -> torch.Tensor:
    """(N, P) float64 log-likelihoods log p(prompt | image) of every trie sequence, on the CPU.

    Images go through the model in chunks of ``batch_size`` (the image tokens and cross-attention
    keys/values computed once per chunk); each decoder call covers at most ``positions_per_step``
    (image, node) positions, which bounds the (positions × vocabulary) logits held at once. The K/V
    cache holds 2 · layers · nodes · width values per image. Runs under ``torch.no_grad`` in eval
    mode on the model's device; the model's train/eval mode is restored.
    """
    _check_positive("batch_size", batch_size)
    _check_positive("positions_per_step", positions_per_step)
    if trie.depth > model.decoder.context_length:
        raise ConfigError(f"prompts need {trie.depth} decoder positions, the model has {model.decoder.context_length}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with torch.no_grad():
            for i in range(0, images.shape[0], batch_size):
                memory = model.image_tokens(images[i : i + batch_size].to(device))
                edges = _edge_logprobs(_TrieDecoder(model.decoder, trie, memory), trie, positions_per_step)
                chunks.append(edges[:, trie.prompt_edges.to(device)].sum(dim=-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks) if chunks else torch.zeros(0, len(trie.prompt_lengths), dtype=torch.float64)


# ---------------------------------------------------------------- classification


@dataclass(frozen=True)
class ClassPrompts:
    """Flattened prompts: ``prompts[i]`` belongs to class ``owner[i]`` (an index into ``classes``)."""

    classes: list[Any]
    prompts: list[str]
    owner: torch.Tensor

    @classmethod
    def parse(cls, class_prompts: Mapping[Any, str | Sequence[str]] | Sequence[str]) -> ClassPrompts:
        """A {label: prompt or [prompts]} mapping, or a list with one prompt per class (labels 0…C−1)."""
        if isinstance(class_prompts, str):
            raise ConfigError("class_prompts must be a mapping {label: prompts} or a list of prompts, not a string")
        items = class_prompts.items() if isinstance(class_prompts, Mapping) else enumerate(class_prompts)
        classes, prompts, owner = [], [], []
        for label, value in items:
            texts = [value] if isinstance(value, str) else list(value)
            if not texts or not all(isinstance(t, str) for t in texts):
                raise ConfigError(f"class {label!r} needs a non-empty list of prompt strings, got {value!r}")
            owner += [len(classes)] * len(texts)
            classes.append(label)
            prompts += texts
        if not classes:
            raise ConfigError("class_prompts is empty")
        return cls(classes, prompts, torch.tensor(owner, dtype=torch.int64))


def class_scores(prompt_scores: torch.Tensor, owner: torch.Tensor, num_classes: int, reduce: str) -> torch.Tensor:
    """(N, P) prompt scores → (N, C) class scores by ``reduce`` over each class's prompts."""
    if reduce not in REDUCTIONS:
        raise ConfigError(f"unknown reduce {reduce!r}; valid: {', '.join(REDUCTIONS)}")
    out = torch.empty(prompt_scores.shape[0], num_classes, dtype=prompt_scores.dtype)
    for c in range(num_classes):
        cols = prompt_scores[:, owner == c]
        if reduce == "mean":
            out[:, c] = cols.mean(dim=1)
        elif reduce == "max":
            out[:, c] = cols.max(dim=1).values
        else:
            out[:, c] = torch.logsumexp(cols, dim=1) - math.log(cols.shape[1])
    return out


class ZeroShotClassifier:
    """Tokenized class prompts and their trie, built once and applied to any number of image batches."""

    def __init__(
        self,
        class_prompts: Mapping[Any, str | Sequence[str]] | Sequence[str],
        *,
        tokenizer: Callable[[list[str]], torch.Tensor],
        length_norm: bool = False,
        reduce: str = "mean",
    ) -> None:
        if reduce not in REDUCTIONS:
            raise ConfigError(f"unknown reduce {reduce!r}; valid: {', '.join(REDUCTIONS)}")
        self.spec = ClassPrompts.parse(class_prompts)
        self.trie = PromptTrie.from_sequences(tokenize_prompts(tokenizer, self.spec.prompts))
        self.length_norm, self.reduce = bool(length_norm), reduce

    @property
    def classes(self) -> list[Any]:
        return self.spec.classes

    def scores(self, model: nn.Module, images: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """((N, P) prompt log-likelihoods, (N, C) class scores after length norm and ``reduce``)."""
        prompt_scores = score_prompts(model, images, self.trie, **kwargs)
        normed = prompt_scores / self.trie.prompt_lengths.double() if self.length_norm else prompt_scores
        return prompt_scores, class_scores(normed, self.spec.owner, len(self.classes), self.reduce)


def zero_shot(
    model: nn.Module,
    images: torch.Tensor,
    class_prompts: Mapping[Any, str | Sequence[str]] | Sequence[str],
    *,
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
    batch_size: int = 16,
    length_norm: bool = False,
    reduce: str = "mean",
    positions_per_step: int = 2048,
) -> dict[str, Any]:
    """Classify ``images`` (N, 3, H, W) by the caption log-likelihood of each class's prompts.

    ``class_prompts`` maps each label (str or int) to one prompt or a list of prompts (templates),
    or is a list of one prompt per class (labels 0…C−1). ``tokenizer`` defaults to a
    ``CaptionTokenizer`` with the model's context length. Returns ``{"predictions": [label per
    image], "scores": (N, C) float64, "prompt_scores": (N, P) float64 log p(prompt | image),
    "classes", "prompts", "decoder_tokens" (trie positions evaluated, N · nodes),
    "brute_force_decoder_tokens" (N · Σ_prompts (length − 1)), "trie_nodes"}``. Ties go to the
    first class.
    """
    if tokenizer is None:
        from dpcap.data.tokenizer import CaptionTokenizer

        tokenizer = CaptionTokenizer(model.config.text.context_length, vocab=model.config.text.vocab)
    clf = ZeroShotClassifier(class_prompts, tokenizer=tokenizer, length_norm=length_norm, reduce=reduce)
    prompt_scores, scores = clf.scores(model, images, batch_size=batch_size, positions_per_step=positions_per_step)
    n = int(images.shape[0])
    return {
        "predictions": [clf.classes[i] for i in scores.argmax(dim=1).tolist()] if n else [],
        "scores": scores,
        "prompt_scores": prompt_scores,
        "classes": clf.classes,
        "prompts": clf.spec.prompts,
        "decoder_tokens": n * clf.trie.num_nodes,
        "brute_force_decoder_tokens": n * clf.trie.brute_force_positions,
        "trie_nodes": clf.trie.num_nodes,
    }


def template_prompts(templates: Sequence[str] = DEFAULT_TEMPLATES) -> Callable[[str], list[str]]:
    """``label → [template.format(label) for template in templates]``."""
    if isinstance(templates, str) or not templates or not all("{}" in t for t in templates):
        raise ConfigError(f"templates must be a non-empty list of strings containing '{{}}', got {templates!r}")
    return lambda label: [t.format(label) for t in templates]


def zero_shot_accuracy(
    model: nn.Module,
    shard_dir: str | os.PathLike,
    *,
    label_key: str,
    prompts_for: Callable[[str], str | Sequence[str]] | None = None,
    split: str | None = None,
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
    batch_size: int = 16,
    length_norm: bool = False,
    reduce: str = "mean",
    positions_per_step: int = 2048,
) -> dict[str, Any]:
    """Zero-shot top-1 on a labelled shard folder (labels ``str(meta[label_key])``).

    The classes are the distinct labels of the evaluated samples (those whose ``meta["split"]``
    equals ``split``, or all), sorted; ``prompts_for(label)`` gives each class's prompts (default
    :data:`DEFAULT_TEMPLATES`). Images go through ``dpcap.data.image_transform`` with the model's
    size, mean and std. The folder is read twice, streaming: once for the labels, once to score the
    selected samples. Returns a JSON-serialisable report: top1, num_samples, num_classes, classes,
    per_class_top1, predictions, labels, ids, length_norm, reduce, decoder_tokens,
    brute_force_decoder_tokens, trie_nodes.
    """
    from dpcap.data.reader import image_transform

    if tokenizer is None:
        from dpcap.data.tokenizer import CaptionTokenizer

        tokenizer = CaptionTokenizer(model.config.text.context_length, vocab=model.config.text.vocab)
    transform = image_transform(model.config.vision.image_size, model.config.image_mean, model.config.image_std)
    ids, labels = _select(shard_dir, transform, label_key, split, batch_size)
    if not ids:
        raise DataError(f"no samples in {shard_dir}" + (f" with split {split!r}" if split is not None else ""))
    classes = sorted(set(labels))
    prompts_for = prompts_for or template_prompts()
    clf = ZeroShotClassifier(
        {c: prompts_for(c) for c in classes}, tokenizer=tokenizer, length_norm=length_norm, reduce=reduce
    )
    kept_ids, predictions = _predict_shards(model, shard_dir, transform, ids, clf, batch_size, positions_per_step)
    label_of = dict(zip(ids, labels))
    truth = [label_of[i] for i in kept_ids]
    return _accuracy_report(clf, kept_ids, truth, predictions, length_norm, reduce)


def _select(
    shard_dir: str | os.PathLike, transform: Callable, label_key: str, split: str | None, batch_size: int
) -> tuple[list[int], list[str]]:
    ids, labels = [], []
    for batch in _batches(shard_dir, transform, None, batch_size):
        for gid, meta in zip(batch.ids.tolist(), batch.meta):
            if split is not None and str(meta.get("split", "")) != split:
                continue
            if label_key not in meta:
                keys = ", ".join(sorted(meta)) or "none"
                raise DataError(f"sample {gid} in {shard_dir} has no label {label_key!r} (keys: {keys})")
            ids.append(gid)
            labels.append(str(meta[label_key]))
    return ids, labels


def _batches(shard_dir: str | os.PathLike, transform: Callable, ids: list[int] | None, batch_size: int) -> Any:
    from dpcap.data.reader import MicroBatchLoader, SampleReader, split_micro_batches

    _check_positive("batch_size", batch_size)
    reader = SampleReader(shard_dir, transform)
    wanted = np.arange(len(reader)) if ids is None else np.asarray(ids, dtype=np.int64)
    try:
        yield from MicroBatchLoader(reader, split_micro_batches(wanted, batch_size))
    finally:
        reader.close()


def _predict_shards(
    model: nn.Module,
    shard_dir: str | os.PathLike,
    transform: Callable,
    ids: list[int],
    clf: ZeroShotClassifier,
    batch_size: int,
    positions_per_step: int,
) -> tuple[list[int], list[str]]:
    kept, predictions = [], []
    for batch in _batches(shard_dir, transform, ids, batch_size):
        if len(batch) == 0:
            continue
        _, scores = clf.scores(model, batch.images, batch_size=batch_size, positions_per_step=positions_per_step)
        kept += batch.ids.tolist()
        predictions += [clf.classes[i] for i in scores.argmax(dim=1).tolist()]
    return kept, predictions


def _accuracy_report(
    clf: ZeroShotClassifier, ids: list[int], truth: list[str], predictions: list[str], length_norm: bool, reduce: str
) -> dict[str, Any]:
    correct = np.array([t == p for t, p in zip(truth, predictions)], dtype=bool)
    per_class = {c: float(correct[[t == c for t in truth]].mean()) for c in clf.classes if c in set(truth)}
    n = len(ids)
    return {
        "top1": float(correct.mean()) if n else float("nan"),
        "num_samples": n,
        "num_classes": len(clf.classes),
        "classes": clf.classes,
        "per_class_top1": per_class,
        "predictions": predictions,
        "labels": truth,
        "ids": ids,
        "length_norm": length_norm,
        "reduce": reduce,
        "decoder_tokens": n * clf.trie.num_nodes,
        "brute_force_decoder_tokens": n * clf.trie.brute_force_positions,
        "trie_nodes": clf.trie.num_nodes,
    }


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
