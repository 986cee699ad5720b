"""Preprocess throughput on photographs: our stage against the loop a user would write; and
the incremental case: a re-run after adding 1% of files.

    python bench/preprocess.py [--images 300] [--size 224] [--incremental 20000] [--only photos|incremental]

The corpus is built once into bench/.cache/photos/<class>/<i>.jpg from the two photographs
that ship in scikit-learn's wheel: random crops, rescaled to 0.3–3 megapixels, JPEG quality
70–95. Both contenders read the same files in the same run:

  stage     pipeline.preprocess.preprocess_folder (all cores, hashing and .npy writing included)
  baseline  one process: PIL open → exif_transpose → RGB → torchvision Resize + CenterCrop → numpy

Peak memory of the stage is measured in a fresh subprocess for N/2 and N images.

Incremental: N synthetic 28×28 grayscale PNGs (MNIST-like strokes on noise, 10 classes, built
once into bench/.cache/strokes/) preprocessed to ``--size`` with the stage's cache; then 1% more
files are added and the stage runs again (target: <= 10% of the full run's wall time); then the
same +1% folder from scratch without a cache, which must give byte-identical outputs.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps

from pipeline.common import images
from pipeline.lib.config import PreprocessParams
from pipeline.preprocess import SPLITS, preprocess_folder

ROOT = Path(__file__).resolve().parent.parent

CACHE = ROOT / "bench" / ".cache" / "photos"
STROKES = ROOT / "bench" / ".cache" / "strokes"
CLASSES = ("a", "b", "c")
T = TypeVar("T")


def build_corpus(root: Path, count: int, seed: int = 0) -> list[Path]:
    """Write ``count`` JPEGs of 0.3–3 MP (random crop, rescale, quality); reuse them if already there."""
    spec = {"count": count, "seed": seed, "version": 1}
    marker = root / ".spec.json"  # hidden: the stage ignores it
    files = [root / CLASSES[i % len(CLASSES)] / f"{i:04d}.jpg" for i in range(count)]
    if marker.exists() and json.loads(marker.read_text()) == spec and all(f.exists() for f in files):
        return files
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]  # 2 × 640×427
    rng = np.random.default_rng(seed)
    for i, path in enumerate(files):
        photo = photos[i % len(photos)]
        w, h = int(photo.width * rng.uniform(0.5, 1.0)), int(photo.height * rng.uniform(0.5, 1.0))
        left, top = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
        scale = np.sqrt(rng.uniform(0.3e6, 3.0e6) / (w * h))
        crop = photo.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC,
                            box=(left, top, left + w, top + h))
        path.parent.mkdir(parents=True, exist_ok=True)
        crop.save(path, "JPEG", quality=int(rng.integers(70, 96)))
    marker.write_text(json.dumps(spec))
    return files


def baseline(files: list[Path], transform: Callable[[Image.Image], Image.Image]) -> dict[str, np.ndarray]:
    """What a user would write: a sequential PIL + torchvision loop."""
    out = {}
    for path in files:
        with Image.open(path) as img:
            rgb = ImageOps.exif_transpose(img).convert("RGB")
        out[rel(path)] = np.asarray(transform(rgb)).transpose(2, 0, 1)
    return out


def full_decode(path: Path, size: int) -> np.ndarray:
    """The stage's geometry without the JPEG draft shortcut."""
    with Image.open(path) as img:
        img.load()
        rgb = images.convert_channels(ImageOps.exif_transpose(img), 3)
    return images.to_array(images.crop_resize(rgb, size))


def rel(path: Path) -> str:
    return path.relative_to(CACHE).as_posix()


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def cpu_seconds() -> float:
    """User + system time of this process and of its reaped children (the stage's workers)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def best_of(repeat: int, fn: Callable[..., T], *args: object) -> tuple[T, float, float]:
    """(result, wall seconds, CPU seconds) of the fastest of ``repeat`` calls."""
    runs = []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), cpu_seconds()
        result = fn(*args)
        runs.append((time.perf_counter() - wall, cpu_seconds() - cpu, result))
    wall, cpu, result = min(runs, key=lambda run: run[0])
    return result, wall, cpu


def run_stage(data: Path, out: Path, size: int) -> dict:
    params = PreprocessParams(image_size=size, channels=3, val_fraction=0.1, test_fraction=0.1, workers=0)
    return preprocess_folder(data, out, params, seed=0)


def peak_rss_mb(data: Path, size: int) -> tuple[float, float]:
    """(main process, largest worker) peak RSS in MiB of the stage run in a fresh interpreter."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, __file__, "--rss-of", str(data), "--out", tmp, "--size", str(size)]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
    main_kib, worker_kib = json.loads(done.stdout.strip().splitlines()[-1])
    return main_kib / 1024, worker_kib / 1024


