"""ImageNet's folder layouts through imagefolder_features, on a miniature ImageNet built here.

Oracle: the per-image truth the fixture wrote, and encode_image on each image transformed by hand.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpcap.cli import main
from dpcap.data.reader import image_transform
from dpcap.errors import DataError
from dpcap.eval import features as features_module
from dpcap.eval.features import imagefolder_features
from dpcap.model import create_captioner

# three real synsets; the "devkit" order below is deliberately not the sorted one, as in the real devkit
SYNSETS = {
    "n01440764": "tench, Tinca tinca",
    "n01443537": "goldfish, Carassius auratus",
    "n01484850": "great white shark",
}
DEVKIT_ORDER = ["n01484850", "n01440764", "n01443537"]  # ILSVRC2012_ID 1, 2, 3
DISPLAY = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}
COLOURS = {"n01440764": (200, 40, 40), "n01443537": (40, 200, 40), "n01484850": (40, 40, 200)}
VAL_TRUTH = ["n01443537", "n01484850", "n01440764", "n01440764", "n01484850", "n01443537", "n01443537"]
TRAIN_PER_CLASS = 5


def _jpeg(path: Path, wnid: str, rng: np.random.Generator) -> None:
    base = np.array(COLOURS[wnid], dtype=np.int16)
    pixels = np.clip(base + rng.integers(-25, 26, size=(16, 16, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def _val_name(i: int) -> str:
    return f"ILSVRC2012_val_{i + 1:08d}.JPEG"


def _kaggle_mapping() -> str:  # Kaggle's LOC_synset_mapping.txt: sorted by WNID
    return "".join(f"{w} {SYNSETS[w]}\n" for w in sorted(SYNSETS))


def _devkit_mapping() -> str:  # the same lines in the (miniature) devkit's ILSVRC2012_ID order
    return "".join(f"{w} {SYNSETS[w]}\n" for w in DEVKIT_ORDER)


def _solution_csv() -> str:
    rows = [f"{_val_name(i)[:-5]},{w} 1 2 10 12 {w} 3 3 9 9" for i, w in enumerate(VAL_TRUTH)]
    rows.reverse()  # row order must not matter
    return "ImageId,PredictionString\n" + "\n".join(rows) + "\n"


def _ground_truth() -> str:
    return "".join(f"{DEVKIT_ORDER.index(w) + 1}\n" for w in VAL_TRUTH)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return create_captioner("nano", seed=0).eval()


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """train/ tree, and val/ flat (CSV inside / CSV in parent / devkit ground truth / meta.mat) and sorted."""
    rng = np.random.default_rng(0)
    top = tmp_path_factory.mktemp("imagenet")
    train = top / "train"
    for wnid in SYNSETS:
        for k in range(TRAIN_PER_CLASS):
            _jpeg(train / wnid / f"{wnid}_{k + 1}.JPEG", wnid, rng)
    (top / "LOC_synset_mapping.txt").write_text(_kaggle_mapping())
    originals = top / "originals"
    for i, wnid in enumerate(VAL_TRUTH):
        _jpeg(originals / _val_name(i), wnid, rng)

    def flat(folder: Path) -> Path:
        folder.mkdir(parents=True)
        for i in range(len(VAL_TRUTH)):
            shutil.copy(originals / _val_name(i), folder / _val_name(i))
        return folder

    csv_inside = flat(top / "csv_inside" / "val")
    (csv_inside / "LOC_val_solution.csv").write_text(_solution_csv())
    csv_parent = flat(top / "csv_parent" / "val")
    (csv_parent.parent / "LOC_val_solution.csv").write_text(_solution_csv())
    (csv_parent.parent / "LOC_synset_mapping.txt").write_text(_kaggle_mapping())
    devkit = flat(top / "devkit" / "val")
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text(_ground_truth())
    (devkit / "LOC_synset_mapping.txt").write_text(_devkit_mapping())
    sorted_val = top / "sorted" / "val"
    for i, wnid in enumerate(VAL_TRUTH):
        (sorted_val / wnid).mkdir(parents=True, exist_ok=True)
        shutil.copy(originals / _val_name(i), sorted_val / wnid / _val_name(i))
    bare = flat(top / "bare" / "val")
    return {
        "top": top,
        "train": train,
        "originals": originals,
        "csv_inside": csv_inside,
        "csv_parent": csv_parent,
        "devkit": devkit,
        "sorted": sorted_val,
        "bare": bare,
    }


def _by_file(data: dict) -> dict[str, str]:
    return {Path(f).name: label for f, label in zip(data["files"], data["labels"], strict=True)}


def _truth() -> dict[str, str]:
    return {_val_name(i): w for i, w in enumerate(VAL_TRUTH)}


def _direct(model: torch.nn.Module, paths: list[Path]) -> torch.Tensor:
    cfg = model.config
    transform = image_transform(cfg.vision.image_size, cfg.image_mean, cfg.image_std)
    with torch.no_grad():
        return model.encode_image(torch.stack([transform(Image.open(p)) for p in paths]))


def test_train_tree_labels_are_the_synset_folders(model, imagenet):
    data = imagefolder_features(model, imagenet["train"], batch_size=4)
    assert data["layout"] == "tree" and data["label_source"] is None
    assert set(data) >= {"features", "labels", "split", "ids", "files", "class_names"}
    assert Counter(data["labels"]) == dict.fromkeys(SYNSETS, TRAIN_PER_CLASS)
    assert all(f.split("/")[0] == label for f, label in zip(data["files"], data["labels"], strict=True))
    assert data["split"] == [""] * 15 and data["ids"].tolist() == list(range(15))
    assert data["class_names"] == DISPLAY  # LOC_synset_mapping.txt in the parent
    expected = _direct(model, [imagenet["train"] / f for f in data["files"]])
    torch.testing.assert_close(data["features"], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["csv_inside", "csv_parent"])
def test_flat_val_with_kaggle_solution_csv(model, imagenet, layout):
    data = imagefolder_features(model, imagenet[layout], batch_size=3)
    assert data["layout"] == "flat-csv"
    csv_dir = imagenet[layout] if layout == "csv_inside" else imagenet[layout].parent
    assert data["label_source"] == str(csv_dir / "LOC_val_solution.csv")
    assert data["files"] == sorted(_truth()) and _by_file(data) == _truth()
    # display names: csv_parent has LOC_synset_mapping.txt beside its CSV; csv_inside has none in val/ or its parent
    assert data["class_names"] == (DISPLAY if layout == "csv_parent" else {})
    expected = _direct(model, [imagenet["originals"] / f for f in data["files"]])
    torch.testing.assert_close(data["features"], expected, rtol=1e-4, atol=1e-5)


def test_devkit_ground_truth_with_synset_mapping_gives_the_csv_labels(model, imagenet):
    devkit = imagefolder_features(model, imagenet["devkit"])
    kaggle = imagefolder_features(model, imagenet["csv_inside"])
    assert devkit["layout"] == "flat-devkit"
    assert devkit["label_source"] == str(imagenet["devkit"] / "ILSVRC2012_validation_ground_truth.txt")
    assert devkit["labels"] == kaggle["labels"] == VAL_TRUTH and devkit["files"] == kaggle["files"]
    assert devkit["class_names"] == DISPLAY
    torch.testing.assert_close(devkit["features"], kaggle["features"])


def test_devkit_meta_mat_in_the_devkit_folder(model, imagenet, tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    val = tmp_path / "val"
    shutil.copytree(imagenet["originals"], val)
    data_dir = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    data_dir.mkdir(parents=True)
    (data_dir / "ILSVRC2012_validation_ground_truth.txt").write_text(_ground_truth())
    synsets = np.zeros(
        (len(DEVKIT_ORDER) + 1, 1), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    )
    for i, wnid in enumerate([*DEVKIT_ORDER, "n00001740"]):  # + one inner node, as in the real file
        synsets[i, 0] = (i + 1, wnid, SYNSETS.get(wnid, "entity"), 0 if wnid in SYNSETS else 3)
    scipy_io.savemat(data_dir / "meta.mat", {"synsets": synsets})
    data = imagefolder_features(model, val)
    assert data["layout"] == "flat-devkit" and _by_file(data) == _truth()
    assert data["class_names"] == DISPLAY  # meta.mat's words (no LOC_synset_mapping.txt here)


def test_sorted_val_tree_matches_the_flat_one(model, imagenet):
    tree = imagefolder_features(model, imagenet["sorted"])
    flat = imagefolder_features(model, imagenet["csv_inside"])
    assert tree["layout"] == "tree" and _by_file(tree) == _truth()
    order = [Path(f).name for f in tree["files"]]
    index = {f: i for i, f in enumerate(flat["files"])}
    torch.testing.assert_close(tree["features"], flat["features"][[index[f] for f in order]])


def test_flat_folder_without_label_file(model, imagenet):
    with pytest.raises(DataError) as err:
        imagefolder_features(model, imagenet["bare"])
    msg = str(err.value)
    assert "is a flat folder of 7 images" in msg and "LOC_val_solution.csv" in msg
    assert "ILSVRC2012_validation_ground_truth.txt" in msg and "or its parent" in msg


def test_solution_csv_missing_images_names_them(model, imagenet, tmp_path):
    val = shutil.copytree(imagenet["originals"], tmp_path / "val")
    rows = _solution_csv().splitlines()
    kept = [r for r in rows if not r.startswith(("ILSVRC2012_val_00000002", "ILSVRC2012_val_00000005"))]
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(kept) + "\n")
    with pytest.raises(DataError, match=r"no row for 2 of the 7 images.*00000002\.JPEG, ILSVRC2012_val_00000005"):
        imagefolder_features(model, val)
    (tmp_path / "LOC_val_solution.csv").write_text("id,label\nILSVRC2012_val_00000001,n01440764\n")
    with pytest.raises(DataError, match="ImageId,PredictionString"):
        imagefolder_features(model, val)


def test_ground_truth_line_count_must_match(model, imagenet, tmp_path):
    val = shutil.copytree(imagenet["originals"], tmp_path / "val")
    (val / "ILSVRC2012_validation_ground_truth.txt").write_text(_ground_truth() + "1\n")
    (val / "LOC_synset_mapping.txt").write_text(_devkit_mapping())
    with pytest.raises(DataError, match="has 8 labels but .* holds 7 images"):
        imagefolder_features(model, val)
    (val / "ILSVRC2012_validation_ground_truth.txt").write_text(_ground_truth().replace("1\n", "4\n", 1))
    with pytest.raises(DataError, match="ILSVRC2012_ID 4 is not in"):
        imagefolder_features(model, val)


def test_ground_truth_needs_the_devkit_order(model, imagenet, tmp_path):
    val = shutil.copytree(imagenet["originals"], tmp_path / "val")
    (val / "ILSVRC2012_validation_ground_truth.txt").write_text(_ground_truth())
    with pytest.raises(DataError, match="needs the devkit's meta.mat"):
        imagefolder_features(model, val)
    # Kaggle's real mapping is sorted by WNID, which is not the devkit's ILSVRC2012_ID order: refused
    sorted_1000 = [f"n{i:08d} synset {i}" for i in range(1000)]
    (tmp_path / "LOC_synset_mapping.txt").write_text("\n".join(sorted_1000) + "\n")
    with pytest.raises(DataError, match="sorted by WNID"):
        imagefolder_features(model, val)


def test_cache_key_follows_the_label_file(model, imagenet, tmp_path, monkeypatch):
    val = shutil.copytree(imagenet["csv_inside"], tmp_path / "val")
    calls = []
    real = features_module.extract_features

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(features_module, "extract_features", counting)
    cache = tmp_path / "cache"
    first = imagefolder_features(model, val, cache_dir=cache)
    again = imagefolder_features(model, val, cache_dir=cache)
    assert len(calls) == 1 and again["labels"] == first["labels"] == VAL_TRUTH
    torch.testing.assert_close(again["features"], first["features"])
    relabelled = _solution_csv().replace("ILSVRC2012_val_00000001,n01443537", "ILSVRC2012_val_00000001,n01440764")
    (val / "LOC_val_solution.csv").write_text(relabelled)
    changed = imagefolder_features(model, val, cache_dir=cache)
    assert len(calls) == 2 and changed["labels"][0] == "n01440764" and changed["labels"][1:] == VAL_TRUTH[1:]
    assert len(list(cache.glob("imagefolder-*.safetensors"))) == 2


def test_probe_cli_on_train_tree_and_flat_val(capsys, imagenet):
    argv = ["probe", "random:nano", "--train", str(imagenet["train"]), "--test", str(imagenet["csv_parent"])]
    assert main([*argv, "--json"]) == 0  # no --label: the synset folders and the CSV are the labels
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["num_classes"] == 3 and report["num_test"] == len(VAL_TRUTH)
    assert report["data"]["test"]["layout"] == "flat-csv"
    assert not [w for w in report["warnings"] if "--label" in w or "same data" in w]  # (a λ-edge warning may come)
    assert 0 <= report["top1"] <= 1


def test_search_folders(tmp_path):
    from dpcap.eval.imagenet import devkit_dirs, label_dirs

    kaggle_val = tmp_path / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    assert label_dirs(kaggle_val) == [kaggle_val, kaggle_val.parent, tmp_path]  # Kaggle's LOC_* files lie in <top>
    assert label_dirs(tmp_path / "val") == [tmp_path / "val", tmp_path]
    assert devkit_dirs(tmp_path / "val") == [
        tmp_path / "val",
        tmp_path / "val" / "ILSVRC2012_devkit_t12" / "data",
        tmp_path / "val" / "devkit" / "data",
        tmp_path,
        tmp_path / "ILSVRC2012_devkit_t12" / "data",
        tmp_path / "devkit" / "data",
    ]
