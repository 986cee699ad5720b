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
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.common import images
from pipeline.common.contract import MANIFEST_FILE, SPLITS, FileRow, Manifest, SkippedFile
from pipeline.common.cpus import preprocess_workers
from pipeline.common.errors import UserError, run_command, setup_logging
from pipeline.common.files import replace_dir
from pipeline.lib.config import PreprocessParams, load_params
from pipeline.lib.dataset_folders import CLASSES_FILE, Dataset, scan_dataset
from pipeline.lib.pixelcache import CachedRow, PixelCache, file_state
from pipeline.lib.progress import progress
from pipeline.lib.split_arrays import LinkedSplit, NpyWriter

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
class DatasetFile:
    """One file of the dataset folder and what the stage learned about it, step by step."""

    path: str
    rel: str  # relative to the dataset folder, POSIX: the manifest's name for it
    label: int
    folder: str = ""  # the split folder it was found in, "" for data/<class>/
    state: tuple[int, int, int, int] = (0, 0, 0, 0)  # size, mtime, ctime, inode when hashed
    digest: str = ""
    split: str = ""
    grayscale: bool | None = None  # None until the header was read (or found in the cache)
    error: str = ""  # "reason: message" when the file is unusable


def _hash(source: DatasetFile) -> DatasetFile:
    try:
        with open(source.path, "rb") as handle:
            source.digest = hashlib.sha256(handle.read()).hexdigest()
    except OSError as err:
        source.error = f"unreadable: {source.path}: {err}"
    return source


def _inspect(source: DatasetFile) -> DatasetFile:
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


def _resolve_channels(setting: int | str, sources: list[DatasetFile]) -> int:
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


def _pool_update(pool, fn, sources: list[DatasetFile], needed, desc: str) -> list[DatasetFile]:
    """``sources`` with ``fn`` applied, in the worker processes, to those where ``needed(source)``."""
    todo = [s for s in sources if needed(s)]
    if not todo:
        return sources
    done = iter(list(progress(pool.imap(fn, todo, chunksize=32), total=len(todo), desc=desc, unit="img")))
    return [next(done) if needed(s) else s for s in sources]


def _list_files(data_dir: Path, dataset: Dataset, cache: PixelCache) -> list[DatasetFile]:
    """Every file of the dataset, with its hash when the cache knows the file unchanged."""
    files = []
    absolute = os.path.abspath(data_dir)  # the cache's name for a file: stable whatever the working folder
    for rel, label, folder in dataset.files:
        file = DatasetFile(os.path.join(data_dir, rel), rel, label, folder)
        try:
            file.state = file_state(os.stat(file.path))
            file.digest = cache.digest(f"{absolute}/{rel}", file.state)
        except OSError as err:
            file.error = f"unreadable: {file.path}: {err}"
        files.append(file)
    return files


def _hash_inspect_split(pool, files: list[DatasetFile], cache: PixelCache, dataset: Dataset,
                        params: PreprocessParams, seed: int) -> list[DatasetFile]:
    """Hash what the cache does not know, read the headers it has not seen, assign each file its split."""
    files = _pool_update(pool, _hash, files, lambda f: not f.error and not f.digest, "hash")
    for file in files:
        file.grayscale = cache.grayscale(file.digest) if file.digest else None
    files = _pool_update(pool, _inspect, files, lambda f: not f.error and f.grayscale is None, "inspect")
    fractions = split_fractions(dataset, params)
    for file in files:
        file.split = file.folder if file.folder in ("val", "test") else \
            assign_split(file.digest, seed, fractions["val"], fractions["test"])
    return files


