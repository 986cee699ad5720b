"""Team setup with real processes: one ``mlflow server`` and a DVC remote shared by several clones.

The module starts one tracking server per backend store the README offers (SQLite, and a real
PostgreSQL server started in a temporary folder), with artifacts proxied into a local
``--artifacts-destination`` and MLflow's basic-auth app (so a wrong or missing password fails), and
runs the tiny pipeline once against each with the password in ``MLFLOW_TRACKING_URI``. The tests
then check the runs, artifacts and registry on the server, compare/promote/export-champion,
``make serve-champion``, a parallel ``dvc queue``, a ``dvc push``/``dvc pull`` round trip between
clones, and that the password shows up nowhere.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import httpx
import mlflow
import pytest
import sqlalchemy

from pipeline import compare
from pipeline.common.contract import CLASSIFIER_FILE, SALIENCY_FILE, ModelCard
from pipeline.lib import model_registry as registry
from tests.conftest import BIN, free_port, run_queue, sh, stop_process_group, tool_env
from tests.test_experiments import make_project

pytestmark = pytest.mark.slow
# The server's admin. SECRET is made per test session (a literal here would be found in the copy
# of this file inside the project) and must never show up anywhere.
USER, SECRET = "admin", f"team-{secrets.token_hex(8)}"
MODEL = "cnn-classifier"


def _env(**extra: str) -> dict[str, str]:
    """No inherited MLflow/DVC settings, no telemetry, plus ``extra``."""
    env = {k: v for k, v in tool_env().items() if not k.startswith(("MLFLOW_", "DVC_"))}
    return {**env, "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", **extra}


@dataclass
class Server:
    backend: str  # "sqlite" or "postgresql"
    store: str  # its --backend-store-uri
    home: Path
    port: int
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url_with_password(self) -> str:
        return f"http://{USER}:{SECRET}@127.0.0.1:{self.port}"

    def log(self) -> str:
        return (self.home / "server.log").read_text()[-4000:]


# Backend-agnostic tests (the DVC remote, `make serve-champion`) run against the SQLite server only.
SQLITE_ONLY = pytest.mark.parametrize("server", ["sqlite"], indirect=True)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory) -> Server:
    """``mlflow server`` with basic auth on a free port, on a SQLite file or a PostgreSQL server
    (:func:`tests.conftest.postgresql_server`); stopped (process group) at the end."""
    home = tmp_path_factory.mktemp(f"mlflow-server-{request.param}")
    if request.param == "sqlite":
        backend_store = f"sqlite:///{home / 'mlflow.db'}"
    else:
        backend_store = request.getfixturevalue("postgresql")
    (home / "auth.ini").write_text(
        f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{home / 'auth.db'}\n"
        f"admin_username = {USER}\nadmin_password = {SECRET}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = free_port()
    env = _env(MLFLOW_AUTH_CONFIG_PATH=str(home / "auth.ini"), MLFLOW_FLASK_SERVER_SECRET_KEY="test-only-key")
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", backend_store,
           "--artifacts-destination", str(home / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--app-name", "basic-auth"]
    with open(home / "server.log", "w") as log:
        process = subprocess.Popen(cmd, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server = Server(request.param, backend_store, home, port, process)
    deadline = time.monotonic() + 240  # schema migrations and app import: slow on a busy machine
    try:
        while True:
            assert process.poll() is None, f"mlflow server exited:\n{server.log()}"
            assert time.monotonic() < deadline, f"mlflow server not healthy:\n{server.log()}"
            try:
                with urllib.request.urlopen(f"{server.url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield server
    finally:
        stop_process_group(process)


@dataclass
class Project:
    repo: Path
    remote: Path
    init_output: str  # `python -m pipeline.lib.tracking init`
    repro_output: str  # `dvc repro`


@pytest.fixture(scope="module")
def project(server: Server, tmp_path_factory) -> Project:
    """The tiny project with a local-folder DVC remote, run once against the server with the
    password in MLFLOW_TRACKING_URI; results committed."""
    root = tmp_path_factory.mktemp("team")
    env = _env(MLFLOW_TRACKING_URI=server.url_with_password)
    repo = make_project(root / "repo", env)
    remote = root / "dvc-remote"
    sh(repo, "dvc", "remote", "add", "-d", "shared", str(remote), env=env)
    init = sh(repo, sys.executable, "-m", "pipeline.lib.tracking", "init", env=env)
    repro = sh(repo, "dvc", "repro", env=env, timeout=900)
    sh(repo, "git", "add", "-A", env=env)
    sh(repo, "git", "commit", "-q", "-m", "pipeline results and the shared remote", env=env)
    return Project(repo, remote, init, repro)


@pytest.fixture()
def as_team_member(server: Server, monkeypatch) -> mlflow.MlflowClient:
    """This process points at the server (password in the URI); a client with the credentials."""
    for key in [k for k in os.environ if k.startswith(("MLFLOW_", "DVC_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url_with_password)
    # tracking.connect() moves the password here; monkeypatch puts things back afterwards
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    return compare.open_client()


@pytest.mark.timeout(1500)
def test_pipeline_tracks_and_registers_on_the_server(server, project, as_team_member, tmp_path):
    client = as_team_member
    repo = project.repo
    run_id = (repo / "artifacts" / "train" / "run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert {"val_top1", "best_val_top1", "test_top1", "test_top5", "train_seconds"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run_id, "val_top1")) == 2
    # artifacts went through the server's proxy into its --artifacts-destination
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    top = {a.path for a in client.list_artifacts(run_id)}
    assert "training_curves.png" in top
    assert "eval/confusion_matrix.png" in {a.path for a in client.list_artifacts(run_id, "eval")}
    stored = {p.name for p in (server.home / "artifacts").rglob("*") if p.is_file()}
    # the ONNX flavor stores classifier.onnx as model.onnx; saliency.onnx and the card ride along
    assert {"training_curves.png", "confusion_matrix.png", "model.onnx", SALIENCY_FILE, "model_card.json"} <= stored
    for local_store in ("mlflow.db", "mlruns", "mlartifacts"):
        assert not (repo / local_store).exists(), f"{local_store}: the pipeline wrote a local store"
    # ...and the server's backend store (a SQLite file or the PostgreSQL database) holds the run
    with sqlalchemy.create_engine(server.store).connect() as db:
        status = db.execute(sqlalchemy.text("SELECT status FROM runs WHERE run_uuid = :id"), {"id": run_id}).scalar()
    assert status == "FINISHED", (server.backend, status)

    # the registry: one version from this run, with both ONNX files and the card
    (version,) = client.search_model_versions(f"name = '{MODEL}' and run_id = '{run_id}'")
    card = registry.download(MODEL, version.version, tmp_path / "downloaded")
    for name in (CLASSIFIER_FILE, SALIENCY_FILE):
        assert (tmp_path / "downloaded" / name).read_bytes() == (repo / "artifacts" / "export" / name).read_bytes()
    assert card.mlflow_run_id == run_id and card.version == version.version

    # promote it and fetch the champion, as `make serve-champion` does
    args = ["--params", str(repo / "params.yaml")]
    assert compare.main(["promote", "--version", version.version, *args]) == 0
    assert client.get_model_version_by_alias(MODEL, "champion").version == version.version
    out = tmp_path / "champion"
    assert compare.main(["export-champion", "--out", str(out), *args]) == 0
    champion = ModelCard.read(out)
    champion.verify_files(out)
    assert (champion.mlflow_run_id, champion.version) == (run_id, version.version)


@SQLITE_ONLY
@pytest.mark.timeout(900)
def test_make_serve_champion_serves_the_registry_champion(server, project, tmp_path):
    """``make serve-champion`` against the server: the served model is the champion version."""
    env = _env(MLFLOW_TRACKING_URI=server.url_with_password, BENTOML_HOME=str(tmp_path / "bentoml"))
    client = mlflow.MlflowClient(server.url)
    os.environ.update(MLFLOW_TRACKING_USERNAME=USER, MLFLOW_TRACKING_PASSWORD=SECRET)
    try:
        run_id = (project.repo / "artifacts" / "train" / "run_id").read_text().strip()
        (version,) = client.search_model_versions(f"name = '{MODEL}' and run_id = '{run_id}'")
        client.set_registered_model_alias(MODEL, "champion", version.version)
    finally:
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(key)
    port = free_port()
    venv = BIN.parent
    cmd = ["make", "-o", f"{venv}/.installed", "serve-champion", f"VENV={venv}", f"PORT={port}"]
    with open(tmp_path / "make.log", "w") as log:
        process = subprocess.Popen(cmd, cwd=project.repo, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            output = (tmp_path / "make.log").read_text()
            assert "Application startup failed" not in output, output[-4000:]
            assert process.poll() is None, output[-4000:]
            assert time.monotonic() < deadline, output[-4000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        info = httpx.post(f"http://127.0.0.1:{port}/metadata", json={}, timeout=30)
        assert info.status_code == 200, info.text
        served = info.json()
        assert (served["mlflow_run_id"], served["version"]) == (run_id, version.version), served
    finally:
        stop_process_group(process)
    assert SECRET not in (tmp_path / "make.log").read_text()


@SQLITE_ONLY  # two whole experiments: the registry and run logging of a backend are covered by the first test
@pytest.mark.timeout(1500)
def test_queued_experiments_log_to_the_server(server, project, tmp_path):
    """``dvc queue start -j 2``: two FINISHED runs named after their experiments; then the
    compare/promote/export-champion CLIs on them. Credentials in MLflow's own variables this time;
    two workers write to the backend store at once."""
    repo = project.repo
    env = _env(MLFLOW_TRACKING_URI=server.url, MLFLOW_TRACKING_USERNAME=USER, MLFLOW_TRACKING_PASSWORD=SECRET)
    sh(repo, "dvc", "exp", "run", "--queue", "-n", "fast", "-S", "train.lr=0.1", env=env)
    sh(repo, "dvc", "exp", "run", "--queue", "-n", "slow", "-S", "train.lr=0.001", env=env)
    run_queue(repo, env, workers=2, timeout_s=1200)

    client = mlflow.MlflowClient(server.url)
    os.environ.update(MLFLOW_TRACKING_USERNAME=USER, MLFLOW_TRACKING_PASSWORD=SECRET)
    try:
        experiment = client.get_experiment_by_name("cnn-mlops")
        runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])
                if r.data.tags.get("dvc_exp_name")}
        versions = {v.run_id for v in client.search_model_versions(f"name = '{MODEL}'")}
    finally:
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(key)
    assert sorted(runs) == ["fast", "slow"]
    for name, run in runs.items():
        assert run.info.status == "FINISHED" and run.data.tags["dvc_exp_name"] == name
        assert "test_top1" in run.data.metrics and run.info.run_id in versions

    params = ["--params", str(repo / "params.yaml")]
    table = sh(repo, sys.executable, "-m", "pipeline.compare", "--runs", "fast", "slow", *params, env=env)
    rows = [line.split()[0] for line in table.splitlines()[2:4]]
    assert sorted(rows) == ["fast", "slow"], table
    best, worst = rows
    sh(repo, sys.executable, "-m", "pipeline.compare", "promote", "--run", best, "--force", *params, env=env)
    refused = subprocess.run([sys.executable, "-m", "pipeline.compare", "promote", "--run", worst, *params],
                             cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    better = runs[best].data.metrics["test_top1"] > runs[worst].data.metrics["test_top1"]
    assert refused.returncode == (1 if better else 0), refused.stderr
    out = tmp_path / "champion"
    sh(repo, sys.executable, "-m", "pipeline.compare", "export-champion", "--out", str(out), *params, env=env)
    card = ModelCard.read(out)
    card.verify_files(out)
    assert card.mlflow_run_id == runs[best if better else worst].info.run_id


def _identical(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


@SQLITE_ONLY
@pytest.mark.timeout(900)
def test_dvc_remote_pull_gives_a_clone_everything(project, tmp_path):
    """Push (with the run cache) from the repo that ran; a fresh clone pulls and runs nothing;
    ``make run`` in another fresh clone pulls instead of regenerating. Neither needs MLflow:
    their tracking URI points at a closed port."""
    repo = project.repo
    sh(repo, "dvc", "push", "--run-cache", env=_env())
    assert (project.remote / "runs").is_dir()  # the run cache travelled too
    nowhere = _env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")

    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone), env=nowhere)
    sh(clone, "dvc", "pull", env=nowhere)
    assert json.loads(sh(clone, "dvc", "status", "--json", env=nowhere)) == {}
    rerun = sh(clone, "dvc", "repro", env=nowhere)
    assert "Running stage" not in rerun and "up to date" in rerun, rerun
    for name in (CLASSIFIER_FILE, SALIENCY_FILE, "model_card.json"):
        assert _identical(clone / "artifacts" / "export" / name, repo / "artifacts" / "export" / name), name
    assert _identical(clone / "artifacts" / "train" / "model.pt", repo / "artifacts" / "train" / "model.pt")
    assert not (clone / "artifacts" / "checkpoint").exists()  # not needed to be up to date
    assert (repo / "artifacts" / "checkpoint" / "last.pt").exists()  # still written where training ran
    assert not (clone / "mlflow.db").exists()

    made = tmp_path / "made"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(made), env=nowhere)
    venv = BIN.parent
    output = sh(made, "make", "-o", f"{venv}/.installed", "run", f"VENV={venv}", env=nowhere)
    assert "pulling data and stage outputs from DVC remote 'shared'" in output, output
    assert "Running stage" not in output and "up to date" in output, output
    assert _identical(made / "artifacts" / "export" / CLASSIFIER_FILE, repo / "artifacts" / "export" / CLASSIFIER_FILE)


def _files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


@pytest.mark.timeout(600)
def test_the_password_never_leaks(server, project, as_team_member):
    """The password in MLFLOW_TRACKING_URI: not in any output, file, tag or uploaded artifact."""
    secret = SECRET.encode()
    assert f"{USER}:***@127.0.0.1:{server.port}" in project.init_output
    assert SECRET not in project.init_output
    assert SECRET not in project.repro_output
    # MLflow prints a link to each run it ends: the server, without the password
    assert "View run" in project.repro_output and f"at: {server.url}/#/experiments/" in project.repro_output
    assert _files_containing(project.repo, secret) == []  # workspace, .git, .dvc (cache, tmp)
    assert _files_containing(server.home / "artifacts", secret) == []  # what the project uploaded

    client = as_team_member
    experiment = client.get_experiment_by_name("cnn-mlops")
    for run in client.search_runs([experiment.experiment_id]):
        recorded = json.dumps([run.data.tags, run.data.params, run.info.artifact_uri])
        assert SECRET not in recorded and "***" not in recorded, run.info.run_name
    for version in client.search_model_versions(f"name = '{MODEL}'"):
        assert SECRET not in json.dumps([version.tags, version.source, version.run_link or ""])

    # failures print the store too: a dead server with the password in its URI
    dead = _env(MLFLOW_TRACKING_URI=f"http://{USER}:{SECRET}@127.0.0.1:{free_port()}",
                MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    for cmd in (["pipeline.compare"], ["pipeline.lib.tracking", "init"]):
        done = subprocess.run([sys.executable, "-m", *cmd, "--params", str(project.repo / "params.yaml")],
                              cwd=project.repo, env=dead, capture_output=True, text=True, timeout=300)
        assert done.returncode != 0
        assert "127.0.0.1" in done.stdout + done.stderr  # it does name the store...
        assert SECRET not in done.stdout + done.stderr  # ...without the password


def test_wrong_password_is_refused(server, project, monkeypatch, capsys):
    """The server does check the password, so the tests above prove it was sent."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://{USER}:wrong-password@127.0.0.1:{server.port}")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert compare.main(["--params", str(project.repo / "params.yaml")]) == 1
    error = capsys.readouterr().err
    assert "401" in error or "nauthorized" in error, error
    assert "wrong-password" not in error
