"""Few-shot probes; oracle: scikit-learn's LogisticRegression on the same k-shot subset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from dpcap.errors import ConfigError
from dpcap.eval.fewshot import DEFAULT_FEWSHOT_L2, few_shot, shot_indices
from dpcap.eval.probe import encode_labels

NAMES = ("cat", "dog", "fish", "owl", "bee")


def blobs(n_per_class: int, seed: int, spread: float = 1.0) -> tuple[torch.Tensor, list[str]]:
    """5 Gaussian blobs in 16-D with fixed centres (norm ≈ 4·√16) and per-call noise."""
    centres = np.random.default_rng(123).normal(size=(len(NAMES), 16)) * 1.5
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + spread * rng.normal(size=(n_per_class, 16)) for c in centres])
    y = [name for name in NAMES for _ in range(n_per_class)]
    return torch.tensor(x), y


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, list[str], torch.Tensor, list[str]]:
    x_tr, y_tr = blobs(30, seed=1, spread=1.5)
    x_te, y_te = blobs(40, seed=2, spread=1.5)
    return x_tr, y_tr, x_te, y_te


@pytest.fixture(scope="module")
def report(data: tuple) -> dict:
    return few_shot(*data, shots=(1, 10), seeds=(0, 1, 2))


def test_more_shots_help_and_beat_chance(report: dict) -> None:
    one, ten = report["shots"][1], report["shots"][10]
    chance = 1 / len(NAMES)
    assert ten["mean"] > chance + 0.5
    assert ten["mean"] >= one["mean"]
    assert one["mean"] > chance
    assert report["num_classes"] == 5 and report["classes"] == sorted(NAMES)
    assert one["num_train"] == [5, 5, 5] and ten["num_train"] == [50, 50, 50]
    assert len(ten["per_seed"]) == 3 and ten["std"] == pytest.approx(np.std(ten["per_seed"], ddof=1))
    assert report["short_classes"] == {1: {}, 10: {}}
    json.dumps(report)  # JSON-serialisable


def test_deterministic_per_seed(data: tuple) -> None:
    a = few_shot(*data, shots=(2,), seeds=(5, 6))
    b = few_shot(*data, shots=(2,), seeds=(6,))
    assert a == few_shot(*data, shots=(2,), seeds=(5, 6))
    assert a["shots"][2]["per_seed"][1] == b["shots"][2]["per_seed"][0]
    ids = encode_labels(data[1])[1][0]
    assert torch.equal(shot_indices(ids, 2, 5), shot_indices(ids, 2, 5))
    assert not torch.equal(shot_indices(ids, 2, 5), shot_indices(ids, 2, 6))


@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_exactly_k_per_class_and_nested(k: int) -> None:
    labels = torch.tensor([0] * 12 + [1] * 15 + [2] * 20 + [3] * 11)[torch.randperm(58, generator=torch.Generator())]
    for seed in (0, 1, 2):
        idx = shot_indices(labels, k, seed)
        assert torch.equal(torch.bincount(labels[idx], minlength=4), torch.full((4,), k))
        assert idx.unique().numel() == idx.numel() and torch.equal(idx, idx.sort().values)
        if k > 1:
            assert set(shot_indices(labels, k - 1, seed).tolist()) < set(idx.tolist())


def test_short_classes_use_all_and_are_reported() -> None:
    x_tr, y_tr = blobs(6, seed=3)
    x_tr, y_tr = x_tr[:-4], y_tr[:-4]  # "owl" keeps 6, "bee" keeps 2
    x_te, y_te = blobs(5, seed=4)
    out = few_shot(x_tr, y_tr, x_te, y_te, shots=(1, 5), seeds=(0,))
    assert out["short_classes"] == {1: {}, 5: {"bee": 2}}
    assert out["shots"][5]["num_train"] == [4 * 5 + 2]
    ids = encode_labels(y_tr)[1][0]
    idx = shot_indices(ids, 5, 0)
    assert torch.bincount(ids[idx]).tolist() == [2, 5, 5, 5, 5]  # classes sorted: bee, cat, dog, fish, owl


def test_matches_sklearn_on_same_subset(data: tuple, report: dict) -> None:
    x_tr, y_tr, x_te, y_te = data
    classes, (ids_tr, ids_te) = encode_labels(y_tr, y_te)
    for k in (1, 10):
        for i, seed in enumerate((0, 1, 2)):
            idx = shot_indices(ids_tr, k, seed).numpy()
            scaler = StandardScaler().fit(x_tr.numpy()[idx])
            n = len(idx)
            clf = LogisticRegression(C=1.0 / (n * DEFAULT_FEWSHOT_L2), max_iter=5000, tol=1e-10)
            clf.fit(scaler.transform(x_tr.numpy()[idx]), ids_tr.numpy()[idx])
            oracle = float((clf.predict(scaler.transform(x_te.numpy())) == ids_te.numpy()).mean())
            assert abs(report["shots"][k]["per_seed"][i] - oracle) <= 0.01, (k, seed)


def test_unseen_test_classes_count_as_errors() -> None:
    x_tr, y_tr = blobs(4, seed=5, spread=0.1)
    x_te, y_te = blobs(4, seed=6, spread=0.1)
    y_te = ["zebra" if v == "cat" else v for v in y_te]
    out = few_shot(x_tr, y_tr, x_te, y_te, shots=(3,), seeds=(0,))
    assert out["num_test_unseen"] == 4
    assert out["shots"][3]["mean"] == pytest.approx(16 / 20)


@pytest.mark.parametrize(
    "kwargs", [{"shots": ()}, {"shots": (0,)}, {"shots": (1.5,)}, {"seeds": ()}, {"seeds": ("a",)}, {"l2": 0.0}]
)
def test_bad_arguments(data: tuple, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        few_shot(*data, **kwargs)


def test_bad_shapes(data: tuple) -> None:
    x_tr, y_tr, x_te, y_te = data
    with pytest.raises(ConfigError, match="labels"):
        few_shot(x_tr, y_tr[:-1], x_te, y_te)
    with pytest.raises(ConfigError, match="features"):
        few_shot(x_tr, y_tr, x_te[:, :3], y_te)
