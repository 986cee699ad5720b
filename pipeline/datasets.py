"""Datasets as image folders: the default digits set, the MNIST-format IDX importer, scanning.

A dataset is ``data/<class>/<image>``; class names are the sorted folder names.

    python -m pipeline.datasets digits --out data            # scikit-learn's 1,797 8x8 digits
    python -m pipeline.datasets idx --images train-images-idx3-ubyte.gz t10k-images-idx3-ubyte.gz \\
        --labels train-labels-idx1-ubyte.gz t10k-labels-idx1-ubyte.gz --classes classes.txt --out data
"""

from __future__ import annotations

import argparse
import gzip
import logging
import struct
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import UserError, run_command
from pipeline.files import replace_dir

log = logging.getLogger(__name__)

# IDX type codes (http://yann.lecun.com/exdb/mnist/ "THE IDX FILE FORMAT"); big-endian.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetError(UserError, ValueError):
    """A dataset folder or input file cannot be used; the message says which and why."""


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def scan_image_folder(root: str | Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """List ``root/<class>/**/<file>``, hidden files and folders ignored.

    Returns:
        (classes sorted by name, [(file path, class index)] sorted by path).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found (expected {root}/<class>/<image>)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [
        (path, index)
        for index, name in enumerate(classes)
        for path in sorted((root / name).rglob("*"))
        if path.is_file() and not _is_hidden(path, root)
    ]
    return classes, files


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


def import_idx(
    image_files: Sequence[str | Path],
    label_files: Sequence[str | Path],
    out: str | Path,
    class_names: Sequence[str] | None = None,
    force: bool = False,
) -> int:
    """Import MNIST-format IDX pairs (MNIST, Fashion-MNIST, KMNIST, EMNIST) into an image folder.

    Pairs are merged (train and test alike; the preprocess stage makes its own split). Files
    are named ``<source stem>_<index>.png`` so the pairs never collide.

    Args:
        image_files: ``*-images-idx3-ubyte[.gz]`` files.
        label_files: the matching ``*-labels-idx1-ubyte[.gz]`` files, in the same order.
        out: the dataset folder to write.
        class_names: folder name per label value; default: the label number.
        force: replace a non-empty ``out``.
    Returns:
        The number of images written.
    """
    if len(image_files) != len(label_files) or not image_files:
        raise DatasetError("give the same number (at least one) of --images and --labels files")
    pairs = []
    for image_file, label_file in zip(image_files, label_files, strict=True):
        images, labels = read_idx(image_file), read_idx(label_file)
        if images.ndim != 3 or labels.ndim != 1:
            raise DatasetError(f"{image_file}, {label_file}: expected N×H×W images and N labels")
        if len(images) != len(labels):
            raise DatasetError(f"{image_file}: {len(images)} images but {label_file} has {len(labels)} labels")
        pairs.append((Path(image_file).name.split("-")[0].split(".")[0], images, labels))
    top = max(int(labels.max(initial=0)) for _, _, labels in pairs)
    if class_names is not None and len(class_names) <= top:
        raise DatasetError(f"{len(class_names)} class names given but labels go up to {top}")
    names = list(class_names) if class_names is not None else [str(i) for i in range(top + 1)]
    count = 0
    with _replace_dir(Path(out), force) as tmp:
        for stem, images, labels in pairs:
            for index, (image, label) in enumerate(zip(images, labels, strict=True)):
                _save_png(np.asarray(image, dtype=np.uint8), tmp / names[int(label)] / f"{stem}_{index:05d}.png")
                count += 1
    return count


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    digits = sub.add_parser("digits", help="write scikit-learn's digits (no download)")
    idx = sub.add_parser("idx", help="import MNIST-format IDX files")
    idx.add_argument("--images", nargs="+", required=True, help="*-images-idx3-ubyte[.gz] files")
    idx.add_argument("--labels", nargs="+", required=True, help="matching *-labels-idx1-ubyte[.gz] files")
    idx.add_argument("--classes", help="class names: a file with one per line, or a comma-separated list")
    for p in (digits, idx):
        p.add_argument("--out", default="data", help="dataset folder (default: data)")
        p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def body() -> None:
        if args.command == "digits":
            count = write_digits(args.out, force=args.force)
        else:
            names = None
            if args.classes:
                source = Path(args.classes)
                text = source.read_text() if source.is_file() else args.classes.replace(",", "\n")
                names = [line.strip() for line in text.splitlines() if line.strip()]
            count = import_idx(args.images, args.labels, args.out, names, force=args.force)
        log.info("wrote %d images to %s/", count, args.out)

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
