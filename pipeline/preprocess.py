"""Preprocess stage: ``data/<class>/<image>`` → uint8 arrays + manifest, with a stable split.

    python -m pipeline.preprocess --data data --out artifacts/preprocessed

Outputs (see DESIGN.md, data contract): ``{train,val,test}_images.npy`` (uint8 N×C×H×W),
``{train,val,test}_labels.npy`` (int64) and ``manifest.json``. The stage streams: decoded
images go straight to disk, so memory does not grow with the dataset.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import multiprocessing
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import images
from pipeline.config import PreprocessParams, load_params
from pipeline.contract import SPLITS, FileRow, Manifest, SkippedFile
from pipeline.cpus import usable_cpus
from pipeline.datasets import scan_image_folder
from pipeline.errors import UserError, run_command, setup_logging
from pipeline.files import replace_dir

log = logging.getLogger(__name__)


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


@dataclass
class Source:
    path: Path
    label: int
    digest: str = ""
    split: str = ""
    grayscale: bool = True
    error: str = ""  # "reason: message" when the file is unusable


def _inspect(source: Source) -> Source:
    """Hash the file and read its header (cheap: no pixel decoding)."""
    try:
        source.digest = hashlib.sha256(source.path.read_bytes()).hexdigest()
        img = images.open_image(source.path)
        source.grayscale = images.is_grayscale(img)
        img.close()
    except images.ImageError as err:
        source.error = f"{err.reason}: {err}"
    except OSError as err:
        source.error = f"unreadable: {source.path}: {err}"
    return source


def _decode(job: tuple[Path, int, int, int]) -> np.ndarray | str:
    path, size, channels, max_pixels = job
    try:
        return images.preprocess(path, size, channels, max_pixels)
    except images.ImageError as err:
        return f"{err.reason}: {err}"
    except OSError as err:
        return f"unreadable: {path}: {err}"


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
        self.file.write(array.tobytes())
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


def _resolve_channels(setting: int | str, sources: list[Source]) -> int:
    if setting == "auto":
        return 1 if all(s.grayscale for s in sources if not s.error) else 3
    return int(setting)


def _check_coverage(classes: list[str], counts: dict[str, list[int]], params: PreprocessParams) -> None:
    fractions = {"train": 1.0, "val": params.val_fraction, "test": params.test_fraction}
    for index, name in enumerate(classes):
        total = sum(counts[split][index] for split in SPLITS)
        if total == 0:
            raise PreprocessError(
                f"class '{name}' has no usable image: add images to data/{name}/ or remove the folder"
            )
        for split in SPLITS:
            if fractions[split] > 0 and counts[split][index] == 0:
                raise PreprocessError(
                    f"class '{name}' has no {split} image ({total} usable in all): add images to "
                    f"data/{name}/, or change preprocess.val_fraction/test_fraction or base.seed"
                )


def preprocess_folder(data_dir: str | Path, out_dir: str | Path, params: PreprocessParams, seed: int) -> Manifest:
    """Run the stage: scan, hash, split, decode, write arrays and manifest atomically.

    Args:
        data_dir: ``<class>/<image>`` folder.
        out_dir: output folder; replaced as a whole only when everything succeeded.
        params: the ``preprocess`` section of params.yaml.
        seed: ``base.seed``, part of the split function.
    Returns:
        The manifest (also written as ``out_dir/manifest.json``).
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    classes, files = scan_image_folder(data_dir)
    if len(classes) < 2:
        raise PreprocessError(f"{data_dir}: found {len(classes)} class folder(s); a classifier needs at least 2")
    workers = params.workers or usable_cpus()  # not os.cpu_count(): a pod may get 2 of 64 cores
    sources = [Source(path, label) for path, label in files]

    with multiprocessing.get_context("fork").Pool(workers) as pool:
        sources = list(tqdm(pool.imap(_inspect, sources, chunksize=32), total=len(sources),
                            desc="hash", unit="img", disable=None))
        for source in sources:
            if source.error and params.on_error == "fail":
                raise PreprocessError(f"{source.error} (set preprocess.on_error: skip to skip such files)")
            source.split = assign_split(source.digest, seed, params.val_fraction, params.test_fraction)
        channels = _resolve_channels(params.channels, sources)
        usable = [s for s in sources if not s.error]

        with replace_dir(out_dir) as tmp:
            item_shape = (channels, params.size, params.size)
            writers = {
                split: NpyWriter(tmp / f"{split}_images.npy", item_shape, sum(s.split == split for s in usable))
                for split in SPLITS
            }
            labels: dict[str, list[int]] = {split: [] for split in SPLITS}
            counts = {split: [0] * len(classes) for split in SPLITS}
            pixel_sum = np.zeros(channels)
            pixel_sq = np.zeros(channels)
            rows, skipped = [], []
            jobs = ((s.path, params.size, channels, params.max_pixels) for s in usable)
            decoded = pool.imap(_decode, jobs, chunksize=8)
            for source, result in tqdm(zip(usable, decoded, strict=True), total=len(usable), desc="decode",
                                       unit="img", disable=None):
                if isinstance(result, str):
                    if params.on_error == "fail":
                        raise PreprocessError(f"{result} (set preprocess.on_error: skip to skip such files)")
                    source.error = result
                    continue
                rows.append(FileRow(path=source.path.relative_to(data_dir).as_posix(), sha256=source.digest,
                                class_name=classes[source.label], split=source.split,
                                index=writers[source.split].count))
                writers[source.split].append(result)
                labels[source.split].append(source.label)
                counts[source.split][source.label] += 1
                if source.split == "train":
                    pixels = result.reshape(channels, -1).astype(np.float64) / 255.0
                    pixel_sum += pixels.mean(axis=1)
                    pixel_sq += (pixels**2).mean(axis=1)
            for writer in writers.values():
                writer.close()
            skipped = [SkippedFile(path=s.path.relative_to(data_dir).as_posix(), reason=s.error)
                       for s in sources if s.error]
            for entry in skipped:
                log.warning("skipped %s", entry.reason)
            _check_coverage(classes, counts, params)

            n_train = len(labels["train"])
            mean = pixel_sum / n_train
            std = np.sqrt(np.maximum(pixel_sq / n_train - mean**2, 1e-12))
            for split in SPLITS:
                np.save(tmp / f"{split}_labels.npy", np.asarray(labels[split], dtype=np.int64))
            manifest = Manifest(
                classes=classes, channels=channels, image_size=params.size,
                mean=[round(float(m), 6) for m in mean], std=[round(float(s), 6) for s in std],
                counts={split: len(labels[split]) for split in SPLITS}, class_counts=counts, seed=seed,
                files=rows, skipped=skipped,
            )
            (tmp / "manifest.json").write_text(manifest.to_json())
    log.info("preprocessed %s: %s, %d channel(s), %d px, %d skipped", data_dir,
             manifest.counts, channels, params.size, len(skipped))
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Preprocess an image folder into arrays and a manifest.")
    parser.add_argument("--data", default="data", help="dataset folder: <class>/<image> (default: data)")
    parser.add_argument("--out", default="artifacts/preprocessed", help="output folder")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    setup_logging()

    def body() -> None:
        params = load_params(args.params)
        preprocess_folder(args.data, args.out, params.preprocess, params.base.seed)

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
