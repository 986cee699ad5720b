"""How well the drift check and the OOD flag work on a real export: false alarms and detections.

    python bench/drift_eval.py                 # trains LeNet-5 on the digits in a temp folder (~2 min)
    python bench/drift_eval.py --work /tmp/x   # keeps (and on a rerun reuses) the trained project there

It runs the pipeline's own commands (``pipeline.datasets digits``, ``preprocess``, ``train``,
``export``) in a work folder, then feeds windows of images through ``classifier.onnx`` (ONNX
Runtime) and :func:`pipeline.common.features.feature_records`, exactly as the service logs them,
and through :func:`pipeline.lib.drift.compare`, exactly as ``python -m pipeline.monitor`` tests
them. The digits have 1,797 images, so the split is 40 % train / 25 % val (the reference) /
35 % test, and the in-distribution windows are drawn from the test split (~630 images) without
replacement inside a window: windows of 300 overlap each other, which the table says.

Shifted sets (from the test images unless said): inverted (255 - x), rotated 90°, noise
(uniform random pixels), letters (A–Z drawn with Pillow's font at the digits' 8×8 resolution,
then preprocessed like any upload).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.common.contract import CLASSIFIER_FILE, ModelCard  # noqa: E402
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

PARAMS = {"preprocess": {"image_size": 32, "val_fraction": 0.25, "test_fraction": 0.35},
          "train": {"epochs": 15, "lr": 0.05, "threads": 0}, "mlflow": {"experiment": "drift-eval"}}


def run(cwd: Path, *args: str) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", "MLFLOW_DISABLE_TELEMETRY": "true"}
    done = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


def train_export(work: Path) -> Path:
    """The pipeline's stages in ``work``; returns the export folder (reused when present)."""
    export = work / "export"
    if (export / "reference.npz").is_file():
        return export
    work.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in PARAMS.items():
        params[section].update(values)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    os.environ["PYTHONPATH"] = str(ROOT)
    run(work, "pipeline.datasets", "digits", "--out", "data", "--force")
    run(work, "pipeline.preprocess", "--data", "data", "--out", "pre", "--params", "params.yaml")
    run(work, "pipeline.train", "--data", "pre", "--out", "train", "--checkpoint", "ckpt/last.pt", "--metrics",
        "train.json", "--plots", "plots.json", "--params", "params.yaml", "--no-progress")
    run(work, "pipeline.export", "--model", "train/model.pt", "--data", "pre", "--run-id", "train/run_id",
        "--eval-metrics", "none.json", "--out", "export", "--params", "params.yaml")
    return export


