"""The typed contract, crash-safe outputs and how commands fail."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError as SqlAlchemyOperationalError

from pipeline.common import files
from pipeline.common.contract import ContractError, Manifest, ModelCard, Provenance
from pipeline.common.metrics import (
    BestEpoch,
    ClassScores,
    CurvePoint,
    EpochRecord,
    EpochStats,
    EvalMetrics,
    Prediction,
    SplitScores,
    TrainMetrics,
    write_rows,
)
from pipeline.lib import tracking
from pipeline.lib.config import ParamsError, load_params

ROOT = Path(__file__).resolve().parent.parent
CARD = ModelCard(architecture="lenet5", classes=["b", "a", "c d"], image_size=32, channels=1, mean=[0.5], std=[0.25],
                 git_commit="abc", data_md5="123", mlflow_run_id="r" * 32, metrics={"top1": 0.9, "top5": 1.0},
                 registered_model="cnn-classifier", version="3", files={"classifier.onnx": "00"})


def test_model_card_round_trips_through_onnx_props_and_json(tmp_path: Path):
    props = CARD.onnx_props()
    assert all(isinstance(v, str) for v in props.values())
    assert "files" not in props and "version" not in props  # a file cannot carry its own hash
    assert ModelCard.from_onnx_props(props) == CARD.model_copy(update={"files": {}, "version": ""})
    (tmp_path / "model_card.json").write_text(CARD.to_json())
    assert ModelCard.read(tmp_path) == CARD
    assert CARD.store_labels("champion")["alias"] == "champion"
    assert CARD.version_tags()["test_top1"] == "0.9"


def test_contract_errors_name_the_file_and_field(tmp_path: Path):
    with pytest.raises(ContractError, match=r"model_card.json: not found; run the export stage"):
        ModelCard.read(tmp_path)
    (tmp_path / "model_card.json").write_text('{"architecture": "lenet5"}')
    with pytest.raises(ContractError, match=r"model_card.json: classes: Field required"):
        ModelCard.read(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ContractError, match=r"manifest.json: not valid JSON"):
        Manifest.read(tmp_path)
    bad = CARD.onnx_props() | {"channels": "2"}
    with pytest.raises(ContractError, match=r"ONNX metadata: channels: Input should be 1 or 3"):
        ModelCard.from_onnx_props(bad)


def test_replace_dir_keeps_the_old_folder_when_the_block_fails(tmp_path: Path):
    out = tmp_path / "out"
    with files.replace_dir(out) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError), files.replace_dir(out) as tmp:
        (tmp / "a").write_text("new")
        raise RuntimeError("crash")
    assert (out / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("crash_after", ["aside", "new_in"])
def test_replace_dir_recovers_from_a_crash_between_renames(tmp_path: Path, crash_after: str):
    """A real kill at each point between the three renames: the next run finds one intact folder."""
    script = f"""
import os, sys
from pathlib import Path
from pipeline.common import files
out = Path(sys.argv[1])
real_rename = Path.rename
crash_target = {{"aside": out.with_name(".out.old"), "new_in": out}}[{crash_after!r}]
def rename(self, target):
    result = real_rename(self, target)
    if Path(target) == crash_target:
        os._exit(9)  # killed right after this rename
    return result
Path.rename = rename
with files.replace_dir(out) as tmp:
    (tmp / "a").write_text("new")
