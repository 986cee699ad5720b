"""How well the drift check and the OOD flag work on a real export: false alarms and detections.

    apt-get install dataset-fashion-mnist          # Debian: the IDX files in /usr/share/datasets/fashion-mnist
    python bench/drift_eval.py --dataset fashion-mnist --out drift_eval.json     # ~20 min on 2 busy CPUs
    python bench/drift_eval.py --dataset digits    # scikit-learn's 1,797 digits: no package, too few windows
    python bench/drift_eval.py --work /tmp/x       # keeps (and on a rerun reuses) the trained project there

It runs the pipeline's own commands (``pipeline.datasets idx`` or ``digits``, ``preprocess``,
``train``, ``evaluate``, ``export``) in a work folder, then feeds windows of images through ``classifier.onnx``
(ONNX Runtime) and :func:`pipeline.common.features.feature_records`, exactly as the service logs
them (through JSON, rounded as logged), and through :func:`pipeline.lib.drift.compare`, exactly as
``python -m pipeline.monitor`` tests them. The reference is what export stores: the validation split.

Fashion-MNIST (the default) keeps its official test split of 10,000 images, so the in-distribution
windows are disjoint: chunks of one permutation of the test split, each test image in at most one
window (33 windows of 300, 100 of 100). The digits have 1,797 images (35 % test), too few for 20
disjoint windows of 300; the table says which rows are disjoint. That is why Fashion-MNIST is the
default, and why, without the package, the bench stops and names it rather than falling back to a
measurement that cannot meet the bar.

Shifted sets, each as large as the test split and cut into windows the same way: the test images
inverted (255 - x), rotated 90°, 30 % of them inverted; uniform noise; capital letters drawn with
Pillow's font at the dataset's resolution and preprocessed like an upload; with Fashion-MNIST also
scikit-learn's digits, preprocessed like uploads (1,797 images: its windows reuse images across
windows, never inside one).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.common.contract import CLASSIFIER_FILE, ModelCard  # noqa: E402
from pipeline.common.cpus import usable_cpus  # noqa: E402
from pipeline.common.features import (  # noqa: E402
    Reference,
    feature_records,
    mahalanobis_scores,
    ood_features,
    pixel_stats,
)
from pipeline.common.images import preprocess  # noqa: E402
from pipeline.lib.drift import Window, compare  # noqa: E402
from pipeline.lib.loader import load_split  # noqa: E402

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_CLASSES = "T-shirt,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot"
# Per dataset: the params that differ from params.yaml. Fashion-MNIST keeps its official 10,000-image
# test split (the IDX import's pre-split layout); val (the reference) is drawn from the 60,000 training images.
PARAMS = {
    "fashion-mnist": {"preprocess": {"image_size": 32, "val_fraction": 0.1},
                      "train": {"epochs": 4, "lr": 0.05, "threads": 0}},
    "digits": {"preprocess": {"image_size": 32, "val_fraction": 0.25, "test_fraction": 0.35},
               "train": {"epochs": 15, "lr": 0.05, "threads": 0}},
}


def run(cwd: Path, *args: str) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", "MLFLOW_DISABLE_TELEMETRY": "true"}
    done = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


def import_dataset(work: Path, dataset: str) -> None:
    """``work/data`` from the pipeline's own ``datasets`` command."""
    if dataset == "digits":
        run(work, "pipeline.datasets", "digits", "--out", "data", "--force")
        return
    files = {name: FASHION_DIR / f"{name}.gz" for name in (
        "train-images-idx3-ubyte", "t10k-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte")}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        sys.exit(f"{missing[0]}: not found; install Fashion-MNIST with `apt-get install dataset-fashion-mnist` "
                 "(Debian), or run with --dataset digits")
    run(work, "pipeline.datasets", "idx", "--out", "data", "--force",
        "--images", str(files["train-images-idx3-ubyte"]), str(files["t10k-images-idx3-ubyte"]),
        "--labels", str(files["train-labels-idx1-ubyte"]), str(files["t10k-labels-idx1-ubyte"]),
        "--classes", FASHION_CLASSES)