def letters(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Capital letters, white on black like the digits, drawn at 32 px, shrunk to the digits' 8×8 and
    preprocessed from PNG bytes as the service would."""
    out = []
    for _ in range(count):
        img = Image.new("L", (32, 32), 0)
        font = ImageFont.load_default(size=int(rng.integers(20, 30)))
        letter = chr(ord("A") + int(rng.integers(26)))
        ImageDraw.Draw(img).text((16 + rng.integers(-3, 4), 16 + rng.integers(-3, 4)), letter, fill=255,
                                 font=font, anchor="mm")
        buffer = io.BytesIO()
        img.resize((8, 8), Image.Resampling.BOX).save(buffer, "PNG")
        out.append(preprocess(buffer.getvalue(), size, 1))
    return np.stack(out)


def shifted_sets(test: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    channels, size = test.shape[1], test.shape[2]
    return {
        "inverted": 255 - test,
        "rotated 90°": np.ascontiguousarray(np.rot90(test, 1, axes=(2, 3))),
        "noise": rng.integers(0, 256, (len(test), channels, size, size), dtype=np.uint8),
        "letters": letters(len(test), size, rng),
    }


def records_of(session, images: np.ndarray, card: ModelCard, reference: Reference) -> list[dict]:
    probabilities, embedding = session.run(["probabilities", "embedding"], {"image": np.ascontiguousarray(images)})
    return feature_records(probabilities, embedding, images, card.classes, reference)


def alarm_count(reference: Reference, records: list[dict], classes: list[str], windows: int, size: int,
                seed: int) -> tuple[int, dict[str, int]]:
    """Windows (of ``size`` records drawn without replacement from ``records``) in which the check finds
    drift, and how often each signal fired."""
    alarms, fired = 0, {}
    for w in range(windows):
        picks = np.random.default_rng(seed + w).choice(len(records), size, replace=len(records) < size)
        signals = compare(reference, Window.from_records([records[i] for i in picks]), classes, seed=w)
        alarms += any(s.drift for s in signals)
        for s in signals:
            fired[s.name] = fired.get(s.name, 0) + int(s.drift)
    return alarms, fired


def score_comparison(session, export: Path, sets: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per-image flag rates of the chosen OOD score against the embedding alone and two logit-only
    scores, each thresholded at the validation split's 99th percentile."""
    from pipeline.lib.reference import fit_ood

    def outputs(images):
        images = np.ascontiguousarray(images)
        return (*session.run(["logits", "embedding"], {"image": images}), *pixel_stats(images))

    train, labels = load_split(export.parent / "pre", "train")
    logits, embedding, means, stds = outputs(train)
    with_stats = fit_ood(ood_features(embedding, means, stds), labels)
    alone = fit_ood(embedding, labels)

    def energy(logits, *_):
        top = logits.max(1)
        return -(top + np.log(np.exp(logits - top[:, None]).sum(1)))

    def max_softmax(logits, *_):
        shifted = np.exp(logits - logits.max(1, keepdims=True))
        return -(shifted / shifted.sum(1, keepdims=True)).max(1)

    scorers = {
        "Mahalanobis, embedding + input mean/std (the flag)":
            lambda _, emb, mean, std: mahalanobis_scores(ood_features(emb, mean, std), *with_stats),
        "Mahalanobis, embedding alone": lambda _, emb, *__: mahalanobis_scores(emb, *alone),
        "energy (logits)": energy, "max softmax": max_softmax}
    val = outputs(load_split(export.parent / "pre", "val")[0])
    table = {}
    for name, score in scorers.items():
        threshold = np.percentile(score(*val), 99)
        table[name] = {kind: float(np.mean(score(*outputs(images)) > threshold)) for kind, images in sets.items()}
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="project folder to train in (default: a temp folder)")
    parser.add_argument("--windows", type=int, default=100, help="in-distribution windows per size (>= 20)")
    parser.add_argument("--shift-windows", type=int, default=20, help="windows per shift kind and size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 100], help="window sizes")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        return evaluate(train_export(args.work or Path(tmp)), args)


def evaluate(export: Path, args: argparse.Namespace) -> int:
    """Everything after training: the tables, printed (and written to ``args.json``)."""
    import onnxruntime as ort

    card, reference = ModelCard.read(export), Reference.load(export / "reference.npz")
    session = ort.InferenceSession(str(export / CLASSIFIER_FILE), providers=["CPUExecutionProvider"])
    test, labels = load_split(export.parent / "pre", "test")
    test = np.ascontiguousarray(test)
    rng = np.random.default_rng(0)
    sets = shifted_sets(test, rng)
    mixed = test.copy()
    part = rng.random(len(test)) < 0.3
    mixed[part] = 255 - test[part]
    sets["30% inverted"] = mixed
    comparison = score_comparison(session, export, {"test split": test, **sets})
    test_records = records_of(session, test, card, reference)
    accuracy = np.mean(np.array([r["predicted"] for r in test_records]) == labels)
    print(f"LeNet-5 on digits at {test.shape[-1]} px: test accuracy {accuracy:.3f} ({len(test)} test images, "
          f"reference {len(reference.embedding)} validation images, embedding {reference.embedding.shape[1]} dims, "
          f"OOD threshold {reference.ood_threshold:.1f})")
    results = {"test_accuracy": float(accuracy), "test_images": len(test), "reference_images": len(reference.embedding),
               "in_distribution": {}, "detection": {}, "ood_flag": {"test split": float(np.mean(
                   [r["ood"] for r in test_records]))}, "score_comparison": comparison}
    for size in args.sizes:
        alarms, fired = alarm_count(reference, test_records, card.classes, args.windows, size, seed=0)
        results["in_distribution"][size] = {"windows": args.windows, "alarms": alarms, "signals": fired}
    for kind, images in sets.items():
        records = records_of(session, images, card, reference)
        results["ood_flag"][kind] = float(np.mean([r["ood"] for r in records]))
        for size in args.sizes:
            detected, fired = alarm_count(reference, records, card.classes, args.shift_windows, size, seed=1000)
            results["detection"].setdefault(kind, {})[size] = {"windows": args.shift_windows, "detected": detected,
                                                               "signals": fired}

    print(f"\nIn-distribution windows from the test split ({len(test)} images, drawn without replacement inside a "
          "window; windows overlap):")
    print("| window size | windows | drift alarms | false-alarm rate | signals that fired |\n|---|---|---|---|---|")
    for size, found in results["in_distribution"].items():
        signals = ", ".join(f"{k} {v}" for k, v in found["signals"].items() if v) or "none"
        print(f"| {size} | {found['windows']} | {found['alarms']} | {found['alarms'] / found['windows']:.1%} | "
              f"{signals} |")
    print("\nShifted windows (target: detection >= 95 %):")
    print("| shift | window size | windows | detected | detection rate | signals that fired (windows) |")
    print("|---|---|---|---|---|---|")
    for kind, by_size in results["detection"].items():
        for size, found in by_size.items():
            signals = ", ".join(f"{k} {v}" for k, v in found["signals"].items() if v) or "none"
            print(f"| {kind} | {size} | {found['windows']} | {found['detected']} | "
                  f"{found['detected'] / found['windows']:.0%} | {signals} |")
    kinds = ["test split", *sets]
    print("\nOOD flag per image (threshold: the validation split's 99th percentile; on the test split = false flags):")
    print("| score | " + " | ".join(kinds) + " |\n|---|" + "---|" * len(kinds))
    print("| Mahalanobis, as logged | " + " | ".join(f"{results['ood_flag'][k]:.1%}" for k in kinds) + " |")
    for name, rates in comparison.items():
        print(f"| {name} | " + " | ".join(f"{rates[k]:.1%}" if k in rates else "" for k in kinds) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
