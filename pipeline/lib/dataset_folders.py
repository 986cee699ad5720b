"""Datasets as image folders: the default digits set, the MNIST-format IDX importer, scanning.

A dataset is ``data/<class>/<image>`` or, split in advance, ``data/{train,val,test}/<class>/<image>``.
Class i is line i of ``data/classes.txt`` (or of the ``preprocess.classes`` param) when there
is one, else the i-th folder name in sorted order. The command is ``python -m pipeline.datasets``.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.common.contract import SPLITS, ClassesSource
from pipeline.common.errors import UserError
from pipeline.common.files import replace_dir

log = logging.getLogger(__name__)

SPLIT_FOLDERS = SPLITS  # data/train/, data/val/, data/test/
CLASSES_FILE = "classes.txt"  # label order, one name per line: line i is label i

# IDX type codes (http://yann.lecun.com/exdb/mnist/ "THE IDX FILE FORMAT"); big-endian.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetError(UserError, ValueError):
    """A dataset folder or input file cannot be used; the message says which and why."""


def _visible_files(folder: str) -> list[str]:
    """Files under ``folder`` as paths relative to it, hidden files and folders left out, in
    pathlib's order (by path components). os.scandir, not Path.rglob: 10x faster on 100k files."""
    found = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                found += [f"{entry.name}/{rel}" for rel in _visible_files(entry.path)]
            elif entry.is_file():  # follows a symlink to a file, as Path.is_file does
                found.append(entry.name)
    return sorted(found, key=lambda rel: rel.split("/"))