"""
    out = tmp_path / "out"
    with files.replace_dir(out) as tmp:
        (tmp / "a").write_text("old")
    done = subprocess.run([sys.executable, "-c", script, str(out)], cwd=ROOT, capture_output=True, timeout=60)
    assert done.returncode == 9, done.stderr
    if crash_after == "aside":
        assert not out.exists() and (tmp_path / ".out.old").exists()  # the moment of danger, for real
    files.recover_dir(out)
    expected = "old" if crash_after == "aside" else "new"
    assert (out / "a").read_text() == expected
    assert not (tmp_path / ".out.old").exists()


def test_write_json_is_atomic_and_leaves_no_temp_file(tmp_path: Path):
    files.write_json(tmp_path / "m.json", {"a": 1})
    files.write_json(tmp_path / "m.json", {"a": 2})
    assert (tmp_path / "m.json").read_text() == '{\n  "a": 2\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
    assert oct((tmp_path / "m.json").stat().st_mode & 0o777) == "0o644"


@pytest.mark.parametrize(("yaml_text", "message"), [
    ("train:\n  lr: true\n", "train.lr: Input should be a valid number (got True)"),
    ("train:\n  learning_rate: 1\n", "train.learning_rate: unknown key"),
    ("preprocess:\n  image_size: 4\n", "preprocess.image_size: Input should be greater than or equal to 8"),
    ("train:\n  device: tpu\n", "train.device: 'tpu' is not one of"),
    ("train: [1, 2]\n", "train: Input should be a valid dictionary"),
    ("train:\n  lr: [\n", "not valid YAML"),
])
def test_bad_params_are_one_line_naming_the_field(tmp_path: Path, yaml_text: str, message: str):
    path = tmp_path / "params.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    assert message in str(caught.value) and str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("stage", ["preprocess", "train", "evaluate", "export"])
def test_a_stage_with_bad_params_exits_1_with_one_line(tmp_path: Path, stage: str):
    (tmp_path / "params.yaml").write_text("train:\n  epochs: zero\n")
    done = subprocess.run([sys.executable, "-m", f"pipeline.{stage}", "--params", str(tmp_path / "params.yaml")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'params.yaml'}: train.epochs: Input should be a valid integer (got 'zero')"]


def test_an_unexpected_error_keeps_its_traceback(tmp_path: Path):
    """A bug is not a user error: the command fails with the traceback, not one polite line."""
    script = ("import sys; from pipeline.common import errors\n"
              "def body(): raise ZeroDivisionError('deep inside')\n"
              "sys.exit(errors.run_command(body))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "ZeroDivisionError: deep inside" in done.stderr


def test_sqlite_busy_is_recognised_through_mlflow_wrapping():
    busy = sqlite3.OperationalError("database is locked")
    busy.sqlite_errorcode = 5
    wrapped = SqlAlchemyOperationalError("INSERT ...", {}, busy)
    try:
        try:
            raise wrapped
        except SqlAlchemyOperationalError as err:
            raise RuntimeError("MLflow failed") from err
    except RuntimeError as outer:
        assert tracking._sqlite_busy(outer)
    other = sqlite3.OperationalError("no such table: runs")
    other.sqlite_errorcode = 1
    assert not tracking._sqlite_busy(SqlAlchemyOperationalError("SELECT", {}, other))
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise wrapped
        return "done"

    assert tracking.with_retry(flaky) == "done" and len(calls) == 3
    with pytest.raises(SqlAlchemyOperationalError):
        tracking.with_retry(lambda: (_ for _ in ()).throw(SqlAlchemyOperationalError("SELECT", {}, other)))


def test_tracking_setup_does_not_swallow_store_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Only "already exists" (a parallel run won the race) is tolerated; any other store error
    surfaces as itself, not as a later NoneType error."""
    import mlflow
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    def refuse(*args, **kwargs):
        raise MlflowException("permission denied on the artifact root", error_code="PERMISSION_DENIED")

    monkeypatch.setattr(mlflow, "create_experiment", refuse)
    with pytest.raises(MlflowException, match="permission denied on the artifact root"):
        tracking.setup("exp")