def subset(files: list[Path], count: int, into: Path) -> Path:
    """A folder of symlinks to the first ``count`` files, same class layout."""
    for path in files[:count]:
        link = into / path.parent.name / path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
    return into


def build_strokes(root: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` 28×28 grayscale PNGs, ``root/<digit>/<i>.png``: a few random bright lines on faint
    noise, distinct per file. Reused when already there."""
    spec = {"count": count, "seed": seed, "version": 1}
    marker = root / ".spec.json"
    files = [root / str(i % 10) / f"{i:06d}.png" for i in range(count)]
    if marker.exists() and json.loads(marker.read_text()) == spec and all(f.exists() for f in files):
        return files
    rng = np.random.default_rng(seed)
    from PIL import ImageDraw

    for path in files:
        img = Image.fromarray(rng.integers(0, 30, (28, 28), dtype=np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            draw.line([tuple(rng.integers(3, 25, 2).tolist()), tuple(rng.integers(3, 25, 2).tolist())],
                      fill=int(rng.integers(180, 256)), width=int(rng.integers(2, 4)))
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
    marker.write_text(json.dumps(spec))
    return files


def place(files: list[Path], into: Path) -> None:
    for path in files:
        dest = into / path.parent.name / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)


def timed(fn: Callable[..., T], *args: object) -> tuple[T, float]:
    """Wall time of one call, started with no dirty pages left by the previous run (each run writes
    about 1 GiB; without the sync its write-back would be billed to the next run)."""
    os.sync()
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def incremental(count: int, size: int) -> None:
    """Full run, +1% files with the cache, and the same +1% folder from scratch (the baseline)."""
    extra = max(1, count // 100)
    files = build_strokes(STROKES, count + extra)
    params = PreprocessParams(image_size=size, channels="auto", val_fraction=0.1, test_fraction=0.1, workers=0)
    with tempfile.TemporaryDirectory(dir=STROKES.parent) as tmp:
        data, cache = Path(tmp) / "data", Path(tmp) / "cache"
        place(files[:count], data)
        _, full_s = timed(preprocess_folder, data, Path(tmp) / "out", params, 0, cache)
        place(files[count:], data)
        _, added_s = timed(preprocess_folder, data, Path(tmp) / "out", params, 0, cache)
        _, same_s = timed(preprocess_folder, data, Path(tmp) / "out", params, 0, cache)
        _, scratch_s = timed(preprocess_folder, data, Path(tmp) / "scratch", params, 0, None)
        identical = all(filecmp.cmp(Path(tmp) / "out" / p.name, p, shallow=False)
                        for p in (Path(tmp) / "scratch").iterdir())
        gib = sum(p.stat().st_size for p in (Path(tmp) / "out").glob("*_images.npy")) / 2**30
    print(f"\nincremental: {count} synthetic 28x28 PNGs -> {size} px, 1 channel ({gib:.2f} GiB of arrays), "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"{'run':34}{'images':>8}{'decoded':>9}{'wall s':>9}{'vs full':>9}")
    rows = [("full run, empty cache", count, count, full_s),
            (f"+1% files ({extra}), cache", count + extra, extra, added_s),
            ("nothing changed, cache", count + extra, 0, same_s),
            ("+1% folder from scratch, no cache", count + extra, count + extra, scratch_s)]
    for name, images_n, decoded, seconds in rows:
        print(f"{name:34}{images_n:8d}{decoded:9d}{seconds:9.2f}{seconds / full_s:9.1%}")
    print(f"+1% run / full run: {added_s / full_s:.1%} (target <= 10%); "
          f"/ from-scratch run on the same files: {added_s / scratch_s:.1%}")
    print(f"outputs of the +1% cached run and the from-scratch run byte-identical: {identical}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=300, help="corpus size (default: 300)")
    parser.add_argument("--size", type=int, default=224, help="output side (default: 224)")
    parser.add_argument("--repeat", type=int, default=1, help="keep the fastest of R runs (default: 1)")
    parser.add_argument("--incremental", type=int, default=20000,
                        help="images in the incremental case (default: 20000)")
    parser.add_argument("--only", choices=("photos", "incremental"), help="run one case")
    parser.add_argument("--rss-of", type=Path, help=argparse.SUPPRESS)  # internal: child for peak RSS
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_of:
        run_stage(args.rss_of, args.out / "out", args.size)
        # VmHWM, not RUSAGE_SELF: Linux carries ru_maxrss over exec, so it would report the
        # parent's peak (torch and the baseline's arrays) instead of this process's.
        status = Path("/proc/self/status").read_text()
        main_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
        print(json.dumps([main_kib, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))
        return
    os.environ.setdefault("CNN_PROGRESS_INTERVAL", "60")  # keep the tables readable in a log
    if args.only != "photos":
        incremental(args.incremental, args.size)
    if args.only == "incremental":
        return

    files = build_corpus(CACHE, args.images)
    megapixels = np.array([np.prod(Image.open(f).size) / 1e6 for f in files])  # header only
    print(f"corpus: {len(files)} JPEGs, {megapixels.min():.2f}–{megapixels.max():.2f} MP "
          f"(mean {megapixels.mean():.2f}), {sum(f.stat().st_size for f in files) / 2**20:.0f} MiB, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} before the run")

    with tempfile.TemporaryDirectory() as tmp:
        manifest, stage_s, stage_cpu = best_of(args.repeat, run_stage, CACHE, Path(tmp) / "out", args.size)
        arrays = {s: np.load(Path(tmp) / "out" / f"{s}_images.npy") for s in SPLITS}
        ours = {row.path: arrays[row.split][row.index] for row in manifest.files}
    from torchvision import transforms  # imported outside the timing: it takes seconds

    transform = transforms.Compose([transforms.Resize(args.size), transforms.CenterCrop(args.size)])
    theirs, baseline_s, baseline_cpu = best_of(args.repeat, baseline, files, transform)

    diffs = np.array([mean_abs_diff(ours[p], theirs[p]) for p in theirs])
    # Same geometry as the stage (crop, then resize) but a full-size decode: isolates the JPEG draft.
    sample = files[:: max(1, len(files) // 50)]
    draft = np.array([mean_abs_diff(ours[rel(f)], full_decode(f, args.size)) for f in sample])
    n = len(files)
    print(f"{'':10}{'wall s':>8}{'images/s':>10}{'CPU ms/image':>14}")
    print(f"{'stage':10}{stage_s:8.2f}{n / stage_s:10.1f}{stage_cpu / n * 1e3:14.1f}")
    print(f"{'baseline':10}{baseline_s:8.2f}{n / baseline_s:10.1f}{baseline_cpu / n * 1e3:14.1f}")
    print(f"speed-up: {baseline_s / stage_s:.1f}x wall-clock (target >= 4x), "
          f"{baseline_cpu / stage_cpu:.1f}x in CPU time")
    print(f"mean abs pixel diff (0-255), stage vs baseline: {diffs.mean():.2f}, "
          f"worst image {diffs.max():.2f}")
    print(f"  stage vs full decode, same crop/resize ({len(sample)} images): {draft.mean():.2f}, "
          f"worst image {draft.max():.2f}")

    with tempfile.TemporaryDirectory() as tmp:
        half = subset(files, n // 2, Path(tmp))
        for label, data, count in (("N", half, n // 2), ("2N", CACHE, n)):
            main_mb, worker_mb = peak_rss_mb(data, args.size)
            print(f"stage peak RSS, {label:>2} = {count:4d} images: main {main_mb:4.0f} MiB, "
                  f"largest worker {worker_mb:4.0f} MiB")


if __name__ == "__main__":
    main()
