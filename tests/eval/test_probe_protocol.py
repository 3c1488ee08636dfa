"""`dpcap probe --protocol dpcap` (DP-Cap's released recipe), the probe report, its warnings, --threads.

Oracle for the fit: scikit-learn's ``LogisticRegression(fit_intercept=False, C=1/(n·λ))`` on the same
row-centred, L2-normalised features (the objective mean CE + (λ/2)‖W‖² divided by n·C).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression

from dpcap.cli import main
from dpcap.errors import ConfigError
from dpcap.eval.probe import (
    DPCAP_LAMBDA,
    center_and_normalize_rows,
    confusion_matrix,
    dpcap_probe,
    fit_logistic_regression,
    l2_edge_warning,
    logistic_objective,
    most_confused_classes,
    save_confusion_png,
    torch_threads,
)
from tests.conftest import train_overrides, write_caption_folder
from tests.eval.test_probe import blobs, one_thread  # noqa: F401 (one_thread: an autouse fixture)

REPORT_KEYS = {
    "encoder",
    "name",
    "privacy",
    "protocol",
    "pool",
    "label",
    "data",
    "top1",
    "l2",
    "l2_grid",
    "num_train",
    "num_test",
    "num_classes",
    "classes",
    "seconds",
    "warnings",
    "threads",
}


def run(capsys, argv: list[str]) -> tuple[dict, str]:
    """`dpcap ARGV --json` → (the JSON result, stderr)."""
    assert main([*argv, "--json"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out.strip().splitlines()[-1]), captured.err


@pytest.fixture(scope="module")
def other_shards(tmp_path_factory) -> Path:
    """24 more labelled samples (other noise), for a test split distinct from `tiny_shards`."""
    from dpcap.data.build import build_shards

    root = tmp_path_factory.mktemp("other")
    build_shards(write_caption_folder(root / "src", count=24, seed=1), root / "shards", samples_per_shard=24)
    return root / "shards"


@pytest.fixture(scope="module")
def image_trees(tmp_path_factory) -> Path:
    """ImageFolder trees train/ and test/: two flat-colour classes, 4 images each per split."""
    root = tmp_path_factory.mktemp("trees")
    for s, split in enumerate(("train", "test")):
        for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(4):
                shade = tuple(max(0, c - 7 * i - 3 * s) for c in colour)
                Image.new("RGB", (20, 20), shade).save(folder / f"{i}.png")
    return root


# --- the fit: no standardisation, no intercept, against scikit-learn ---------------------------


@pytest.mark.parametrize("spread", [0.8, 2.5], ids=["separated", "overlapping"])
@pytest.mark.parametrize("dpcap_lambda", [False, True], ids=["l2=1e-3", "l2=0.0025/n"])
def test_no_intercept_unstandardised_fit_matches_sklearn(spread: float, dpcap_lambda: bool) -> None:
    x, y = blobs(1500, 32, 8, spread, seed=1)
    z = center_and_normalize_rows(torch.as_tensor(x)).numpy()
    ztr, ytr, zte, yte = z[:1200], y[:1200], z[1200:], y[1200:]
    n, tol = len(ytr), 1e-9
    l2 = DPCAP_LAMBDA / n if dpcap_lambda else 1e-3
    head = fit_logistic_regression(
        torch.as_tensor(ztr),
        ytr,
        l2=l2,
        num_classes=8,
        standardize=False,
        fit_intercept=False,
        tolerance_grad=tol,
        max_iter=2000,
    )
    clf = LogisticRegression(C=1.0 / (n * l2), fit_intercept=False, solver="lbfgs", max_iter=20000, tol=1e-10)
    clf.fit(ztr, ytr)
    assert torch.count_nonzero(head.bias) == 0 and torch.count_nonzero(head.mean) == 0
    assert torch.equal(head.std, torch.ones_like(head.std))  # nothing standardised
    ours = (head.predict(torch.as_tensor(zte)).numpy() == yte).mean()
    assert abs(ours - clf.score(zte, yte)) <= 0.005
    ref_head = type(head)(torch.as_tensor(clf.coef_), torch.zeros_like(head.bias), head.mean, head.std)
    j_ours = float(logistic_objective(head, torch.as_tensor(ztr), torch.as_tensor(ytr), l2))
    j_ref = float(logistic_objective(ref_head, torch.as_tensor(ztr), torch.as_tensor(ytr), l2))
    # Strong convexity (modulus λ): J − J* ≤ ‖∇J‖² / (2λ) ≤ #params · tol² / (2λ).
    assert j_ours <= j_ref + head.weight.numel() * tol**2 / (2 * l2) + 1e-12
    scale = float(np.abs(clf.coef_).max())
    assert np.abs(head.weight.numpy() - clf.coef_).max() <= 1e-4 * max(scale, 1.0) + 1e-5


def test_center_and_normalize_rows_is_cyanures_row_preprocessing() -> None:
    x = torch.as_tensor(blobs(50, 7, 3, 1.0, seed=2)[0])
    z = center_and_normalize_rows(x)
    # cyanure.preprocess(X, centering=True, normalize=True, columns=False): per row, centre, then unit norm.
    ref = x.numpy() - x.numpy().mean(axis=1, keepdims=True)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(z.numpy(), ref, rtol=1e-12, atol=1e-12)
    mean = x.mean(dim=0)
    z_train_mean = center_and_normalize_rows(x, mean)
    np.testing.assert_allclose(z_train_mean.norm(dim=1).numpy(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(z_train_mean.numpy() * (x - mean).norm(dim=1, keepdim=True).numpy(), (x - mean).numpy())
    assert torch.equal(center_and_normalize_rows(torch.ones(2, 3)), torch.zeros(2, 3))  # a constant row stays 0


@pytest.mark.parametrize("centering", ["sample", "train"])
def test_dpcap_probe_is_sklearn_on_the_preprocessed_features(centering: str) -> None:
    x, y = blobs(1000, 24, 6, 2.0, seed=3)
    xtr, ytr, xte, yte = x[:800], y[:800], x[800:], y[800:]
    report = dpcap_probe(xtr, ytr, xte, yte, centering=centering, tolerance_grad=1e-9)
    assert report["l2"] == pytest.approx(0.0025 / 800) and report["lambd"] == 0.0025
    assert report["num_train"] == 800 and report["val_top1"] is None and report["centering"] == centering
    mean = xtr.mean(axis=0) if centering == "train" else None
    ztr, zte = (center_and_normalize_rows(torch.as_tensor(v), mean).numpy() for v in (xtr, xte))
    clf = LogisticRegression(C=400.0, fit_intercept=False, max_iter=20000, tol=1e-10).fit(ztr, ytr)  # 1/(n·λ)
    assert abs(report["top1"] - clf.score(zte, yte)) <= 0.005
    assert abs(report["train_top1"] - clf.score(ztr, ytr)) <= 0.005
    assert 0.3 < report["top1"] < 0.97  # neither trivial nor chance
    with pytest.raises(ConfigError, match="centering"):
        dpcap_probe(xtr, ytr, xte, yte, centering="column")


def test_l2_edge_warning() -> None:
    grid = (1e-4, 1e-2, 1.0)
    assert l2_edge_warning(1e-2, grid) is None
    assert "largest" in l2_edge_warning(1.0, grid) and "smallest" in l2_edge_warning(1e-4, grid)
    assert l2_edge_warning(1e-3, (1e-3,)) is None  # a one-value grid has no inside


# --- the CLI: dpcap protocol end to end, report keys, warnings --------------------------------


def test_dpcap_protocol_end_to_end(capsys, tiny_shards, other_shards, tmp_path) -> None:
    out = tmp_path / "probe.json"
    argv = ["probe", "random:nano", "--train", str(tiny_shards), "--test", str(other_shards)]
    report, err = run(capsys, [*argv, "--label", "colour", "--protocol", "dpcap", "--out", str(out)])
    assert REPORT_KEYS <= report.keys()
    assert report["protocol"] == "dpcap" and report["pool"] == "mean_all" and report["label"] == "colour"
    assert report["l2"] == pytest.approx(0.0025 / 48) and report["l2_grid"] == [report["l2"]]
    assert report["num_train"] == 48 and report["num_test"] == 24 and report["num_classes"] == 4
    assert report["encoder"] == "random:nano" and report["privacy"] is None  # a random init saw no data
    assert report["data"]["train"] == {"path": str(tiny_shards), "kind": "shards", "label": "colour", "num_samples": 48}
    assert report["data"]["test"]["num_samples"] == 24 and "val" not in report["data"]
    assert set(report["seconds"]) == {"features_train", "features_test", "fit", "total"}
    assert report["warnings"] == [] and "warning:" not in err
    assert "train features 48 × 128" in err and "test features 24 × 128" in err and "test top-1" in err
    saved = json.loads(out.read_text())
    assert saved["per_l2"] == {str(report["l2"]): None} and saved["top1"] == report["top1"]
    assert out.with_suffix(".png").stat().st_size > 0


def test_dpcap_protocol_ignores_val_with_a_warning(capsys, tiny_shards, other_shards) -> None:
    data = ["--train", str(tiny_shards), "--test", str(other_shards), "--val", str(other_shards)]
    report, err = run(capsys, ["probe", "random:nano", *data, "--label", "shape", "--protocol", "dpcap"])
    assert "val" not in report["data"] and report["num_classes"] == 2
    assert len(report["warnings"]) == 1 and "--val" in report["warnings"][0]
    assert f"warning: {report['warnings'][0]}" in err


def test_run_folder_report_has_the_privacy_card(capsys, tiny_shards, other_shards, tmp_path) -> None:
    run_dir = tmp_path / "run"
    assert main(["train", *train_overrides(tiny_shards, run_dir, **{"train.steps": 2})]) == 0
    capsys.readouterr()
    data = ["--train", str(tiny_shards), "--test", str(other_shards), "--label", "colour"]
    report, _ = run(capsys, ["probe", str(run_dir), *data, "--protocol", "dpcap"])
    privacy = report["privacy"]
    assert {"epsilon", "delta", "sigma", "steps", "private", "step", "weights"} <= privacy.keys()
    assert privacy["steps"] == 2 and privacy["step"] == 2 and privacy["weights"] == "last"
    assert privacy["private"] is False  # the fixture's insecure seeds void the guarantee
    assert privacy["epsilon"] > 0 and privacy["delta"] > 0


def test_sweep_reports_grid_and_edge_warning(capsys, tiny_shards, other_shards) -> None:
    from dpcap.pipeline import probe_encoder

    report = probe_encoder(
        "random:nano", train_dir=str(tiny_shards), test_dir=str(other_shards), label="colour", l2_grid=(1e-2, 1.0)
    )
    assert report["protocol"] == "sweep" and report["pool"] == "mean" and report["l2_grid"] == [1e-2, 1.0]
    assert report["l2"] in (1e-2, 1.0) and 0 <= report["val_top1"] <= 1  # a two-value grid: always an edge
    assert len(report["warnings"]) == 1 and report["warnings"][0].startswith(f"the chosen λ = {report['l2']:.0e}")
    # The CLI's default grid, its default protocol, and the warning lines on stderr.
    data = ["--train", str(tiny_shards), "--test", str(other_shards), "--label", "colour"]
    cli, err = run(capsys, ["probe", "random:nano", *data])
    assert cli["protocol"] == "sweep" and len(cli["l2_grid"]) == 7 and cli["l2"] in cli["l2_grid"]
    assert err.count("warning: ") == len(cli["warnings"])
    assert set(cli["seconds"]) == {"features_train", "features_test", "fit", "total"}


def test_train_equal_to_test_warns(capsys, tiny_shards, tmp_path) -> None:
    data = ["--label", "colour", "--protocol", "dpcap"]
    report, err = run(capsys, ["probe", "random:nano", "--train", str(tiny_shards), "--test", str(tiny_shards), *data])
    (same,) = report["warnings"]
    assert same.startswith("train and test are the same data (") and f"warning: {same}" in err
    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)  # another path, the same images: caught by identical features
    report, _ = run(capsys, ["probe", "random:nano", "--train", str(tiny_shards), "--test", str(copy), *data])
    (same,) = report["warnings"]
    assert same.startswith("train and test are the same data: every one of the 48 test samples")


def test_label_on_an_imagefolder_tree_warns_and_default_needs_none(capsys, image_trees, tiny_shards) -> None:
    trees = ["--train", str(image_trees / "train"), "--test", str(image_trees / "test")]
    report, err = run(capsys, ["probe", "random:nano", *trees, "--protocol", "dpcap"])
    assert report["label"] == "folder name" and report["warnings"] == [] and "warning:" not in err
    assert report["data"]["train"]["kind"] == "imagefolder" and report["num_classes"] == 2
    report, err = run(capsys, ["probe", "random:nano", *trees, "--label", "group", "--protocol", "dpcap"])
    (ignored,) = report["warnings"]
    assert ignored.startswith("--label 'group' is ignored for the image folder") and f"warning: {ignored}" in err
    assert report["num_classes"] == 2  # the folder names, whatever --label says
    # A built shard folder has no label of its own: it needs --label (README: `--label group`).
    assert main(["probe", "random:nano", "--train", str(tiny_shards), "--test", str(tiny_shards)]) == 2
    assert "give --label FIELD" in capsys.readouterr().err


# --- threads, and the confusion figure --------------------------------------------------------


def test_threads_option_sets_and_restores_the_thread_count(capsys, monkeypatch, tiny_shards, other_shards) -> None:
    import dpcap.eval.features as features
    import dpcap.eval.probe as probe

    seen = {"extract": [], "fit": []}
    extract, run_lbfgs = features.extract_features, probe._run_lbfgs

    def extracting(*args, **kwargs):
        seen["extract"].append(torch.get_num_threads())
        return extract(*args, **kwargs)

    def fitting(*args, **kwargs):
        seen["fit"].append(torch.get_num_threads())
        return run_lbfgs(*args, **kwargs)

    monkeypatch.setattr(features, "extract_features", extracting)
    monkeypatch.setattr(probe, "_run_lbfgs", fitting)
    data = ["--train", str(tiny_shards), "--test", str(other_shards), "--label", "colour", "--protocol", "dpcap"]
    torch.set_num_threads(2)  # the autouse fixture restores the session's count afterwards
    report, _ = run(capsys, ["probe", "random:nano", *data, "--threads", "1"])
    assert report["threads"] == 1 and seen["extract"] == [1, 1] and set(seen["fit"]) == {1}
    assert torch.get_num_threads() == 2  # restored
    seen["extract"].clear()
    seen["fit"].clear()
    torch.set_num_threads(1)
    run(capsys, ["probe", "random:nano", *data, "--threads", "2"])  # explicit: beats the small-fit rule
    assert seen["extract"] == [2, 2] and set(seen["fit"]) == {2} and torch.get_num_threads() == 1
    assert main(["probe", "random:nano", *data, "--threads", "0"]) == 2
    assert "threads must be a positive integer" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        with torch_threads(0):
            pass


def test_confusion_png_shows_the_most_confused_classes(tmp_path: Path) -> None:
    k = 60
    true = np.repeat(np.arange(k), 5)
    pred = true.copy()
    worst = [3, 17, 42]
    for j, c in enumerate(worst):  # class c: 4 - j of its 5 samples wrong
        pred[c * 5 : c * 5 + 4 - j] = (c + 1) % k
    cm = confusion_matrix(true, pred, k)
    assert most_confused_classes(cm, 3) == worst and most_confused_classes(cm, 4)[:3] == [0, 3, 17]
    labels = [f"a-rather-long-class-name-number-{i:03d}" for i in range(k)]
    full = save_confusion_png(cm, tmp_path / "full.png", labels, title="enc: dpcap linear probe, top-1 99.0%")
    top = save_confusion_png(cm, tmp_path / "top.png", labels, title="enc: dpcap", top_classes=20)
    small = save_confusion_png(confusion_matrix([0, 1], [0, 1], 2), tmp_path / "small.png", ["a", "b"], top_classes=20)
    with Image.open(full) as a, Image.open(top) as b, Image.open(small) as c:
        assert b.size[0] < 0.65 * a.size[0] and c.size[0] < b.size[0]  # 20 of 60 classes drawn


def test_sweep_with_val_warns_when_val_is_the_test_set(capsys, tiny_shards, other_shards) -> None:
    data = ["--train", str(tiny_shards), "--val", str(other_shards), "--test", str(other_shards), "--label", "colour"]
    report, err = run(capsys, ["probe", "random:nano", *data])
    assert report["data"]["val"]["num_samples"] == 24 and report["num_train"] == 48 + 24  # refit on train + val
    assert "features_val" in report["seconds"] and "val features 24 × 128" in err
    assert any(w.startswith("val and test are the same data (") for w in report["warnings"])


def test_shared_rows_counts_bitwise_identical_feature_rows() -> None:
    from dpcap.pipeline import _shared_rows

    a = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    b = torch.cat([a[[7, 300, 499]], torch.randn(10, 16), a[:1] + 1e-6])  # 3 shared, 11 not
    assert _shared_rows(a, b) == 3 and _shared_rows(a, a) == 500 and _shared_rows(a, b[3:]) == 0
    assert _shared_rows(a, torch.zeros(0, 16)) == 0 and _shared_rows(a, torch.zeros(4, 8)) == 0
