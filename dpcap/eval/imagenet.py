"""Image folders for the probes: ImageFolder trees and ImageNet-2012's flat ``val/`` folder.

:func:`resolve_images` turns a folder into an :class:`ImageList` (image paths + one label each),
choosing the layout from what the folder holds:

* **tree** (``root/<class>/<image>``, torchvision's ImageFolder rules): the label is the class
  sub-folder's name. This covers ImageNet's ``train/`` (``n01440764/n01440764_10026.JPEG``) and a
  *sorted* ``val/`` (one sub-folder per synset).
* **flat** (image files directly in ``root``, e.g. ``ILSVRC2012_val_00000001.JPEG`` …): ImageNet's
  ``val/`` as distributed. Its labels are read from the first of these that exists:

  1. ``LOC_val_solution.csv`` (Kaggle: header ``ImageId,PredictionString``; the synset is the first
     token of PredictionString), looked for in :func:`label_dirs` (``root``, its parent, and for
     Kaggle's ``<top>/ILSVRC/Data/CLS-LOC/val`` also ``<top>``);
  2. ``ILSVRC2012_validation_ground_truth.txt`` (the devkit: one ILSVRC2012_ID 1..1000 a line, line i
     labels the i-th image in sorted file order), looked for in :func:`devkit_dirs` (``root``,
     ``root/ILSVRC2012_devkit_t12/data``, ``root/devkit/data``, then the same three under the
     parent). Its IDs are turned into synsets with the devkit's order, taken from the first of:
     ``meta.mat`` (``synsets``: ILSVRC2012_ID → WNID; needs scipy) beside the ground-truth file,
     then in the devkit dirs; else ``LOC_synset_mapping.txt`` (line i = ILSVRC2012_ID i) beside the
     ground-truth file, then in the label dirs, then in the devkit dirs.

  A folder holding both image files and class sub-folders is read as a tree when no label file is
  found (ImageFolder ignores the loose files), as flat otherwise.

Labels are always synset ids (WNIDs) for ImageNet, so ``train/`` (synset folder names) and ``val/``
agree. Display names (``{wnid: "tench"}``, the first name before the comma) come from the first
``LOC_synset_mapping.txt`` beside the ground-truth file / in the label dirs / in the devkit dirs, else
from ``meta.mat``'s ``words`` when that gave the order; only labels that occur are kept.

Beware: Kaggle's ``LOC_synset_mapping.txt`` lists the 1000 synsets *sorted by WNID* (torchvision's
class-index order), which is **not** the devkit's ILSVRC2012_ID order. A 1000-line mapping in sorted
order is therefore refused as the order for ``ILSVRC2012_validation_ground_truth.txt``; it is only
used for display names (and for the order of smaller, hand-made mappings).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dpcap.errors import DataError

KAGGLE_SOLUTION = "LOC_val_solution.csv"
KAGGLE_SYNSETS = "LOC_synset_mapping.txt"
DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "meta.mat"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
ILSVRC_CLASSES = 1000


@dataclass(frozen=True)
class ImageList:
    """Images of one folder with their labels.

    ``layout``: ``"tree"``, ``"flat-csv"`` or ``"flat-devkit"``. ``sources``: every label file read
    (the CSV; or the ground truth and the synset order; plus the names file), for cache keys.
    """

    root: Path
    layout: str
    files: list[Path]
    labels: list[str]
    label_source: Path | None = None
    sources: tuple[Path, ...] = ()
    class_names: dict[str, str] = field(default_factory=dict)

    def relative_files(self) -> list[str]:
        return [p.relative_to(self.root).as_posix() for p in self.files]


class ImageDataset(torch.utils.data.Dataset):
    """``files[i]`` opened with PIL and passed through ``transform``; picklable for DataLoader workers."""

    def __init__(self, files: Sequence[Path], transform: Any) -> None:
        self.files = list(files)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        path = self.files[index]
        try:
            with Image.open(path) as image:
                image.load()
                return self.transform(image)
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise DataError(f"{path}: unreadable image: {err}") from None


def label_dirs(root: str | os.PathLike) -> list[Path]:
    """Folders searched for Kaggle's files: ``root``, its parent, and ``<top>`` when ``root`` is
    ``<top>/ILSVRC/Data/CLS-LOC/<split>`` (where Kaggle puts them)."""
    root = _absolute(root)
    dirs = [root, root.parent]
    parents = root.parents
    if len(parents) >= 4 and parents[1].name == "Data" and parents[2].name == "ILSVRC":
        dirs.append(parents[3])
    return _unique(dirs)


def devkit_dirs(root: str | os.PathLike) -> list[Path]:
    """Folders searched for the devkit's files: ``root`` and its parent, each also with
    ``ILSVRC2012_devkit_t12/data`` and ``devkit/data`` below it."""
    root = _absolute(root)
    out: list[Path] = []
    for base in (root, root.parent):
        out += [base, base / "ILSVRC2012_devkit_t12" / "data", base / "devkit" / "data"]
    return _unique(out)


def resolve_images(root: str | os.PathLike) -> ImageList:
    """The images of ``root`` and their labels (see the module docstring for the layouts and files)."""
    root = _absolute(root)
    if not root.is_dir():
        raise DataError(f"{root}: not an ImageFolder tree (class sub-folders of images): no such folder")
    flat, has_subdirs = _scan(root)
    if flat:
        listing = _flat_labels(root, flat, required=not has_subdirs)
        if listing is not None:
            return listing
    return _tree(root)


# ---------------------------------------------------------------- layouts


def _tree(root: Path) -> ImageList:
    from torchvision.datasets.folder import find_classes, make_dataset

    try:
        classes, class_to_idx = find_classes(str(root))
        samples = make_dataset(str(root), class_to_idx, extensions=IMAGE_EXTENSIONS)
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"{root}: not an ImageFolder tree (class sub-folders of images): {err}") from None
    files = [Path(path) for path, _ in samples]
    labels = [classes[target] for _, target in samples]
    names_file = _first(KAGGLE_SYNSETS, label_dirs(root))
    names = _present(_read_synset_mapping(names_file)[1], labels) if names_file else {}
    return ImageList(root, "tree", files, labels, None, (names_file,) if names_file else (), names)


def _flat_labels(root: Path, files: list[Path], *, required: bool) -> ImageList | None:
    csv_file = _first(KAGGLE_SOLUTION, label_dirs(root))
    if csv_file is not None:
        labels = _csv_labels(csv_file, root, files)
        names_file = _first(KAGGLE_SYNSETS, [csv_file.parent, *label_dirs(root), *devkit_dirs(root)])
        names = _present(_read_synset_mapping(names_file)[1], labels) if names_file else {}
        sources = (csv_file, names_file) if names_file else (csv_file,)
        return ImageList(root, "flat-csv", files, labels, csv_file, sources, names)
    truth = _first(DEVKIT_GROUND_TRUTH, devkit_dirs(root))
    if truth is not None:
        return _devkit_labels(truth, root, files)
    if not required:
        return None
    raise DataError(
        f"{root} is a flat folder of {len(files)} images but no {KAGGLE_SOLUTION} or {DEVKIT_GROUND_TRUTH} "
        f"(+ {KAGGLE_SYNSETS}) was found in {root} or its parent: put Kaggle's {KAGGLE_SOLUTION} or the devkit's "
        f"files there, or sort the images into one sub-folder per class"
    )


def _csv_labels(csv_file: Path, root: Path, files: list[Path]) -> list[str]:
    by_id: dict[str, str] = {}
    with open(csv_file, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if "ImageId" not in header or "PredictionString" not in header:
            raise DataError(
                f"{csv_file}: expected Kaggle's header ImageId,PredictionString, got {','.join(header) or 'nothing'}"
            )
        for line, row in enumerate(reader, start=2):
            image_id, prediction = (row.get("ImageId") or "").strip(), (row.get("PredictionString") or "").split()
            if not image_id:
                continue
            if not prediction:
                raise DataError(f"{csv_file}, line {line}: {image_id} has an empty PredictionString")
            by_id.setdefault(_stem(image_id), prediction[0])
    missing = [p.name for p in files if p.stem not in by_id]
    if missing:
        more = f", … ({len(missing)} in all)" if len(missing) > 5 else ""
        raise DataError(
            f"{csv_file} has no row for {len(missing)} of the {len(files)} images in {root}: "
            f"{', '.join(missing[:5])}{more}"
        )
    return [by_id[p.stem] for p in files]


def _devkit_labels(truth: Path, root: Path, files: list[Path]) -> ImageList:
    ids = _read_ground_truth(truth)
    if len(ids) != len(files):
        raise DataError(
            f"{truth} has {len(ids)} labels but {root} holds {len(files)} images (line i labels the i-th image "
            "in sorted file order, so the counts must agree)"
        )
    order, order_names, order_file = _synset_order(truth, root)
    unknown = sorted({i for i in ids if i not in order})
    if unknown:
        raise DataError(
            f"{truth}: ILSVRC2012_ID {unknown[0]} is not in {order_file} ({len(order)} synsets)"
            + (f" ({len(unknown)} unknown IDs)" if len(unknown) > 1 else "")
        )
    labels = [order[i] for i in ids]
    names_file = _first(KAGGLE_SYNSETS, [truth.parent, *label_dirs(root), *devkit_dirs(root)])
    names = _read_synset_mapping(names_file)[1] if names_file else order_names
    sources = tuple(dict.fromkeys(p for p in (truth, order_file, names_file) if p is not None))
    return ImageList(root, "flat-devkit", files, labels, truth, sources, _present(names, labels))


def _synset_order(truth: Path, root: Path) -> tuple[dict[int, str], dict[str, str], Path]:
    """ILSVRC2012_ID → WNID (+ the names that file gives, + the file), from meta.mat or LOC_synset_mapping.txt."""
    meta = _first(DEVKIT_META, [truth.parent, *devkit_dirs(root)])
    scipy_missing = False
    if meta is not None:
        try:
            return (*_read_meta_mat(meta), meta)
        except ImportError:
            scipy_missing = True
    mapping = _first(KAGGLE_SYNSETS, [truth.parent, *label_dirs(root), *devkit_dirs(root)])
    if mapping is None:
        why = f"{meta} was found but scipy is not installed to read it" if scipy_missing else f"no {DEVKIT_META}"
        raise DataError(
            f"{truth} numbers the classes by the devkit's ILSVRC2012_ID, which needs the devkit's {DEVKIT_META} "
            f"(read with scipy) or a {KAGGLE_SYNSETS} in that order: {why} and no {KAGGLE_SYNSETS} in "
            f"{', '.join(str(d) for d in _unique([truth.parent, *label_dirs(root), *devkit_dirs(root)]))}"
        )
    wnids, names = _read_synset_mapping(mapping)
    if len(wnids) == ILSVRC_CLASSES and wnids == sorted(wnids):
        raise DataError(
            f"{mapping} lists the {ILSVRC_CLASSES} synsets sorted by WNID (Kaggle's order), not in the devkit's "
            f"ILSVRC2012_ID order that {truth} uses: put the devkit's {DEVKIT_META} beside it (read with scipy), "
            f"or use Kaggle's {KAGGLE_SOLUTION}"
        )
    return {i: w for i, w in enumerate(wnids, start=1)}, names, mapping


# ---------------------------------------------------------------- label files


def _read_ground_truth(path: Path) -> list[int]:
    ids: list[int] = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        try:
            ids.append(int(text))
        except ValueError:
            raise DataError(f"{path}, line {line_no}: expected an ILSVRC2012_ID (an integer), got {text!r}") from None
    return ids


def _read_synset_mapping(path: Path) -> tuple[list[str], dict[str, str]]:
    """``n01440764 tench, Tinca tinca`` lines → (WNIDs in file order, {WNID: first name})."""
    wnids: list[str] = []
    names: dict[str, str] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        wnid, _, words = text.partition(" ")
        if wnid in names:
            raise DataError(f"{path}, line {line_no}: synset {wnid} is listed twice")
        wnids.append(wnid)
        names[wnid] = words.split(",")[0].strip() or wnid
    return wnids, names


def _read_meta_mat(path: Path) -> tuple[dict[int, str], dict[str, str]]:
    """The devkit's ``meta.mat`` → ({ILSVRC2012_ID: WNID}, {WNID: first word}). Raises ImportError without scipy."""
    import numpy as np
    import scipy.io

    try:
        synsets = np.atleast_1d(scipy.io.loadmat(str(path), squeeze_me=True)["synsets"])
        ids = [int(i) for i in synsets["ILSVRC2012_ID"]]
        wnids = [str(w) for w in synsets["WNID"]]
        words = [str(w) for w in synsets["words"]] if "words" in (synsets.dtype.names or ()) else wnids
    except (KeyError, ValueError, TypeError, OSError, NotImplementedError) as err:
        raise DataError(
            f"{path}: not the devkit's meta.mat (a 'synsets' struct with ILSVRC2012_ID, WNID): {err}"
        ) from None
    order = dict(zip(ids, wnids, strict=True))
    names = {w: (t.split(",")[0].strip() or w) for w, t in zip(wnids, words, strict=True)}
    return order, names


# ---------------------------------------------------------------- helpers


def _scan(root: Path) -> tuple[list[Path], bool]:
    """(image files directly in ``root``, sorted by name; whether ``root`` has visible sub-folders)."""
    images: list[Path] = []
    has_subdirs = False
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                has_subdirs = True
            elif entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS):
                images.append(root / entry.name)
    return sorted(images, key=lambda p: p.name), has_subdirs


def _first(name: str, dirs: Sequence[Path]) -> Path | None:
    for d in _unique(dirs):
        if (d / name).is_file():
            return d / name
    return None


def _present(names: dict[str, str], labels: Sequence[str]) -> dict[str, str]:
    wanted = set(labels)
    return {k: v for k, v in names.items() if k in wanted}


def _stem(image_id: str) -> str:
    return image_id.rsplit(".", 1)[0] if image_id.lower().endswith(IMAGE_EXTENSIONS) else image_id


def _absolute(path: str | os.PathLike) -> Path:
    """Absolute, without resolving symlinks: the parent searched is the one of the path as written."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _unique(paths: Sequence[Path]) -> list[Path]:
    return list(dict.fromkeys(paths))
