"""DVC experiments ↔ MLflow runs, end to end: real ``dvc`` CLI in a temp git repo, real SQLite store.

Queued experiments in parallel on the default store are run by the README's own commands
(``tests/test_docs.py::test_marked_blocks_run_in_a_fresh_clone``), on a tracking server by
``tests/test_team.py``.

Each test copies the project's tracked files into a fresh git repository with a tiny dataset
(3 classes × 30 PNGs, 32 px) and tiny params, then drives ``dvc exp run`` as a user would.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest

from pipeline import compare
from pipeline.common.contract import ModelCard
from pipeline.lib import tracking
from tests.conftest import copy_project, sh, tool_env, write_pattern_folder

TINY = {
    "preprocess": {"image_size": 32, "val_fraction": 0.2, "test_fraction": 0.3, "workers": 1},
    "train": {"model": "lenet5", "epochs": 2, "batch_size": 16, "warmup_epochs": 0.0, "threads": 1,
              "device": "cpu"},
    "evaluate": {"saliency_per_class": 1},
}
pytestmark = pytest.mark.slow


def _env(**extra: str) -> dict[str, str]:
    """:func:`tool_env` without any inherited MLflow or DVC setting, plus ``extra``."""
    env = {k: v for k, v in tool_env().items() if not k.startswith(("MLFLOW_", "DVC_"))}
    return {**env, "DVC_NO_ANALYTICS": "1", **extra}


def make_project(dest: Path, env: dict[str, str]) -> Path:
    """A committed copy of the project, tiny params, 3 classes × 30 patterned 32 px PNGs in DVC."""
    copy_project(dest, TINY)
    write_pattern_folder(dest / "data", per_class=30, file_name="{i:02d}.png")
    sh(dest, "dvc", "add", "-q", "data", env=env)
    sh(dest, "git", "add", "-A", env=env)
    sh(dest, "git", "commit", "-q", "-m", "tiny data", env=env)
    return dest


def _head(repo: Path, env: dict[str, str]) -> str:
    return sh(repo, "git", "rev-parse", "HEAD", env=env).strip()


def _exp_names(repo: Path, env: dict[str, str]) -> list[str]:
    out = subprocess.run(["dvc", "exp", "ls", "--name-only"], cwd=repo, env=env, capture_output=True,
                         text=True, check=True).stdout
    return sorted(line.strip() for line in out.splitlines() if line.strip())


def _runs(uri: str) -> list:
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("cnn-mlops")
    return list(client.search_runs([experiment.experiment_id], max_results=100)) if experiment else []


def _check_one_run_per_experiment(uri: str, names: list[str], baseline: str) -> dict[str, object]:
    """Each DVC experiment is exactly one FINISHED run named after it, tagged with name and baseline."""
    runs = _runs(uri)
    assert len(runs) == len(names), [(r.info.run_name, r.info.status) for r in runs]
    by_name = {}
    for name in names:
        mine = [r for r in runs if r.data.tags.get("dvc_exp_name") == name]
        assert len(mine) == 1, f"{name}: {len(mine)} MLflow runs"
        run = mine[0]
        assert run.info.run_name == name
        assert run.info.status == "FINISHED"
        assert run.data.tags["dvc_exp_baseline_rev"] == baseline
        assert {"test_top1", "test_top5", "train_seconds", "images_per_s"} <= set(run.data.metrics)
        by_name[name] = run
    return by_name


def test_sequential_experiments_compare_promote(tmp_path, monkeypatch, capsys):
    """Two ``dvc exp run -S`` in the workspace, an explicit MLFLOW_TRACKING_URI; compare, promote, export."""
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    env = _env(MLFLOW_TRACKING_URI=uri)
    repo = make_project(tmp_path / "repo", env)
    baseline = _head(repo, env)
    for key in [k for k in os.environ if k.startswith("DVC_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    args = ["--params", str(repo / "params.yaml")]
    assert tracking.main(["init", *args]) == 0  # the store exists before any stage runs

    sh(repo, "dvc", "exp", "run", "-n", "fast", "-S", "train.lr=0.1", env=env)
    sh(repo, "dvc", "exp", "run", "-n", "slow", "-S", "train.lr=0.001", env=env)
    assert _exp_names(repo, env) == ["fast", "slow"]
    runs = _check_one_run_per_experiment(uri, ["fast", "slow"], baseline)
    assert not (repo / "mlflow.db").exists()  # MLFLOW_TRACKING_URI wins over the default
    fast, slow = (runs[n].data.metrics["test_top1"] for n in ("fast", "slow"))
    assert fast > slow, f"lr 0.1 should beat lr 0.001 on the tiny set: {fast} vs {slow}"

    capsys.readouterr()
    assert compare.main([*args, "--plot", str(tmp_path / "curves.png")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "train.lr" in table[0].split() and "test top-1" in table[0]
    assert "train.epochs" not in table[0]  # only params that differ
    assert table[2].split()[:3] == ["fast", "lenet5", "0.1"]  # best test top-1 first
    assert table[3].split()[:3] == ["slow", "lenet5", "0.001"]
    assert f"{fast:.4f}" in table[2] and f"{slow:.4f}" in table[3]
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert compare.main([*args, "--md", "--sort", "test_top1", "--asc", "--last", "1"]) == 0
    markdown = capsys.readouterr().out.splitlines()
    assert markdown[0].startswith("| run |") and markdown[1].startswith("|---|") and len(markdown) == 3
    assert compare.main([*args, "--runs", "nope"]) == 1
    assert "'nope'" in capsys.readouterr().err

    # `make serve` before any promotion: the latest export, and it says so.
    source = ["serve-source", "--champion-out", str(tmp_path / "served"), "--export", str(repo / "artifacts/export")]
    assert compare.main([*source, *args]) == 0
    chosen = capsys.readouterr()
    assert chosen.out.strip() == str(repo / "artifacts/export") and "no 'champion'" in chosen.err

    assert compare.main(["promote", "--run", "fast", *args]) == 0
    assert "now 'champion'" in capsys.readouterr().out
    assert compare.main([*source, *args]) == 0  # ... and after it, the champion from the registry
    chosen = capsys.readouterr()
    assert chosen.out.strip() == str(tmp_path / "served") and "serving the champion" in chosen.err
    assert ModelCard.read(tmp_path / "served").mlflow_run_id == runs["fast"].info.run_id
    assert compare.promote_main(["--run", "slow", *args]) == 1
    refused = capsys.readouterr().err
    assert "refusing" in refused and f"{fast:.4f}" in refused and f"{slow:.4f}" in refused
    assert compare.main(["promote", "--run", "slow", "--force", *args]) == 0
    assert "(forced)" in capsys.readouterr().out
    client = compare.open_client()
    champion = client.get_model_version_by_alias("cnn-classifier", "champion")
    assert champion.run_id == runs["slow"].info.run_id

    out = tmp_path / "champion"
    assert compare.main(["export-champion", "--out", str(out), *args]) == 0
    card = ModelCard.read(out)
    assert card.mlflow_run_id == runs["slow"].info.run_id and card.version == str(champion.version)
    card.verify_files(out)  # the registered pair, byte for byte, as the export stage hashed it
    assert sorted(p.name for p in out.iterdir()) == ["classifier.onnx", "examples.npz", "model_card.json",
                                                     "reference.npz", "saliency.onnx"]
    with np.load(out / "examples.npz") as examples:  # the UI's examples: test images of the run's own data
        assert examples["images"].shape[1:] == (card.channels, card.image_size, card.image_size)
        labels = list(examples["labels"])  # one per class present in the test split, in class order
        assert labels and labels == sorted(set(labels)) and max(labels) < len(card.classes)

    # `promote --best`: the run the table lists first (fast) takes the champion back from slow
    assert compare.main(["promote", "--best", *args]) == 0
    assert "now 'champion'" in capsys.readouterr().out
    assert client.get_model_version_by_alias("cnn-classifier", "champion").run_id == runs["fast"].info.run_id
