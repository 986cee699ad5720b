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
from pipeline.common.features import Reference, feature_records  # noqa: E402
from pipeline.common.images import preprocess  # noqa: E402
from pipeline.lib.drift import Window, compare  # noqa: E402
from pipeline.lib.loader import load_split  # noqa: E402

PARAMS = {"preprocess": {"size": 32, "val_fraction": 0.25, "test_fraction": 0.35},
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="project folder to train in (default: a temp folder)")
    parser.add_argument("--windows", type=int, default=100, help="in-distribution windows (>= 20)")
    parser.add_argument("--shift-windows", type=int, default=20, help="windows per shift kind")
    parser.add_argument("--window", type=int, default=300)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        export = train_export(args.work or Path(tmp))
        card, reference = ModelCard.read(export), Reference.load(export / "reference.npz")
        session = ort.InferenceSession(str(export / CLASSIFIER_FILE), providers=["CPUExecutionProvider"])
        test, labels = load_split(export.parent / "pre", "test")
        test = np.ascontiguousarray(test)
    rng = np.random.default_rng(0)
    test_records = records_of(session, test, card, reference)
    accuracy = np.mean([r["predicted"] for r in test_records] == labels)
    print(f"LeNet-5 on digits at {test.shape[-1]} px: test accuracy {accuracy:.3f} ({len(test)} test images, "
          f"reference {len(reference.embedding)} validation images, embedding {reference.embedding.shape[1]} dims, "
          f"OOD threshold {reference.ood_threshold:.1f})")

    def window_of(records: list[dict], seed: int) -> Window:
        picks = np.random.default_rng(seed).choice(len(records), args.window, replace=len(records) < args.window)
        return Window.from_records([records[i] for i in picks])

    alarms, fired = 0, {}
    for w in range(args.windows):
        signals = compare(reference, window_of(test_records, w), card.classes, seed=w)
        alarms += any(s.drift for s in signals)
        for s in signals:
            fired[s.name] = fired.get(s.name, 0) + s.drift
    results = {"test_accuracy": float(accuracy), "test_images": len(test), "reference_images": len(reference.embedding),
               "false_alarms": alarms, "windows": args.windows, "signals_fired_in_distribution": fired,
               "detection": {}, "ood_flag": {"test split": float(np.mean([r["ood"] for r in test_records]))}}
    for kind, images in shifted_sets(test, rng).items():
        records = records_of(session, images, card, reference)
        results["ood_flag"][kind] = float(np.mean([r["ood"] for r in records]))
        detected, per_signal = 0, {}
        for w in range(args.shift_windows):
            signals = compare(reference, window_of(records, 1000 + w), card.classes, seed=w)
            detected += any(s.drift for s in signals)
            for s in signals:
                per_signal[s.name] = per_signal.get(s.name, 0) + s.drift
        results["detection"][kind] = {"detected": detected, "windows": args.shift_windows, "signals": per_signal}

    print(f"\nIn-distribution windows of {args.window} from the test split ({len(test)} images; windows overlap):")
    print("| windows | drift alarms | false-alarm rate | target |\n|---|---|---|---|")
    print(f"| {args.windows} | {alarms} | {alarms / args.windows:.1%} | <= 5% |")
    print(f"signals that fired: {fired}")
    print(f"\nShifted windows of {args.window}:")
    print("| shift | windows | detected | detection rate | signals that fired (windows) | OOD flag rate per image |")
    print("|---|---|---|---|---|---|")
    for kind, found in results["detection"].items():
        signals = ", ".join(f"{k} {v}" for k, v in found["signals"].items() if v)
        print(f"| {kind} | {found['windows']} | {found['detected']} | {found['detected'] / found['windows']:.0%} | "
              f"{signals} | {results['ood_flag'][kind]:.1%} |")
    print(f"\nOOD flag on the test split (false flags): {results['ood_flag']['test split']:.1%} of {len(test)} images "
          "(threshold: the validation split's 99th percentile)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
