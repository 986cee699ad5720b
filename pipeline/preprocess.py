"""Preprocess stage: an image folder → uint8 arrays + manifest, with a stable split.

    python -m pipeline.preprocess --data data --out artifacts/preprocessed [--cache .cache/preprocess]

Layouts (see :func:`pipeline.datasets.scan_dataset`): ``data/<class>/<image>``, or pre-split
``data/{train,val,test}/<class>/<image>`` kept as given (a missing val or test split is drawn
from train). Class i is line i of ``data/classes.txt`` / ``preprocess.classes`` when given.

Outputs: ``{train,val,test}_images.npy`` (uint8 N×C×H×W), ``{train,val,test}_labels.npy``
(int64) and ``manifest.json``. The stage streams: decoded images go straight to disk, so memory
does not grow with the dataset. It is incremental: :class:`PixelCache` keeps the decoded images
of the last run by content hash, so a re-run decodes only new or changed files and writes the
same bytes a run from scratch would.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL

from pipeline import images
from pipeline.config import PreprocessParams, load_params
from pipeline.contract import SPLITS, FileRow, Manifest, SkippedFile
from pipeline.datasets import CLASSES_FILE, Dataset, scan_dataset
from pipeline.errors import UserError, run_command, setup_logging
from pipeline.files import replace_dir, write_atomic
from pipeline.progress import progress

log = logging.getLogger(__name__)

DEFAULT_CACHE = ".cache/preprocess"
KEEP_PARAM_SETS = 2  # cache folders kept: the last run of each of the 2 most recent parameter sets


class PreprocessError(UserError):
    """The dataset cannot be preprocessed as configured; the message says what to change."""


def assign_split(digest: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """The split of a file, from its content hash and the seed alone.

    Adding or removing other files never moves this one, so val/test stay comparable across
    data versions. Per class the split sizes follow the fractions in expectation.
    """
    u = int.from_bytes(hashlib.sha256(f"{seed}:{digest}".encode()).digest()[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def split_fractions(dataset: Dataset, params: PreprocessParams) -> dict[str, float]:
    """Fractions the hash split draws from the train folder (or the whole flat folder): only for
    the splits that have no folder of their own."""
    return {split: 0.0 if split in dataset.split_folders else fraction
            for split, fraction in (("val", params.val_fraction), ("test", params.test_fraction))}


@dataclass
class Source:
    path: Path
    label: int
    folder: str = ""  # the split folder it was found in, "" for data/<class>/
    digest: str = ""
    split: str = ""
    grayscale: bool | None = None  # None until the header was read (or found in the cache)
    error: str = ""  # "reason: message" when the file is unusable


def _hash(source: Source) -> Source:
    try:
        source.digest = hashlib.sha256(source.path.read_bytes()).hexdigest()
    except OSError as err:
        source.error = f"unreadable: {source.path}: {err}"
    return source


def _inspect(source: Source) -> Source:
    """Read the header (cheap: no pixel decoding): grayscale, or why the file is unusable."""
    try:
        img = images.open_image(source.path)
        source.grayscale = images.is_grayscale(img)
        img.close()
    except images.ImageError as err:
        source.error = f"{err.reason}: {err}"
    except OSError as err:
        source.error = f"unreadable: {source.path}: {err}"
    return source


@dataclass
class Pixels:
    """One decoded image and its exact per-channel sums (for the mean and std of the train split)."""

    array: np.ndarray  # uint8 C×H×W
    sums: list[int]
    squares: list[int]


def pixel_sums(array: np.ndarray) -> tuple[list[int], list[int]]:
    flat = array.reshape(array.shape[0], -1)
    return (flat.sum(axis=1, dtype=np.int64).tolist(),
            np.square(flat, dtype=np.int64).sum(axis=1).tolist())


def _decode(job: tuple[Path, int, int, int]) -> Pixels | str:
    path, size, channels, max_pixels = job
    try:
        array = images.preprocess(path, size, channels, max_pixels)
    except images.ImageError as err:
        return f"{err.reason}: {err}"
    except OSError as err:
        return f"unreadable: {path}: {err}"
    return Pixels(array, *pixel_sums(array))


class NpyWriter:
    """Append C×H×W arrays to an ``.npy`` file without holding them in memory."""

    def __init__(self, path: Path, item_shape: tuple[int, ...], capacity: int):
        self.path, self.item_shape, self.count = path, item_shape, 0
        self.file = open(path, "wb")
        self._header(capacity)
        self.data_start = self.file.tell()

    def _header(self, count: int) -> None:
        header = {"descr": "|u1", "fortran_order": False, "shape": (count, *self.item_shape)}
        np.lib.format.write_array_header_1_0(self.file, header)

    def append(self, array: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(array).data)  # a memory-mapped row is written without a copy
        self.count += 1

    def close(self) -> None:
        """Rewrite the header with the real count (files may have been skipped)."""
        self.file.seek(0)
        self._header(self.count)
        if self.file.tell() != self.data_start:  # header length changed: copy the data over
            self.file.close()
            moved = self.path.with_suffix(".move")
            with open(self.path, "rb") as src, open(moved, "wb") as dst:
                np.lib.format.write_array_header_1_0(
                    dst, {"descr": "|u1", "fortran_order": False, "shape": (self.count, *self.item_shape)}
                )
                src.seek(self.data_start)
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(moved, self.path)
            return
        self.file.truncate(self.data_start + self.count * int(np.prod(self.item_shape)))
        self.file.close()


def _code_version() -> str:
    """What the pixels of a file depend on besides its bytes and the params: images.py and Pillow."""
    code = hashlib.sha256(Path(images.__file__).read_bytes()).hexdigest()[:16]
    return f"{code}-pillow{PIL.__version__}"


# Hex digests: numpy strips trailing NUL bytes from raw "S32" values, which would lose 1 digest in 256.
INDEX_DTYPE = [("digest", "S64"), ("split", "u1"), ("row", "<i8")]
HEADERS_DTYPE = [("digest", "S64"), ("grayscale", "?")]


class PixelCache:
    """Decoded images of earlier runs, found by content hash; never a second copy on disk.

    ``<root>/<key>/`` holds the last run made with one parameter set (key = hash of size,
    channels, max_pixels, images.py and the Pillow version): ``{split}_images.npy`` are hard
    links to that run's output arrays, so they cost no disk while the outputs (or DVC's cache,
    which links the same files) exist, plus ``index.npy`` (sha256 → split, row) and
    ``sums.npy`` (exact per-channel pixel sums per row). ``<root>/headers-<code>.npy`` keeps
    sha256 → grayscale, so ``channels: auto`` needs no header of an unchanged file. Saving
    replaces the folder of the current key and deletes all but the :data:`KEEP_PARAM_SETS` most
    recent keys: the cache never holds more than the last runs' images. ``make clean-cache``
    (or deleting the folder) empties it.
    """

    def __init__(self, root: Path | None):
        self.root = root
        self.code = _code_version()
        self.headers: dict[bytes, bool] = {}
        self.rows: dict[bytes, tuple[str, int, list[int], list[int]]] = {}
        self.arrays: dict[str, np.ndarray] = {}
        if root is not None:
            self.headers = self._read_headers()

    def key(self, params: PreprocessParams, channels: int) -> str:
        spec = {"size": params.size, "channels": channels, "max_pixels": params.max_pixels, "code": self.code}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def _read_headers(self) -> dict[bytes, bool]:
        path = self.root / f"headers-{self.code}.npy"
        try:
            table = np.load(path)
            return dict(zip(table["digest"].tolist(), table["grayscale"].tolist(), strict=True))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError) as err:
            log.warning("preprocess cache: ignoring %s (%s)", path, err)
            return {}

    def load(self, key: str, item_shape: tuple[int, ...]) -> None:
        """Open the arrays of the last run with this key (an unusable cache is ignored, never trusted)."""
        folder = self.root / key if self.root is not None else None
        if folder is None or not (folder / "index.npy").is_file():
            return
        try:
            index, sums = np.load(folder / "index.npy"), np.load(folder / "sums.npy")
            arrays = {split: np.load(folder / f"{split}_images.npy", mmap_mode="r") for split in SPLITS}
            if any(a.dtype != np.uint8 or a.shape[1:] != item_shape for a in arrays.values()) or \
                    len(sums) != len(index) or sums.shape[1:] != (2, item_shape[0]):
                raise ValueError("shapes do not match the index")
            for (digest, split, row), (s, q) in zip(index.tolist(), sums.tolist(), strict=True):
                name = SPLITS[split]
                if row >= len(arrays[name]):
                    raise ValueError(f"row {row} beyond {name}_images.npy")
                self.rows[digest] = (name, row, s, q)
        except (OSError, ValueError, KeyError, IndexError) as err:
            log.warning("preprocess cache: ignoring %s (%s)", folder, err)
            self.rows = {}
            return
        self.arrays = arrays

    def get(self, digest: str) -> Pixels | None:
        entry = self.rows.get(digest.encode())
        if entry is None:
            return None
        split, row, sums, squares = entry
        return Pixels(self.arrays[split][row], sums, squares)

    def save(self, key: str, out_dir: Path, channels: int, rows: list[FileRow],
             sums: list[tuple[list[int], list[int]]], headers: dict[bytes, bool]) -> None:
        """Link this run's arrays under ``key`` with their index; keep only the recent keys."""
        if self.root is None:
            return
        self.arrays = {}  # close the previous run's memory maps before their folder goes
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            with replace_dir(self.root / key) as tmp:
                for split in SPLITS:
                    name = f"{split}_images.npy"
                    previous = self.root / key / name
                    # An unchanged split: DVC links the output back to the object it already
                    # holds, which is the previous file, so keep that inode rather than a twin.
                    same = previous.is_file() and filecmp.cmp(out_dir / name, previous, shallow=False)
                    os.link(previous if same else out_dir / name, tmp / name)
                index = np.array([(r.sha256.encode(), SPLITS.index(r.split), r.index) for r in rows],
                                 dtype=INDEX_DTYPE)
                np.save(tmp / "index.npy", index)
                np.save(tmp / "sums.npy", np.array(sums, dtype=np.int64).reshape(len(rows), 2, channels))
        except OSError as err:  # e.g. the cache on another file system: a copy would double the disk
            log.warning("preprocess cache not saved (%s): the next run decodes every file", err)
            return
        table = np.array(sorted(headers.items()), dtype=HEADERS_DTYPE)
        def write_headers(tmp: Path) -> None:
            with open(tmp, "wb") as handle:  # a file object: np.save would add ".npy" to a path
                np.save(handle, table)

        write_atomic(self.root / f"headers-{self.code}.npy", write_headers)
        self._prune(keep=key)

    def _prune(self, keep: str) -> None:
        for stale in self.root.glob("headers-*.npy"):
            if stale.name != f"headers-{self.code}.npy":
                stale.unlink()
        folders = sorted((p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                         key=lambda p: p.stat().st_mtime, reverse=True)
        recent = [keep, *[p.name for p in folders if p.name != keep][: KEEP_PARAM_SETS - 1]]
        for folder in folders:
            if folder.name not in recent:
                shutil.rmtree(folder, ignore_errors=True)


def _resolve_channels(setting: int | str, sources: list[Source]) -> int:
    if setting == "auto":
        return 1 if all(s.grayscale for s in sources if not s.error) else 3
    return int(setting)


def _check_coverage(dataset: Dataset, counts: dict[str, list[int]], params: PreprocessParams) -> None:
    fractions = {"train": 1.0, **split_fractions(dataset, params)}
    remove = {"folders": "the folder", "file": f"it from {dataset.root / CLASSES_FILE}",
              "param": "it from preprocess.classes"}[dataset.classes_source]
    for index, name in enumerate(dataset.classes):
        total = sum(counts[split][index] for split in SPLITS)
        if total == 0:
            raise PreprocessError(f"class '{name}' has no usable image: add images to "
                                  f"{dataset.class_folder(name)}/ or remove {remove}")
        for split in SPLITS:
            if split in dataset.split_folders and counts[split][index] == 0:
                raise PreprocessError(f"class '{name}' has no {split} image: add images to "
                                      f"{dataset.class_folder(name, split)}/")
            if split not in dataset.split_folders and fractions[split] > 0 and counts[split][index] == 0:
                raise PreprocessError(
                    f"class '{name}' has no {split} image ({total} usable in all): add images to "
                    f"{dataset.class_folder(name)}/, or change preprocess.val_fraction/test_fraction or base.seed"
                )


def _pool_map(pool, fn, items: list[Source], desc: str) -> list[Source]:
    return list(progress(pool.imap(fn, items, chunksize=32), total=len(items), desc=desc, unit="img"))


def preprocess_folder(data_dir: str | Path, out_dir: str | Path, params: PreprocessParams, seed: int,
                      cache_dir: str | Path | None = None) -> Manifest:
    """Run the stage: scan, hash, split, decode (or reuse), write arrays and manifest atomically.

    Args:
        data_dir: ``<class>/<image>`` or ``{train,val,test}/<class>/<image>`` folder.
        out_dir: output folder; replaced as a whole only when everything succeeded.
        params: the ``preprocess`` section of params.yaml.
        seed: ``base.seed``, part of the split function.
        cache_dir: the :class:`PixelCache` folder; None decodes every file.
    Returns:
        The manifest (also written as ``out_dir/manifest.json``).
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    dataset = scan_dataset(data_dir, params.classes or None)
    if len(dataset.classes) < 2:
        raise PreprocessError(f"{data_dir}: found {len(dataset.classes)} class folder(s); "
                              "a classifier needs at least 2")
    workers = params.workers or os.cpu_count() or 1
    sources = [Source(path, label, folder) for path, label, folder in dataset.files]
    cache = PixelCache(Path(cache_dir) if cache_dir else None)
    fractions = split_fractions(dataset, params)

    with multiprocessing.get_context("fork").Pool(workers) as pool:
        sources = _pool_map(pool, _hash, sources, "hash")
        for source in sources:
            source.grayscale = cache.headers.get(source.digest.encode()) if source.digest else None
        unknown = [s for s in sources if not s.error and s.grayscale is None]
        inspected = iter(_pool_map(pool, _inspect, unknown, "inspect"))
        sources = [next(inspected) if not s.error and s.grayscale is None else s for s in sources]
        for source in sources:
            if source.error and params.on_error == "fail":
                raise PreprocessError(f"{source.error} (set preprocess.on_error: skip to skip such files)")
            source.split = source.folder if source.folder in ("val", "test") else \
                assign_split(source.digest, seed, fractions["val"], fractions["test"])
        channels = _resolve_channels(params.channels, sources)
        usable = [s for s in sources if not s.error]
        item_shape = (channels, params.size, params.size)
        key = cache.key(params, channels)
        cache.load(key, item_shape)
        cached = {s.digest: pixels for s in usable if (pixels := cache.get(s.digest)) is not None}
        jobs = ((s.path, params.size, channels, params.max_pixels) for s in usable if s.digest not in cached)
        decoded = pool.imap(_decode, jobs, chunksize=8)
        log.info("%d images: %d to decode, %d from the cache", len(usable), len(usable) - len(cached), len(cached))

        with replace_dir(out_dir) as tmp:
            writers = {
                split: NpyWriter(tmp / f"{split}_images.npy", item_shape, sum(s.split == split for s in usable))
                for split in SPLITS
            }
            labels: dict[str, list[int]] = {split: [] for split in SPLITS}
            counts = {split: [0] * len(dataset.classes) for split in SPLITS}
            pixel_sum, pixel_sq = [0] * channels, [0] * channels
            rows, row_sums = [], []
            for source in progress(usable, total=len(usable), desc="decode", unit="img"):
                result = cached.get(source.digest) or next(decoded)
                if isinstance(result, str):
                    if params.on_error == "fail":
                        raise PreprocessError(f"{result} (set preprocess.on_error: skip to skip such files)")
                    source.error = result
                    continue
                rows.append(FileRow(path=source.path.relative_to(data_dir).as_posix(), sha256=source.digest,
                                    class_name=dataset.classes[source.label], split=source.split,
                                    index=writers[source.split].count))
                row_sums.append((result.sums, result.squares))
                writers[source.split].append(result.array)
                labels[source.split].append(source.label)
                counts[source.split][source.label] += 1
                if source.split == "train":  # exact integers: the same totals in any order, cached or not
                    pixel_sum = [a + b for a, b in zip(pixel_sum, result.sums, strict=True)]
                    pixel_sq = [a + b for a, b in zip(pixel_sq, result.squares, strict=True)]
            for writer in writers.values():
                writer.close()
                writer.path.chmod(0o444)  # hard-linked into the cache (and DVC's): never written in place
            skipped = [SkippedFile(path=s.path.relative_to(data_dir).as_posix(), reason=s.error)
                       for s in sources if s.error]
            for entry in skipped:
                log.warning("skipped %s", entry.reason)
            _check_coverage(dataset, counts, params)

            values = len(labels["train"]) * params.size * params.size * 255
            mean = np.array(pixel_sum, dtype=np.float64) / values
            std = np.sqrt(np.maximum(np.array(pixel_sq, dtype=np.float64) / (values * 255) - mean**2, 1e-12))
            for split in SPLITS:
                np.save(tmp / f"{split}_labels.npy", np.asarray(labels[split], dtype=np.int64))
            manifest = Manifest(
                classes=dataset.classes, classes_source=dataset.classes_source, channels=channels,
                image_size=params.size, mean=[round(float(m), 6) for m in mean], std=[round(float(s), 6) for s in std],
                counts={split: len(labels[split]) for split in SPLITS}, class_counts=counts, seed=seed,
                split_source={split: "folder" if split in dataset.split_folders else "hash" for split in SPLITS},
                files=rows, skipped=skipped,
            )
            (tmp / "manifest.json").write_text(manifest.to_json())
    headers = {s.digest.encode(): bool(s.grayscale) for s in usable if s.grayscale is not None}
    cache.save(key, out_dir, channels, rows, row_sums, headers)
    log.info("preprocessed %s: %s, %d channel(s), %d px, %d skipped, %d decoded", data_dir,
             manifest.counts, channels, params.size, len(skipped), len(usable) - len(cached))
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Preprocess an image folder into arrays and a manifest.")
    parser.add_argument("--data", default="data", help="dataset folder: <class>/<image> or "
                        "{train,val,test}/<class>/<image> (default: data)")
    parser.add_argument("--out", default="artifacts/preprocessed", help="output folder")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--cache", default=DEFAULT_CACHE,
                        help=f"decoded-image cache for incremental runs, '' for none (default: {DEFAULT_CACHE})")
    args = parser.parse_args(argv)
    setup_logging()

    def body() -> None:
        params = load_params(args.params)
        preprocess_folder(args.data, args.out, params.preprocess, params.base.seed, args.cache or None)

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