# ----------------------------------------------------------------------------- metrics and plots files
@pytest.mark.parametrize(("path", "read"), [
    ("metrics/train.json", TrainMetrics.read),
    ("metrics/eval.json", EvalMetrics.read),
])
def test_committed_metrics_files_round_trip_byte_for_byte(tmp_path: Path, path: str, read):
    """The typed writers keep the format DVC and git already hold: reading a committed file and
    writing it back changes no byte (so `make run` does not rewrite tracked files)."""
    metrics = read(ROOT / path)
    metrics.write(tmp_path / "out.json")
    assert (tmp_path / "out.json").read_text() == (ROOT / path).read_text()


@pytest.mark.parametrize(("path", "row"), [
    ("plots/train.json", CurvePoint),
    ("plots/eval/per_class.json", ClassScores),
    ("plots/eval/confusion.json", Prediction),
])
def test_committed_plots_files_round_trip_byte_for_byte(tmp_path: Path, path: str, row):
    rows = [row.model_validate(item) for item in json.loads((ROOT / path).read_text())]
    write_rows(tmp_path / "out.json", rows)
    assert (tmp_path / "out.json").read_text() == (ROOT / path).read_text()


def test_an_epoch_record_feeds_mlflow_the_curves_and_the_best_epoch():
    stats = EpochStats(train_loss=0.123456, train_accuracy=0.5, images_per_s=900.0, data_wait=0.01, epoch_seconds=2.0)
    row = EpochRecord.of(3, stats, SplitScores(loss=0.25, top1=0.87654, top5=1.0), lr=0.000123456, cpu_threads=2)
    assert row.mlflow_metrics()["cpu_threads"] == 2.0 and "epoch" not in row.mlflow_metrics()
    point = row.curve_point()
    assert (point.epoch, point.train_loss, point.val_top1, point.lr) == (3, 0.1235, 0.8765, 0.0001235)
    on_cuda = EpochRecord.of(3, stats, SplitScores(loss=0, top1=0, top5=0), 0.1, cpu_threads=None)
    assert "cpu_threads" not in on_cuda.mlflow_metrics()
    metrics = TrainMetrics.of([row], BestEpoch.of(row))
    assert (metrics.best.epoch, metrics.best.val_top1, metrics.epochs) == (3, 0.8765, 1)


def test_eval_metrics_errors_name_the_file_and_field(tmp_path: Path):
    with pytest.raises(ContractError, match=r"eval.json: not found; run the evaluate stage first"):
        EvalMetrics.read(tmp_path / "eval.json")
    (tmp_path / "eval.json").write_text('{"top1": 0.5, "top5": 1.0, "top5_k": 5, "loss": 0.1}')
    with pytest.raises(ContractError, match=r"eval.json: samples: Field required"):
        EvalMetrics.read(tmp_path / "eval.json")


@pytest.mark.parametrize("content", [None, "{}\n"])
def test_export_refuses_to_register_without_test_metrics(tmp_path: Path, content: str | None):
    """No metrics/eval.json (or one without the test metrics): exit 1 with one line naming the
    file, before anything is exported or registered."""
    eval_json = tmp_path / "metrics" / "eval.json"
    if content is not None:
        eval_json.parent.mkdir()
        eval_json.write_text(content)
    (tmp_path / "params.yaml").write_text("{}\n")
    done = subprocess.run([sys.executable, "-m", "pipeline.export", "--eval-metrics", str(eval_json),
                           "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "export"),
                           "--model", str(tmp_path / "model.pt")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"error: {eval_json}: ") and "no version is registered without test metrics" in line
    assert not (tmp_path / "export").exists() and not (tmp_path / "mlflow.db").exists()


def test_provenance_tags_round_trip():
    outside = Provenance(git_commit="abc", git_dirty=True, data_md5="123")
    assert outside.tags() == {"git_commit": "abc", "git_dirty": "true", "data_md5": "123"}
    in_experiment = outside.model_copy(update={"dvc_exp_name": "lr-sweep", "dvc_exp_baseline_rev": "def"})
    assert Provenance.from_tags({**in_experiment.tags(), "model": "lenet5"}) == in_experiment
    assert Provenance.from_tags(outside.tags()) == outside
