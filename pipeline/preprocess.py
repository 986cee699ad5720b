"""Preprocess stage: an image folder → uint8 arrays + manifest, with a stable split.

    python -m pipeline.preprocess --data data --out artifacts/preprocessed [--cache .cache/preprocess]

Layouts (see :func:`pipeline.lib.dataset_folders.scan_dataset`): ``data/<class>/<image>``, or pre-split
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
import hashlib
import logging
import math
import multiprocessing
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.common import images
from pipeline.common.contract import SPLITS, FileRow, Manifest, SkippedFile
from pipeline.common.cpus import usable_cpus
from pipeline.common.errors import UserError, run_command, setup_logging
from pipeline.common.files import replace_dir
from pipeline.lib.config import PreprocessParams, load_params
from pipeline.lib.dataset_folders import CLASSES_FILE, Dataset, scan_dataset
from pipeline.lib.pixelcache import CachedRow, PixelCache, copy_range, file_state
from pipeline.lib.progress import progress

log = logging.getLogger(__name__)

DEFAULT_CACHE = ".cache/preprocess"


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
    path: str
    rel: str  # relative to the dataset folder, POSIX: the manifest's name for it
    label: int
    folder: str = ""  # the split folder it was found in, "" for data/<class>/
    state: tuple[int, int, int, int] = (0, 0, 0, 0)  # size, mtime, ctime, inode when hashed
    digest: str = ""
    split: str = ""
    grayscale: bool | None = None  # None until the header was read (or found in the cache)
    error: str = ""  # "reason: message" when the file is unusable


def _hash(source: Source) -> Source:
    try:
        with open(source.path, "rb") as handle:
            source.digest = hashlib.sha256(handle.read()).hexdigest()
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


def _decode(job: tuple[str, int, int, int]) -> Pixels | str:
    path, size, channels, max_pixels = job
    try:
        array = images.preprocess(path, size, channels, max_pixels)
    except images.ImageError as err:
        return f"{err.reason}: {err}"
    except OSError as err:
        return f"unreadable: {path}: {err}"
    return Pixels(array, *pixel_sums(array))


class LinkedSplit:
    """A split whose images and order did not change: a hard link to the previous run's array."""

    def __init__(self, path: Path, previous: Path):
        self.path, self.previous, self.count = path, previous, 0

    def append_cached(self, row: CachedRow) -> None:
        self.count += 1

    def append(self, array: np.ndarray) -> None:
        raise AssertionError("an unchanged split has only cached rows")

    def close(self) -> None:
        os.link(self.previous, self.path)


class NpyWriter:
    """Append C×H×W arrays to an ``.npy`` file without holding them in memory."""

    def __init__(self, path: Path, item_shape: tuple[int, ...], capacity: int):
        self.path, self.item_shape, self.count = path, item_shape, 0
        self.row_bytes = int(np.prod(item_shape))
        self.file = open(path, "wb")
        self._header(capacity)
        self.data_start = self.file.tell()
        self.pending: tuple[int, int, int] | None = None  # cached rows to copy: (fd, offset, bytes)

    def _header(self, count: int) -> None:
        header = {"descr": "|u1", "fortran_order": False, "shape": (count, *self.item_shape)}
        np.lib.format.write_array_header_1_0(self.file, header)

    def append(self, array: np.ndarray) -> None:
        self._copy_pending()
        self.file.write(np.ascontiguousarray(array).data)
        self.count += 1

    def append_cached(self, row: CachedRow) -> None:
        """Append a row of a previous run's array; consecutive rows are copied as one range."""
        if self.pending and self.pending[0] == row.fd and self.pending[1] + self.pending[2] == row.offset:
            self.pending = (row.fd, self.pending[1], self.pending[2] + self.row_bytes)
        else:
            self._copy_pending()
            self.pending = (row.fd, row.offset, self.row_bytes)
        self.count += 1

    def _copy_pending(self) -> None:
        if self.pending is None:
            return
        fd, offset, nbytes = self.pending
        self.pending = None
        self.file.flush()
        position = self.file.tell()
        copy_range(fd, self.file.fileno(), offset, position, nbytes)
        self.file.seek(position + nbytes)

    def close(self) -> None:
        """Rewrite the header with the real count (files may have been skipped)."""
        self._copy_pending()
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
        self.file.truncate(self.data_start + self.count * self.row_bytes)
        self.file.close()


def _resolve_channels(setting: int | str, sources: list[Source]) -> int:
    if setting == "auto":
        return 1 if all(s.grayscale for s in sources if not s.error) else 3
    return int(setting)


MAX_NAMED = 20  # an error line names at most this many bad files


def unusable_files_message(errors: list[str]) -> str:
    """One line naming every unusable file (up to :data:`MAX_NAMED`), for ``on_error: fail``."""
    named = "; ".join(errors[:MAX_NAMED])
    more = f"; and {len(errors) - MAX_NAMED} more" if len(errors) > MAX_NAMED else ""
    return (f"{len(errors)} unusable file(s): {named}{more} "
            "(remove them, or set preprocess.on_error: skip to skip and list them in manifest.json)")