@dataclass
class Written:
    """What the arrays hold, in the order written: the manifest's rows, labels, class counts and
    the train split's exact per-channel sums (for the mean and std)."""

    rows: list[FileRow]
    row_sums: list[tuple[list[int], list[int]]]
    labels: dict[str, list[int]]
    counts: dict[str, list[int]]
    pixel_sum: list[int]
    pixel_sq: list[int]

    def normalisation(self, image_size: int) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the train split, 0–1 scale, 6 decimals."""
        values = len(self.labels["train"]) * image_size * image_size * 255
        mean = np.array(self.pixel_sum, dtype=np.float64) / values
        std = np.sqrt(np.maximum(np.array(self.pixel_sq, dtype=np.float64) / (values * 255) - mean**2, 1e-12))
        return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


def _open_writers(tmp: Path, usable: list[DatasetFile], cache: PixelCache,
                  item_shape: tuple[int, int, int]) -> dict[str, NpyWriter | LinkedSplit]:
    writers: dict[str, NpyWriter | LinkedSplit] = {}
    for split in SPLITS:
        digests = [f.digest for f in usable if f.split == split]
        previous = cache.unchanged(split, digests)  # same images, same order: same bytes
        writers[split] = LinkedSplit(tmp / f"{split}_images.npy", previous) if previous else \
            NpyWriter(tmp / f"{split}_images.npy", item_shape, len(digests))
    return writers


def _write_arrays(usable: list[DatasetFile], cached: dict[str, CachedRow], decoded: Iterator[Pixels | str],
                  writers: dict[str, NpyWriter | LinkedSplit], classes: list[str], channels: int,
                  params: PreprocessParams) -> Written:
    """Each usable file's pixels (cached, else the next decoded) into its split's array."""
    written = Written(rows=[], row_sums=[], labels={split: [] for split in SPLITS},
                      counts={split: [0] * len(classes) for split in SPLITS},
                      pixel_sum=[0] * channels, pixel_sq=[0] * channels)
    for file in progress(usable, total=len(usable), desc="decode", unit="img"):
        result = cached.get(file.digest) or next(decoded)
        if isinstance(result, str):
            file.error = result
            continue
        written.rows.append(FileRow(path=file.rel, sha256=file.digest, split=file.split,
                                    class_name=classes[file.label], index=writers[file.split].count))
        written.row_sums.append((result.sums, result.squares))
        if isinstance(result, CachedRow):
            writers[file.split].append_cached(result)
        else:
            writers[file.split].append(result.array)
        written.labels[file.split].append(file.label)
        written.counts[file.split][file.label] += 1
        if file.split == "train":  # exact integers: the same totals in any order, cached or not
            written.pixel_sum = [a + b for a, b in zip(written.pixel_sum, result.sums, strict=True)]
            written.pixel_sq = [a + b for a, b in zip(written.pixel_sq, result.squares, strict=True)]
    for writer in writers.values():
        writer.close()
        writer.path.chmod(0o444)  # hard-linked into the cache (and DVC's): never written in place
    return written


def _manifest(dataset: Dataset, channels: int, image_size: int, seed: int, written: Written,
              skipped: list[SkippedFile]) -> Manifest:
    mean, std = written.normalisation(image_size)
    return Manifest(
        classes=dataset.classes, classes_source=dataset.classes_source, channels=channels, image_size=image_size,
        mean=mean, std=std, counts={split: len(written.labels[split]) for split in SPLITS},
        class_counts=written.counts, seed=seed,
        split_source={split: "folder" if split in dataset.split_folders else "hash" for split in SPLITS},
        files=written.rows, skipped=skipped,
    )


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
    cache = PixelCache(Path(cache_dir) if cache_dir else None)
    files = _list_files(data_dir, dataset, cache)
    with multiprocessing.get_context("fork").Pool(preprocess_workers(params.workers)) as pool:
        files = _hash_inspect_split(pool, files, cache, dataset, params, seed)
        channels = _resolve_channels(params.channels, files)
        usable = [f for f in files if not f.error]
        item_shape = (channels, params.image_size, params.image_size)
        key = cache.key(params.image_size, channels, params.max_pixels)
        cache.load(key, item_shape)
        cached = {f.digest: row for f in usable if (row := cache.get(f.digest)) is not None}
        jobs = ((f.path, params.image_size, channels, params.max_pixels) for f in usable if f.digest not in cached)
        decoded = pool.imap(_decode, jobs, chunksize=8)
        log.info("%d images: %d to decode, %d from the cache", len(usable), len(usable) - len(cached), len(cached))
        try:
            with replace_dir(out_dir) as tmp:
                writers = _open_writers(tmp, usable, cache, item_shape)
                written = _write_arrays(usable, cached, decoded, writers, dataset.classes, channels, params)
                skipped = [SkippedFile(path=f.rel, reason=f.error) for f in files if f.error]
                if skipped and params.on_error == "fail":  # every bad file named at once, nothing written
                    raise PreprocessError(unusable_files_message([f.error for f in files if f.error]))
                for entry in skipped:
                    log.warning("skipped %s", entry.reason)
                _check_coverage(dataset, written.counts, params)
                for split in SPLITS:
                    np.save(tmp / f"{split}_labels.npy", np.asarray(written.labels[split], dtype=np.int64))
                manifest = _manifest(dataset, channels, params.image_size, seed, written, skipped)
                (tmp / MANIFEST_FILE).write_text(manifest.to_json())
        finally:
            cache.close()
    absolute = os.path.abspath(data_dir)
    hashed = [(f"{absolute}/{f.rel}", f.state, f.digest, f.grayscale) for f in files if f.digest]
    cache.save(key, out_dir, channels, written.rows, written.row_sums, hashed)
    log.info("preprocessed %s: %s, %d channel(s), %d px, %d skipped, %d decoded", data_dir,
             manifest.counts, channels, params.image_size, len(skipped), len(usable) - len(cached))
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