def _subfolders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_image_folder(root: str | Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """List ``root/<class>/**/<file>``, hidden files and folders ignored.

    Returns:
        (classes sorted by name, [(file path, class index)] sorted by class, then path).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found (expected {root}/<class>/<image>)")
    classes = _subfolders(root)
    files = [(root / name / rel, index)
             for index, name in enumerate(classes) for rel in _visible_files(str(root / name))]
    return classes, files


@dataclass(frozen=True)
class Dataset:
    """What :func:`scan_dataset` found: the class order and every file with its class and split folder."""

    root: Path
    classes: list[str]
    classes_source: ClassesSource
    split_folders: tuple[str, ...]  # the pre-split folders present, () for ``<class>/<image>``
    files: list[tuple[str, int, str]]  # (path relative to root, POSIX; class index; split folder or "")

    def class_folder(self, name: str, split: str = "") -> Path:
        """Where images of class ``name`` go (for messages)."""
        if not self.split_folders:
            return self.root / name
        return self.root / (split if split in self.split_folders else "train") / name


def read_classes_file(path: str | Path) -> list[str]:
    """One class name per line, in label order; blank lines and surrounding spaces ignored."""
    path = Path(path)
    try:
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: cannot read the class list ({err})") from None
    check_class_names(names, str(path))
    return names


def check_class_names(names: Sequence[str], where: str) -> None:
    """Names usable as folder names, each once, at least one."""
    if not names:
        raise DatasetError(f"{where}: no class names")
    for name in names:
        if "/" in name or "\\" in name or name.startswith(".") or name != name.strip():
            raise DatasetError(f"{where}: {name!r} cannot be a class folder name "
                               "(no slashes, no leading dot or surrounding spaces)")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DatasetError(f"{where}: class name(s) listed twice: {', '.join(duplicates)}")


def scan_dataset(root: str | Path, classes: Sequence[str] | None = None) -> Dataset:
    """Scan a dataset folder in either layout, with its class order.

    Layouts: ``root/<class>/**/<image>`` (the stage draws the whole split), or pre-split folders
    ``root/{train,val,test}/<class>/**/<image>`` (ImageFolder convention; ``train`` required, a
    missing ``val`` or ``test`` is drawn from ``train``). Class order: ``classes`` (the
    ``preprocess.classes`` param) if given, else ``root/classes.txt`` if present, else the sorted
    class folder names. With an explicit order, a class folder that is not listed is an error.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found (expected {root}/<class>/<image> "
                           f"or {root}/train/<class>/<image>)")
    top = _subfolders(root)
    named_splits = [name for name in top if name in SPLIT_FOLDERS]
    if named_splits:
        unknown = [name for name in top if name not in SPLIT_FOLDERS]
        if unknown or "train" not in named_splits:
            raise DatasetError(
                f"{root}: mixes split folders ({', '.join(named_splits)}) with other folders "
                f"({', '.join(unknown) or 'no train/'}): use {root}/train/<class>/ (required) and optionally "
                f"{root}/val/<class>/ and {root}/test/<class>/, or {root}/<class>/ without split folders")
    roots = [root / split for split in named_splits] if named_splits else [root]
    found = sorted({name for folder in roots for name in _subfolders(folder)})

    source: ClassesSource = "folders"
    if classes:
        check_class_names(classes, "params.yaml: preprocess.classes")
        order, source, where = list(classes), "param", "params.yaml preprocess.classes"
    elif (root / CLASSES_FILE).is_file():
        order, source, where = read_classes_file(root / CLASSES_FILE), "file", str(root / CLASSES_FILE)
    else:
        order, where = found, ""
    unlisted = [name for name in found if name not in order]
    if unlisted:
        raise DatasetError(f"class folder(s) {', '.join(unlisted)} in {root} not listed in {where}: "
                           "add them there (in label order) or remove the folders")

    files = [(f"{split}/{name}/{rel}" if split else f"{name}/{rel}", label, split)
             for split in named_splits or [""]
             for label, name in enumerate(order) if (root / split / name).is_dir()
             for rel in _visible_files(str(root / split / name))]
    return Dataset(root=root, classes=order, classes_source=source, split_folders=tuple(named_splits), files=files)


@contextmanager
def _replace_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces ``out`` only when the block succeeds."""
    if out.exists() and any(out.iterdir()) and not force:
        raise DatasetError(f"{out}: folder is not empty; pass --force to replace it")
    with replace_dir(out) as tmp:
        yield tmp


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # No optimize flag and no metadata: the bytes depend only on the pixels (and zlib).
    Image.fromarray(array).save(path, format="PNG")


def write_digits(out: str | Path, force: bool = False) -> int:
    """Write scikit-learn's handwritten digits (shipped in its wheel) as ``out/<digit>/<id>.png``.

    The output is byte-for-byte deterministic, so ``data.dvc`` matches a fresh generation.

    Returns:
        The number of images written.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Values are 0..16 ink counts; stretch them to the full 8-bit range.
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    with _replace_dir(Path(out), force) as tmp:
        for index, (image, label) in enumerate(zip(pixels, digits.target, strict=True)):
            _save_png(image, tmp / str(label) / f"{index:04d}.png")
    return len(pixels)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into an array of its native shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except OSError as err:
        raise DatasetError(f"{path}: cannot read ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DatasetError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetError(f"{path}: expected {expected} data bytes for shape {shape}, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def idx_split(path: str | Path) -> str:
    """The split an IDX file belongs to, from its name: ``t10k``/``test`` → test, ``train`` → train."""
    name = Path(path).name.lower()
    if "t10k" in name or "test" in name:
        return "test"
    if "train" in name:
        return "train"
    raise DatasetError(f"{path}: cannot tell from the name whether it is a train or test file; "
                       "give --splits (one of train, val, test per --images file)")


def _idx_splits(image_files: Sequence[str | Path], label_files: Sequence[str | Path],
                splits: Sequence[str] | None) -> list[str]:
    """The split of each IDX pair (given, else from the file names); at least one train pair."""
    if len(image_files) != len(label_files) or not image_files:
        raise DatasetError("give the same number (at least one) of --images and --labels files")
    if splits is not None and len(splits) != len(image_files):
        raise DatasetError(f"give one split per --images file: {len(image_files)} files, {len(splits)} splits")
    splits = list(splits) if splits is not None else [idx_split(path) for path in image_files]
    for split in splits:
        if split not in SPLIT_FOLDERS:
            raise DatasetError(f"split {split!r} is not one of {', '.join(SPLIT_FOLDERS)}")
    if "train" not in splits:
        raise DatasetError(f"no training file among {', '.join(map(str, image_files))} (splits: {', '.join(splits)})")
    return splits


def _read_idx_pair(image_file: str | Path, label_file: str | Path,
                   split: str) -> tuple[str, str, np.ndarray, np.ndarray]:
    """(split, source stem, N×H×W images, N labels) of one IDX pair, checked against each other."""
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1:
        raise DatasetError(f"{image_file}, {label_file}: expected N×H×W images and N labels")
    if len(images) != len(labels):
        raise DatasetError(f"{image_file}: {len(images)} images but {label_file} has {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.dtype.kind not in "iu"):
        raise DatasetError(f"{label_file}: labels must be non-negative integers")
    return split, Path(image_file).name.split("-")[0].split(".")[0], images, labels


def import_idx(
    image_files: Sequence[str | Path],
    label_files: Sequence[str | Path],
    out: str | Path,
    class_names: Sequence[str] | None = None,
    force: bool = False,
    splits: Sequence[str] | None = None,
) -> int:
    """Import MNIST-format IDX pairs (MNIST, Fashion-MNIST, KMNIST, EMNIST) as a pre-split image folder.

    The dataset's own separation is kept: each pair goes to ``out/<split>/<class>/<source
    stem>_<index>.png`` (the preprocess stage draws only the missing val split, from train), and
    ``out/classes.txt`` fixes the label order: label i is class i everywhere downstream.

    Args:
        image_files: ``*-images-idx3-ubyte[.gz]`` files.
        label_files: the matching ``*-labels-idx1-ubyte[.gz]`` files, in the same order.
        out: the dataset folder to write.
        class_names: name of label 0, 1, ...; default: the label numbers.
        force: replace a non-empty ``out``.
        splits: train/val/test per pair; default: from the file names (``train``, ``t10k``/``test``).
    Returns:
        The number of images written.
    """
    splits = _idx_splits(image_files, label_files, splits)
    pairs = [_read_idx_pair(image_file, label_file, split)
             for image_file, label_file, split in zip(image_files, label_files, splits, strict=True)]
    top = max(int(labels.max(initial=0)) for *_, labels in pairs)
    if class_names is not None and len(class_names) <= top:
        raise DatasetError(f"{len(class_names)} class names given but labels go up to {top}")
    names = list(class_names) if class_names is not None else [str(i) for i in range(top + 1)]
    check_class_names(names, "--classes")
    count = 0
    with _replace_dir(Path(out), force) as tmp:
        (tmp / CLASSES_FILE).write_text("".join(f"{name}\n" for name in names))
        for split, stem, images, labels in pairs:
            for index, (image, label) in enumerate(zip(images, labels, strict=True)):
                path = tmp / split / names[int(label)] / f"{stem}_{index:05d}.png"
                _save_png(np.asarray(image, dtype=np.uint8), path)
                count += 1
    return count