def train_export(work: Path, dataset: str) -> Path:
    """The pipeline's stages in ``work``; returns the export folder. A stage whose output is there
    already (a rerun with ``--work``) is not run again."""
    export = work / "export"
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "params.yaml").is_file():
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        for section, values in {**PARAMS[dataset], "mlflow": {"experiment": "drift-eval"}}.items():
            params[section].update(values)
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    os.environ["PYTHONPATH"] = str(ROOT)
    if not (work / "pre" / "manifest.json").is_file():
        import_dataset(work, dataset)
        run(work, "pipeline.preprocess", "--data", "data", "--out", "pre", "--params", "params.yaml")
    if not (work / "train" / "model.pt").is_file():
        run(work, "pipeline.train", "--data", "pre", "--out", "train", "--checkpoint", "ckpt/last.pt", "--metrics",
            "train.json", "--plots", "plots.json", "--params", "params.yaml", "--no-progress")
    if not (work / "eval.json").is_file():
        run(work, "pipeline.evaluate", "--data", "pre", "--model", "train/model.pt", "--run-id", "train/run_id",
            "--metrics", "eval.json", "--plots", "eval-plots", "--figures", "eval-figures", "--params", "params.yaml")
    if not (export / "reference.npz").is_file():
        run(work, "pipeline.export", "--model", "train/model.pt", "--data", "pre", "--run-id", "train/run_id",
            "--eval-metrics", "eval.json", "--out", "export", "--params", "params.yaml")
    return export


def png_upload(img: Image.Image, size: int) -> np.ndarray:
    """An image as the service sees it: PNG bytes through the pipeline's preprocessing."""
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return preprocess(buffer.getvalue(), size, 1)


def letters(count: int, size: int, source_side: int, rng: np.random.Generator) -> np.ndarray:
    """Capital letters, white on black like the dataset, drawn at 32 px, shrunk to the dataset's side and
    preprocessed from PNG bytes as the service would."""
    out = []
    for _ in range(count):
        img = Image.new("L", (32, 32), 0)
        font = ImageFont.load_default(size=int(rng.integers(20, 30)))
        letter = chr(ord("A") + int(rng.integers(26)))
        ImageDraw.Draw(img).text((16 + rng.integers(-3, 4), 16 + rng.integers(-3, 4)), letter, fill=255,
                                 font=font, anchor="mm")
        out.append(png_upload(img.resize((source_side, source_side), Image.Resampling.BOX), size))
    return np.stack(out)


def sklearn_digits(size: int) -> np.ndarray:
    """scikit-learn's 1,797 8×8 digits (white on black, 0–16 scaled to 0–255), preprocessed as uploads."""
    from sklearn.datasets import load_digits

    pixels = np.round(load_digits().images * 255 / 16).astype(np.uint8)
    return np.stack([png_upload(Image.fromarray(image), size) for image in pixels])


