"""Train stage: determinism, kill-and-resume, MLflow records, DDP, checkpoints, model registry."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from pipeline import train as train_stage
from pipeline.common.contract import Manifest
from pipeline.common.errors import UserError
from pipeline.common.metrics import TrainMetrics
from pipeline.lib import engine
from pipeline.lib.checkpoint import Checkpoint
from pipeline.lib.config import Params, PreprocessParams, TrainParams
from pipeline.lib.trained import load_trained
from pipeline.preprocess import preprocess_folder
from tests.conftest import free_port, stop_process_group, write_pattern_folder

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY_TRAIN = TrainParams(model="lenet5", epochs=3, batch_size=16, lr=0.05, warmup_epochs=0.5, threads=1)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """Three classes × 40 images at 32 px, preprocessed."""
    root = tmp_path_factory.mktemp("tiny")
    write_pattern_folder(root / "data", per_class=40)
    preprocess_folder(root / "data", root / "pre", PreprocessParams(image_size=32, val_fraction=0.2,
                                                                     test_fraction=0.2, workers=1), seed=0)
    return root / "pre"


@pytest.fixture()
def mlflow_store(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    mlflow.set_tracking_uri(uri)
    return uri


def _run(tmp: Path, data: Path, params: Params) -> dict:
    return train_stage.train(params, data, tmp / "train", tmp / "ckpt" / "last.pt", tmp / "metrics.json",
                             tmp / "plots.json", progress=False)


def _curves(tmp: Path) -> list[dict]:
    return json.loads((tmp / "plots.json").read_text())


def test_same_params_same_metrics(tiny_data, tmp_path, mlflow_store):
    params = Params(train=TINY_TRAIN)
    first = _run(tmp_path / "a", tiny_data, params)
    second = _run(tmp_path / "b", tiny_data, params)
    assert first.final == second.final
    assert _curves(tmp_path / "a") == _curves(tmp_path / "b")
    # and training does learn the patterns
    assert first.best.val_top1 > 0.9
    assert TrainMetrics.read(tmp_path / "a" / "metrics.json") == first  # what the stage wrote


def test_mlflow_run_records_params_metrics_tags(tiny_data, tmp_path, mlflow_store):
    params = Params(train=TINY_TRAIN)
    _run(tmp_path, tiny_data, params)
    run_id = (tmp_path / "train" / "run_id").read_text().strip()
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.model"] == "lenet5"
    assert run.data.params["train.epochs"] == "3"
    assert run.data.params["preprocess.image_size"] == "224"  # every param, flattened
    for key in ("git_commit", "git_dirty", "data_md5", "model", "device", "torch_version"):
        assert key in run.data.tags
    assert run.data.tags["model"] == "lenet5"
    assert run.data.tags["device"] == "cpu"
    for metric in ("train_loss", "train_accuracy", "val_loss", "val_top1", "val_top5", "lr", "images_per_s",
                   "epoch_seconds"):
        history = client.get_metric_history(run_id, metric)
        assert [m.step for m in history] == [1, 2, 3], metric
    artifacts = [a.path for a in client.list_artifacts(run_id)]
    assert "training_curves.png" in artifacts


def test_failed_run_is_marked_failed(tiny_data, tmp_path, mlflow_store, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(train_stage, "evaluate", broken)
    with pytest.raises(RuntimeError, match="injected"):
        _run(tmp_path, tiny_data, Params(train=TINY_TRAIN))
    runs = mlflow.search_runs(experiment_names=["cnn-mlops"], output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]


def test_checkpoints_load_with_weights_only(tiny_data, tmp_path, mlflow_store):
    _run(tmp_path, tiny_data, Params(train=TINY_TRAIN))
    state = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    assert state["epoch"] == 3 and {"model", "optimizer", "scheduler", "rng_cpu"} <= set(state)
    checkpoint = Checkpoint.load(tmp_path / "ckpt" / "last.pt", state["fingerprint"], torch.device("cpu"))
    assert [row.epoch for row in checkpoint.history] == [1, 2, 3]
    assert checkpoint.best.val_top1 == max(row.val_top1 for row in checkpoint.history)
    assert Checkpoint.load(tmp_path / "ckpt" / "last.pt", "another run", torch.device("cpu")) is None
    model, card = load_trained(tmp_path / "train" / "model.pt")  # weights_only inside
    assert card.classes == ["c0", "c1", "c2"] and card.architecture == "lenet5"
    assert card.mlflow_run_id == (tmp_path / "train" / "run_id").read_text().strip()
    assert isinstance(model, torch.nn.Module)


def _write_params(path: Path, train: TrainParams) -> Path:
    path.write_text(yaml.safe_dump({"train": {k: getattr(train, k) for k in ("model", "epochs", "batch_size",
                                                                           "lr", "warmup_epochs", "threads")}}))
    return path


def _train_args(tmp: Path, data: Path, params: Path) -> list[str]:
    return ["--data", str(data), "--out", str(tmp / "train"), "--checkpoint", str(tmp / "ckpt" / "last.pt"),
            "--metrics", str(tmp / "metrics.json"), "--plots", str(tmp / "plots.json"), "--params", str(params),
            "--no-progress"]


def _train_cmd(tmp: Path, data: Path, params: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.train", *_train_args(tmp, data, params)]


def _start_paused(tmp: Path, data: Path, params: Path, epoch: int, **popen) -> subprocess.Popen:
    """``pipeline.train`` (tests/paused_train.py) that stops at the start of ``epoch``; returns once
    it has stopped there, so epoch - 1 is checkpointed and the run is still going."""
    read, write = os.pipe()
    env = {**popen.pop("env"), "PAUSE_AT_EPOCH": str(epoch), "PAUSE_FD": str(write)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "paused_train.py"), *_train_args(tmp, data, params)],
                            cwd=ROOT, env=env, pass_fds=(write,), **popen)
    os.close(write)
    with os.fdopen(read) as pipe:
        said = pipe.readline()  # "" if the run ended first
    assert said == "paused\n", f"the run ended before epoch {epoch} (exit status {proc.wait()})"
    return proc


@pytest.mark.slow
def test_killed_run_resumes_to_identical_metrics(tiny_data, tmp_path, mlflow_store):
    train = TINY_TRAIN
    params = _write_params(tmp_path / "params.yaml", train)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    reference = subprocess.run(_train_cmd(tmp_path / "ref", tiny_data, params), env=env, cwd=ROOT,
                               capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr[-2000:]

    resumed = tmp_path / "resumed"
    checkpoint = resumed / "ckpt" / "last.pt"
    proc = _start_paused(resumed, tiny_data, params, epoch=2, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    proc.send_signal(signal.SIGKILL)  # mid-run, no chance to clean up: the worst case
    proc.wait()
    killed_at = torch.load(checkpoint, weights_only=True)["epoch"]
    assert killed_at == 1
    assert not (resumed / "metrics.json").exists()

    rerun = subprocess.run(_train_cmd(resumed, tiny_data, params), env=env, cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resuming from {checkpoint} at epoch {killed_at + 1}" in rerun.stderr
    assert TrainMetrics.read(resumed / "metrics.json") == TrainMetrics.read(tmp_path / "ref" / "metrics.json")
    assert _curves(resumed) == _curves(tmp_path / "ref")
    # the resumed run continues the same MLflow run, which ends FINISHED
    run_id = (resumed / "train" / "run_id").read_text().strip()
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert len(mlflow.MlflowClient().get_metric_history(run_id, "val_top1")) == train.epochs


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_is_marked_killed(tiny_data, tmp_path, mlflow_store, signum):
    params = _write_params(tmp_path / "params.yaml", TINY_TRAIN)
    # A shell's background job (`make test &`, some CI runners) inherits SIGINT ignored, and Python
    # then installs no KeyboardInterrupt handler: give the child the default disposition, as a
    # terminal's foreground job has.
    proc = _start_paused(tmp_path, tiny_data, params, epoch=2, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "the next run resumes" in stderr
    runs = mlflow.search_runs(experiment_names=["cnn-mlops"], output_format="list")
    assert [r.info.status for r in runs] == ["KILLED"]


def test_changed_params_do_not_resume(tiny_data, tmp_path, mlflow_store, caplog):
    _run(tmp_path, tiny_data, Params(train=TINY_TRAIN))
    caplog.set_level("INFO")
    _run(tmp_path, tiny_data, Params(train=TINY_TRAIN.model_copy(update=dict(lr=0.02))))
    assert "ignoring" in caplog.text and "resuming" not in caplog.text


@pytest.fixture(scope="module")
def uneven_data(tiny_data, tmp_path_factory) -> Path:
    """tiny_data with exactly 65 training images: 2 ranks × batch 16 would run 3 batches on one
    rank and 2 on the other if each took every other image of the shuffle."""
    out = tmp_path_factory.mktemp("uneven") / "pre"
    shutil.copytree(tiny_data, out)
    images, labels = np.load(out / "train_images.npy")[:65], np.load(out / "train_labels.npy")[:65]
    assert len(labels) == 65, "tiny_data needs at least 65 training images"
    np.save(out / "train_images.npy", images)
    np.save(out / "train_labels.npy", labels)
    manifest = Manifest.read(out)
    counts = np.bincount(labels, minlength=len(manifest.classes)).tolist()
    manifest = manifest.model_copy(update={
        "counts": {**manifest.counts, "train": 65}, "class_counts": {**manifest.class_counts, "train": counts},
        "files": [f for f in manifest.files if f.split != "train" or f.index < 65]})
    (out / "manifest.json").write_text(manifest.to_json())
    return out


def _torchrun_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ddp_two_cpu_processes_on_an_uneven_split(uneven_data, tmp_path, mlflow_store):
    # 65 images, 2 ranks, batch 16: without equal shares rank 0 would wait forever in its 3rd
    # batch's all-reduce; the subprocess timeout turns such a hang into a failure.
    params = _write_params(tmp_path / "params.yaml", TINY_TRAIN.model_copy(update=dict(epochs=2)))
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "pipeline.train",
           *_train_cmd(tmp_path, uneven_data, params)[3:]]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_torchrun_env(), start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    finally:  # a hang: end torchrun and its workers (its session), not just torchrun
        if proc.poll() is None:
            stop_process_group(proc, grace_s=0)
    assert proc.returncode == 0, stderr[-3000:]
    assert TrainMetrics.read(tmp_path / "metrics.json").epochs == 2
    runs = mlflow.search_runs(experiment_names=["cnn-mlops"], output_format="list")
    assert [r.info.status for r in runs] == ["FINISHED"]  # rank 0 alone logs
    assert len(mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, "val_top1")) == 2


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_killed_rank_ends_the_other_with_a_clear_message(tiny_data, tmp_path, mlflow_store):
    # Two ranks started by hand (as two machines' launchers would): no torchrun agent to tear
    # the survivor down, so it has to notice by itself. Rank 1 stops at the start of epoch 2
    # (after the epoch-1 barrier, so rank 0 has written its checkpoint and waits for rank 1 in
    # epoch 2's first all-reduce) and is killed there.
    params = _write_params(tmp_path / "params.yaml", TINY_TRAIN)
    port = free_port()

    def rank_env(rank: int) -> dict[str, str]:
        return {**_torchrun_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
                "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"}

    survivor = subprocess.Popen(_train_cmd(tmp_path, tiny_data, params), cwd=ROOT, env=rank_env(0), text=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    victim = None
    try:
        victim = _start_paused(tmp_path, tiny_data, params, epoch=2, env=rank_env(1), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        assert (tmp_path / "ckpt" / "last.pt").exists()
        assert survivor.poll() is None, survivor.communicate()[1][-3000:]
        victim.kill()  # SIGKILL mid-training: no goodbye on the socket beyond the kernel closing it
        victim.wait()
        _, stderr = survivor.communicate(timeout=120)  # a hang fails here
    finally:
        for proc in (survivor, victim):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert survivor.returncode == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: rank 0 of 2: another training process failed or stopped answering"), last
    assert "resumes from" in last
    runs = mlflow.search_runs(experiment_names=["cnn-mlops"], output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]


def test_rank_order_gives_every_rank_the_same_length_and_covers_everything():
    for n, world in ((65, 2), (10, 3), (2, 4), (12, 1)):
        shares = [train_stage.rank_order(n, torch.Generator().manual_seed(1), rank, world) for rank in range(world)]
        assert len({len(share) for share in shares}) == 1, (n, world)
        assert set(np.concatenate(shares)) == set(range(n))
    plain = torch.randperm(12, generator=torch.Generator().manual_seed(1)).numpy()
    np.testing.assert_array_equal(train_stage.rank_order(12, torch.Generator().manual_seed(1), 0, 1), plain)


def test_cuda_requested_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        assert engine.resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(UserError, match="CUDA is not available"):
            engine.resolve_device("cuda")
    assert engine.resolve_device("cpu").type == "cpu"


def test_augment_keeps_shape_and_changes_pixels():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    out = engine.augment(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape
    assert not torch.equal(out, x)


@pytest.mark.slow
def test_gpu_check_script_runs_the_training_path_on_the_cpu():
    # bench/gpu_check.py only gives figures on a GPU, which most sessions lack: a CPU smoke run
    # keeps it in step with pipeline.train's loop (it fails on any signature or API drift).
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--size", "32",
                           "--steps", "1", "--batch-size", "2"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|")[0].strip() for line in done.stdout.splitlines()[2:]]
    assert rows == ["fp32", "bf16"], done.stdout