def images_needed(fraction: float) -> tuple[int, int]:
    """Images a class needs for the hash split to put one in a split drawn with ``fraction``:
    enough to expect one (1/fraction) and enough for a 95% chance (1 - (1-fraction)^n >= 0.95)."""
    return math.ceil(1 / fraction), math.ceil(math.log(0.05) / math.log(1 - fraction))


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
                expect, likely = images_needed(fractions[split])
                raise PreprocessError(
                    f"class '{name}' has no {split} image ({total} usable in all; with "
                    f"preprocess.{split}_fraction {fractions[split]:g} a class needs {expect} images to expect "
                    f"one in {split}, {likely} for a 95% chance): add images to {dataset.class_folder(name)}/, "
                    f"or change preprocess.val_fraction/test_fraction or base.seed"
                )


def _pool_update(pool, fn, sources: list[Source], needed, desc: str) -> list[Source]:
    """``sources`` with ``fn`` applied, in the worker processes, to those where ``needed(source)``."""
    todo = [s for s in sources if needed(s)]
    if not todo:
        return sources
    done = iter(list(progress(pool.imap(fn, todo, chunksize=32), total=len(todo), desc=desc, unit="img")))
    return [next(done) if needed(s) else s for s in sources]


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
    workers = params.workers or usable_cpus()  # not os.cpu_count(): a pod may get 2 of 64 cores
    cache = PixelCache(Path(cache_dir) if cache_dir else None)
    fractions = split_fractions(dataset, params)
    sources = []
    absolute = os.path.abspath(data_dir)  # the cache's name for a file: stable whatever the working folder
    for rel, label, folder in dataset.files:
        source = Source(os.path.join(data_dir, rel), rel, label, folder)
        try:
            source.state = file_state(os.stat(source.path))
            source.digest = cache.digest(f"{absolute}/{rel}", source.state)
        except OSError as err:
            source.error = f"unreadable: {source.path}: {err}"
        sources.append(source)

    with multiprocessing.get_context("fork").Pool(workers) as pool:
        sources = _pool_update(pool, _hash, sources, lambda s: not s.error and not s.digest, "hash")
        for source in sources:
            source.grayscale = cache.grayscale(source.digest) if source.digest else None
        sources = _pool_update(pool, _inspect, sources, lambda s: not s.error and s.grayscale is None, "inspect")
        for source in sources:
            source.split = source.folder if source.folder in ("val", "test") else \
                assign_split(source.digest, seed, fractions["val"], fractions["test"])
        channels = _resolve_channels(params.channels, sources)
        usable = [s for s in sources if not s.error]
        item_shape = (channels, params.size, params.size)
        key = cache.key(params.size, channels, params.max_pixels)
        cache.load(key, item_shape)
        cached = {s.digest: row for s in usable if (row := cache.get(s.digest)) is not None}
        jobs = ((s.path, params.size, channels, params.max_pixels) for s in usable if s.digest not in cached)
        decoded = pool.imap(_decode, jobs, chunksize=8)
        log.info("%d images: %d to decode, %d from the cache", len(usable), len(usable) - len(cached), len(cached))

        try:
            with replace_dir(out_dir) as tmp:
                writers: dict[str, NpyWriter | LinkedSplit] = {}
                for split in SPLITS:
                    digests = [s.digest for s in usable if s.split == split]
                    previous = cache.unchanged(split, digests)  # same images, same order: same bytes
                    writers[split] = LinkedSplit(tmp / f"{split}_images.npy", previous) if previous else \
                        NpyWriter(tmp / f"{split}_images.npy", item_shape, len(digests))
                labels: dict[str, list[int]] = {split: [] for split in SPLITS}
                counts = {split: [0] * len(dataset.classes) for split in SPLITS}
                pixel_sum, pixel_sq = [0] * channels, [0] * channels
                rows, row_sums = [], []
                for source in progress(usable, total=len(usable), desc="decode", unit="img"):
                    result = cached.get(source.digest) or next(decoded)
                    if isinstance(result, str):
                        source.error = result
                        continue
                    rows.append(FileRow(path=source.rel, sha256=source.digest, split=source.split,
                                        class_name=dataset.classes[source.label], index=writers[source.split].count))
                    row_sums.append((result.sums, result.squares))
                    if isinstance(result, CachedRow):
                        writers[source.split].append_cached(result)
                    else:
                        writers[source.split].append(result.array)
                    labels[source.split].append(source.label)
                    counts[source.split][source.label] += 1
                    if source.split == "train":  # exact integers: the same totals in any order, cached or not
                        pixel_sum = [a + b for a, b in zip(pixel_sum, result.sums, strict=True)]
                        pixel_sq = [a + b for a, b in zip(pixel_sq, result.squares, strict=True)]
                for writer in writers.values():
                    writer.close()
                    writer.path.chmod(0o444)  # hard-linked into the cache (and DVC's): never written in place
                skipped = [SkippedFile(path=s.rel, reason=s.error) for s in sources if s.error]
                if skipped and params.on_error == "fail":
                    raise PreprocessError(unusable_files_message([s.error for s in sources if s.error]))
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
                    image_size=params.size, mean=[round(float(m), 6) for m in mean],
                    std=[round(float(s), 6) for s in std], counts={split: len(labels[split]) for split in SPLITS},
                    class_counts=counts, seed=seed,
                    split_source={split: "folder" if split in dataset.split_folders else "hash" for split in SPLITS},
                    files=rows, skipped=skipped,
                )
                (tmp / "manifest.json").write_text(manifest.to_json())
        finally:
            cache.close()
    hashed = [(f"{absolute}/{s.rel}", s.state, s.digest, s.grayscale) for s in sources if s.digest]
    cache.save(key, out_dir, channels, rows, row_sums, hashed)
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