def window_rows(count: int, size: int, windows: int, seed: int) -> list[np.ndarray]:
    """``windows`` windows of ``size`` row indices into ``count`` rows, never a row twice in a window.

    Consecutive chunks of one seeded permutation, so the windows are disjoint while
    ``windows * size <= count``; past that a fresh permutation follows (rows recur across windows).
    """
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(count) for _ in range(-(-windows * size // count))])
    return [order[w * size:(w + 1) * size] for w in range(windows)]


def records_of(session, images: np.ndarray, card: ModelCard, reference: Reference) -> list[dict]:
    """Feature records of ``images`` exactly as the service logs them (rounded, JSON types)."""
    records = []
    for i in range(0, len(images), 256):
        batch = np.ascontiguousarray(images[i:i + 256])
        probabilities, embedding = session.run(["probabilities", "embedding"], {"image": batch})
        records += feature_records(probabilities, embedding, batch, card.classes, reference)
    # through JSON like the log: what the monitor reads back
    return json.loads(json.dumps(records))


def window_verdicts(reference: Reference, records: list[dict], classes: list[str],
                    rows: list[np.ndarray]) -> dict:
    """:func:`compare` on each window: how many drifted (any signal), how often each signal fired, and
    how often each signal's p-value was below 0.05 uncorrected (the calibration check)."""
    drifted, fired, below = 0, {}, {}
    for w, picks in enumerate(rows):
        signals = compare(reference, Window.from_records([records[i] for i in picks]), classes, seed=w)
        drifted += any(s.drift for s in signals)
        for s in signals:
            fired[s.name] = fired.get(s.name, 0) + int(s.drift)
            below[s.name] = below.get(s.name, 0) + int(s.p_value < 0.05)
    return {"windows": len(rows), "drift": drifted, "signals": fired, "p_below_0.05": below}


def score_comparison(session, export: Path, sets: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per-image flag rates of the chosen OOD score against the embedding alone and two logit-only
    scores, each thresholded at the validation split's 99th percentile."""
    from pipeline.lib.reference import MAX_ROWS, fit_ood

    def outputs(images):
        parts = [session.run(["logits", "embedding"], {"image": np.ascontiguousarray(images[i:i + 1024])})
                 for i in range(0, len(images), 1024)]
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), *pixel_stats(images))

    train, labels = load_split(export.parent / "pre", "train")
    rows = np.sort(np.random.default_rng(0).choice(len(train), min(len(train), MAX_ROWS), replace=False))
    logits, embedding, means, stds = outputs(train[rows])
    with_stats = fit_ood(ood_features(embedding, means, stds), labels[rows])
    alone = fit_ood(embedding, labels[rows])

    def energy(logits, *_):
        top = logits.max(1)
        return -(top + np.log(np.exp(logits - top[:, None]).sum(1)))

    def max_softmax(logits, *_):
        shifted = np.exp(logits - logits.max(1, keepdims=True))
        return -(shifted / shifted.sum(1, keepdims=True)).max(1)

    scorers = {
        "Mahalanobis, embedding + input mean/std (the flag, refitted)":
            lambda _, emb, mean, std: mahalanobis_scores(ood_features(emb, mean, std), *with_stats),
        "Mahalanobis, embedding alone": lambda _, emb, *__: mahalanobis_scores(emb, *alone),
        "energy (logits)": energy, "max softmax": max_softmax}
    val = outputs(load_split(export.parent / "pre", "val")[0])
    table = {}
    for name, score in scorers.items():
        threshold = np.percentile(score(*val), 99)
        table[name] = {kind: float(np.mean(score(*outputs(images)) > threshold)) for kind, images in sets.items()}
    return table


SIGNALS = ["predicted_class", "confidence", "mean_intensity", "std_intensity", "ood_score", "embedding"]
IN_DISTRIBUTION = "test split (in-distribution)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["fashion-mnist", "digits"], default="fashion-mnist",
                        help="fashion-mnist (Debian's dataset-fashion-mnist; the default) or scikit-learn's digits")
    parser.add_argument("--work", type=Path, help="project folder to train in (default: a temp folder)")
    parser.add_argument("--windows", type=int, default=0,
                        help="windows per set and size (default 0: as many disjoint ones as the test split holds)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 100], help="window sizes")
    parser.add_argument("--out", type=Path, help="write the figures here too (JSON)")
    args = parser.parse_args()
    if args.dataset == "fashion-mnist" and not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        parser.error(f"{FASHION_DIR}: no Fashion-MNIST; `apt-get install dataset-fashion-mnist` (Debian) installs "
                     "it, or run with --dataset digits")
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        export = train_export(args.work or Path(tmp), args.dataset)
        trained = time.monotonic()
        return evaluate(export, args, {"stages_s": round(trained - started), "started": started})


def shifted_sets(test: np.ndarray, dataset: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Each shift kind as many images as the test split: derived from the test images, or generated."""
    channels, size = test.shape[1], test.shape[2]
    mixed = test.copy()
    part = rng.random(len(test)) < 0.3
    mixed[part] = 255 - test[part]
    sets = {
        "inverted": 255 - test,
        "rotated 90°": np.ascontiguousarray(np.rot90(test, 1, axes=(2, 3))),
        "30% inverted": mixed,
        "noise": rng.integers(0, 256, (len(test), channels, size, size), dtype=np.uint8),
        "letters": letters(len(test), size, 28 if dataset == "fashion-mnist" else 8, rng),
    }
    if dataset == "fashion-mnist":
        sets["digits (scikit-learn)"] = sklearn_digits(size)
    return sets


def evaluate(export: Path, args: argparse.Namespace, timing: dict) -> int:
    """Everything after training: the tables, printed (and written to ``args.out``)."""
    import onnxruntime as ort

    card, reference = ModelCard.read(export), Reference.load(export / "reference.npz")
    session = ort.InferenceSession(str(export / CLASSIFIER_FILE), providers=["CPUExecutionProvider"])
    test, labels = load_split(export.parent / "pre", "test")
    test = np.ascontiguousarray(test)
    sets = {IN_DISTRIBUTION: test, **shifted_sets(test, args.dataset, np.random.default_rng(0))}
    records = {kind: records_of(session, images, card, reference) for kind, images in sets.items()}
    accuracy = float(np.mean(np.array([r["predicted"] for r in records[IN_DISTRIBUTION]]) == labels))
    results = {
        "dataset": args.dataset, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{usable_cpus()} CPUs ({platform.processor() or platform.machine()}), no GPU",
        "test_accuracy": accuracy, "test_images": len(test), "reference_images": len(reference.embedding),
        "embedding_dims": int(reference.embedding.shape[1]), "ood_threshold": reference.ood_threshold,
        "ood_flag": {kind: float(np.mean([r["ood"] for r in found])) for kind, found in records.items()},
        "windows": {}}
    for size in args.sizes:
        count = args.windows or len(test) // size
        results["windows"][size] = {}
        for kind, found in records.items():
            verdicts = window_verdicts(reference, found, card.classes, window_rows(len(found), size, count, seed=size))
            verdicts["disjoint"] = count * size <= len(found)
            results["windows"][size][kind] = verdicts
    results["score_comparison"] = score_comparison(session, export, sets)
    results["seconds"] = {"stages": timing["stages_s"], "total": round(time.monotonic() - timing["started"])}
    print_tables(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def print_tables(results: dict) -> None:
    print(f"LeNet-5 on {results['dataset']} at 32 px, {results['date']}, {results['machine']}: test accuracy "
          f"{results['test_accuracy']:.3f} ({results['test_images']} test images), reference "
          f"{results['reference_images']} validation images, embedding {results['embedding_dims']} dims, OOD threshold "
          f"{results['ood_threshold']:.1f}; pipeline stages (import to export) {results['seconds']['stages']} s, "
          f"{results['seconds']['total']} s in all")
    for size, by_kind in results["windows"].items():
        print(f"\nWindows of {size} (drift = any signal at 0.05/6; targets: <= 5 % on the test split, >= 95 % on "
              "each shift; each signal: share of windows it fired in; OOD flag: share of images):")
        print("| set | windows | disjoint | drift | " + " | ".join(SIGNALS) + " | OOD flag |")
        print("|---|---|---|---|" + "---|" * len(SIGNALS) + "---|")
        for kind, found in by_kind.items():
            n = found["windows"]
            cells = [f"{found['signals'][name] / n:.0%}" for name in SIGNALS]
            print(f"| {kind} | {n} | {'yes' if found['disjoint'] else 'no'} | {found['drift']}/{n} = "
                  f"{found['drift'] / n:.1%} | " + " | ".join(cells) + f" | {results['ood_flag'][kind]:.1%} |")
    print("\nCalibration on the test split: share of windows whose p-value is below 0.05, uncorrected (each test's "
          "null distribution is right if it is near 5 %):")
    print("| window size | windows | " + " | ".join(SIGNALS) + " |\n|---|---|" + "---|" * len(SIGNALS))
    for size, by_kind in results["windows"].items():
        found = by_kind[IN_DISTRIBUTION]
        print(f"| {size} | {found['windows']} | "
              + " | ".join(f"{found['p_below_0.05'][name] / found['windows']:.0%}" for name in SIGNALS) + " |")
    kinds = list(results["ood_flag"])
    print("\nOOD flag per image (threshold: the validation split's 99th percentile; on the test split = false flags):")
    print("| score | " + " | ".join(kinds) + " |\n|---|" + "---|" * len(kinds))
    print("| Mahalanobis, as logged (the flag) | " + " | ".join(f"{results['ood_flag'][k]:.1%}" for k in kinds) + " |")
    for name, rates in results["score_comparison"].items():
        print(f"| {name} | " + " | ".join(f"{rates[k]:.1%}" for k in kinds) + " |")


if __name__ == "__main__":
    sys.exit(main())
