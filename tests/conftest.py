"""Shared fixtures and helpers: image folders, broken files, project copies, processes, a PostgreSQL server."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

if TYPE_CHECKING:
    from pipeline.lib.local_server import LocalServer

# No usage tracking from anything the tests start, run through `make test` or not (the Makefile
# exports the same switches).
for _switch in ("BENTOML_DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
    os.environ.setdefault(_switch, "true")

def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with slow tests first, each file's tests kept together and in order: with ``make test``'s
    ``pytest -n auto --dist loadfile`` the long end-to-end files start at once instead of trailing
    behind the short ones, and a module's fixtures (a server, a trained project) are built once."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


# One tint per class, so a model can tell the classes apart.
TINTS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40], [40, 200, 200]])


def pattern_image(label: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A grayscale image a CNN must look at to classify: class 0 horizontal stripes, 1 vertical
    stripes, 2 a bright square, on noise. Harder than the tinted folders: lr 0.001 stays near
    chance in 2 epochs while lr 0.1 learns."""
    image = rng.integers(0, 60, (size, size)).astype(np.uint8)
    offset = int(rng.integers(0, 4))
    if label == 0:
        image[offset::4] = 220
    elif label == 1:
        image[:, offset::4] = 220
    else:
        image[8 + offset:20 + offset, 8:20] = 230
    return image


def write_pattern_folder(root: Path, per_class: int, file_name: str = "{i}.png") -> Path:
    """Write ``root/c<label>/<file_name>`` for 3 classes × ``per_class`` :func:`pattern_image` PNGs
    (32 px, one seeded generator in class order, so the same call writes the same bytes)."""
    rng = np.random.default_rng(0)
    for label in range(3):
        (root / f"c{label}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(pattern_image(label, rng)).save(root / f"c{label}" / file_name.format(i=i))
    return root


def write_image_folder(
    root: Path, classes: int = 3, per_class: int = 30, side: int = 12, start: int = 0, seed: int = 0
) -> Path:
    """Write ``root/c<k>/img_<i>.png`` for i in [start, start + per_class).

    Every image is distinct noise around its class tint; the content depends only on
    (seed, class, i), so calling again with a larger ``start`` adds new images.
    """
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            rng = np.random.default_rng([seed, k, i])
            noise = rng.integers(-40, 41, (side, side, 3))
            pixels = np.clip(TINTS[k % len(TINTS)] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"c{k}" / f"img_{i:03d}.png")
    return root


@pytest.fixture
def make_image_folder() -> Callable[..., Path]:
    """The :func:`write_image_folder` factory, for tests that need several folders."""
    return write_image_folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """``tmp_path/data``: 3 classes (c0, c1, c2) × 30 distinct 12×12 RGB PNGs."""
    return write_image_folder(tmp_path / "data")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width``×``height`` gray pixels (no real pixel data): cheap bombs, 0-pixel files."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunks = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"")) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


@pytest.fixture
def fake_png() -> Callable[[int, int], bytes]:
    """The :func:`png_header` builder."""
    return png_header


def _encoded(fmt: str, **options: object) -> bytes:
    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def bad_files() -> dict[str, tuple[bytes, str]]:
    """File name → (bytes, the ImageError reason they must give)."""
    png, jpeg = _encoded("PNG"), _encoded("JPEG", quality=90)
    # Pillow refuses to open a 0×N PNG or BMP, but a placeable WMF with an empty bounding box
    # opens (as a stub) with size 0×2: the one way to reach the "zero_pixels" check from a file.
    wmf = struct.pack("<IHhhhhHIH", 0x9AC6CDD7, 0, 0, 0, 0, 40, 1440, 0, 0)
    wmf += struct.pack("<HHHIHIH", 1, 9, 0x300, 0, 0, 0, 0)
    return {
        "truncated.png": (png[: len(png) // 2], "corrupt"),
        "truncated.jpg": (jpeg[: len(jpeg) * 6 // 10], "corrupt"),
        "empty.png": (b"", "empty"),
        "notes.txt": (b"not an image, just text\n", "not_an_image"),
        "zero_width.png": (png_header(0, 5), "not_an_image"),
        "zero_width.wmf": (wmf, "zero_pixels"),
    }


# ----------------------------------------------------------------------------- serving
SERVING_CLASSES = ["cat", "dog", "owl"]


def write_export(out: Path, classes: list[str] = SERVING_CLASSES, size: int = 32, seed: int = 0) -> Path:
    """An export folder made by the export stage's own code (``pipeline.export.write_export``) for a
    seeded random LeNet-5 (1 channel): ``classifier.onnx``, ``saliency.onnx``, ``model_card.json``."""
    import torch

    from models import build_model
    from pipeline.common.contract import ModelCard
    from pipeline.export import write_export as export_folder

    torch.manual_seed(seed)
    model = build_model("lenet5", len(classes), 1, size).eval()
    card = ModelCard(architecture="lenet5", classes=classes, image_size=size, channels=1, mean=[0.45], std=[0.25],
                     git_commit="fixture", data_md5="fixture", mlflow_run_id="fixture-run",
                     metrics={"top1": 0.5, "top5": 1.0}, registered_model="cnn-classifier", version="7")
    export_folder(model, card, out)
    return out


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export folder (:func:`write_export`: LeNet-5, classes cat/dog/owl, 1×32×32, random
    weights): the serving tests' model, so they never need ``artifacts/``. About 15 s, once."""
    return write_export(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="session", autouse=True)
def monitoring_folders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every service a test starts (in-process or ``LocalServer``, which inherits the environment) logs
    predictions, stores feedback and reads the drift verdict under a temporary folder, never in artifacts/."""
    root = tmp_path_factory.mktemp("serving_monitoring")
    names = {"SERVING_LOG_DIR": root / "predictions", "SERVING_REVIEW_DIR": root / "review",
             "SERVING_DRIFT_REPORT": root / "monitor" / "drift.json"}
    with pytest.MonkeyPatch.context() as patch:
        for variable, path in names.items():
            patch.setenv(variable, str(path))
        yield root


def pattern_split(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` :func:`pattern_image` s per class (uint8 N×1×32×32) and their labels, from one seeded generator."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), count)
    return np.stack([pattern_image(int(k), rng)[None] for k in labels]), labels


def add_pattern_reference(folder: Path) -> Path:
    """Give the export in ``folder`` its ``reference.npz`` (:func:`pipeline.lib.reference.add_reference`),
    fitted on pattern images (training split: seed 1, validation: seed 2)."""
    from pipeline.common.contract import ModelCard
    from pipeline.lib.reference import add_reference

    add_reference(folder, ModelCard.read(folder), pattern_split(60, 1), pattern_split(100, 2)[0])
    return folder


@pytest.fixture(scope="session")
def monitored_model(exported_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The serving fixture model with a monitoring reference (``reference.npz``, ``ood_threshold`` in the card)."""
    folder = tmp_path_factory.mktemp("monitored") / "export"
    shutil.copytree(exported_model, folder)
    return add_pattern_reference(folder)


# ----------------------------------------------------------------------------- project copies
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def tool_env(**extra: str) -> dict[str, str]:
    """The environment for real ``dvc``/``git`` runs: this venv first on PATH, no telemetry."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}
    for key in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_ROOT"):
        env.pop(key, None)
    return {**env, **extra}


def sh(cwd: Path, *cmd: str, env: dict[str, str] | None = None, timeout: float = 900) -> str:
    """Run a command; fail the test with its output when it fails."""
    done = subprocess.run(cmd, cwd=cwd, env=env or tool_env(), capture_output=True, text=True, timeout=timeout)
    output = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert done.returncode == 0, f"{' '.join(cmd)} failed ({done.returncode}):\n{output}"
    return done.stdout + done.stderr


def copy_project(dest: Path, params: dict[str, dict] | None = None) -> Path:
    """A committed git + DVC copy of this project (working-tree files, no data or artifacts).

    Args:
        dest: the new repository folder.
        params: per-section overrides merged into the copy's params.yaml before the commit.
    """
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        if (ROOT / rel).is_file() and not rel.startswith(("metrics/", "plots/")) and rel != "dvc.lock":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    if params:
        settings = yaml.safe_load((dest / "params.yaml").read_text())
        for section, values in params.items():
            settings.setdefault(section, {}).update(values)
        (dest / "params.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    sh(dest, "git", "init", "-q")
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-q", "-m", "project copy")
    return dest


def add_dataset(repo: Path, classes: int = 3, per_class: int = 20, side: int = 16) -> None:
    """Write a small learnable image folder as ``repo/data``, ``dvc add`` and commit it."""
    write_image_folder(repo / "data", classes=classes, per_class=per_class, side=side)
    sh(repo, "dvc", "add", "data", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", "data")


# ----------------------------------------------------------------------------- processes
def free_port() -> int:
    """A localhost TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(process: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM a process started with ``start_new_session=True`` and everything it started (its
    group), then SIGKILL the group if it is still there after ``grace_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# ----------------------------------------------------------------------------- dvc queue
def queue_idle(repo: Path, env: dict[str, str]) -> bool:
    """True when ``dvc queue status`` shows nothing queued or running; fails on a failed task."""
    status = sh(repo, "dvc", "queue", "status", env=env)
    assert "Failed" not in status, status
    return not any(word in status for word in ("Queued", "Running"))


def run_queue(repo: Path, env: dict[str, str], workers: int, timeout_s: float,
              start: tuple[str, dict[str, str]] | None = None) -> None:
    """``dvc queue start -j workers``, wait until the queue is idle, stop the workers in any case.

    ``start``: the dvc executable and environment that start the workers (default: ``dvc`` in ``env``).
    """
    dvc, start_env = start or ("dvc", env)
    try:
        sh(repo, dvc, "queue", "start", "-j", str(workers), env=start_env)
        deadline = time.monotonic() + timeout_s
        while not queue_idle(repo, env):
            assert time.monotonic() < deadline, sh(repo, "dvc", "queue", "status", env=env)
            time.sleep(3)
    finally:
        stop_queue_workers(repo, env)


def stop_queue_workers(repo: Path, env: dict[str, str]) -> None:
    """Ask the queue's celery workers to stop; kill (by pid) those of this repo that linger."""
    subprocess.run(["dvc", "queue", "stop"], cwd=repo, env=env, capture_output=True, timeout=60)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if not queue_worker_pids(repo):
            return
        time.sleep(1)
    for pid in queue_worker_pids(repo):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def queue_worker_pids(repo: Path) -> list[int]:
    """The dvc queue workers running in ``repo``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if b"queue-worker" in cmdline and Path(os.readlink(proc / "cwd")) == repo:
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


# ----------------------------------------------------------------------------- PostgreSQL
def postgresql_bin() -> Path:
    """The newest server binaries of Debian's ``postgresql`` package (.ci/run installs it)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    assert found, "no PostgreSQL server in /usr/lib/postgresql/*/bin: apt-get install postgresql (.ci/run does)"
    return found[-1].parent


@contextlib.contextmanager
def postgresql_server() -> Iterator[str]:
    """A real PostgreSQL server in a temporary folder on a free localhost port, database ``mlflow``
    owned by user ``mlflow`` (trust authentication, localhost only); stopped and deleted after.

    Yields:
        its SQLAlchemy URI, ``postgresql://mlflow@127.0.0.1:<port>/mlflow``.
    """
    bin_dir = postgresql_bin()
    # Not under pytest's tmp_path: that is private to the user running the tests (0700), and as
    # root the server must run as the package's `postgres` user, since postgres refuses root.
    home = Path(tempfile.mkdtemp(prefix="cnn-mlops-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(home, "postgres")
    data, port = home / "data", free_port()
    try:
        sh(home, *as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust",
           "--encoding=UTF8", "--no-locale", "--no-sync")
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {home} -c fsync=off"
        started = subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(home / "server.log"),
                                  "-o", options, "-w", "-t", "120", "start"], cwd=home, capture_output=True, text=True)
        log = (home / "server.log").read_text() if (home / "server.log").exists() else ""
        assert started.returncode == 0, f"pg_ctl start failed:\n{started.stdout}{started.stderr}{log[-3000:]}"
        try:
            sh(home, str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow")
            yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
        finally:
            sh(home, *as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def postgresql() -> Iterator[str]:
    """:func:`postgresql_server` for one test module: its URI."""
    with postgresql_server() as uri:
        yield uri


@contextlib.contextmanager
def serving(home: Path, **env: str) -> Iterator[LocalServer]:
    """``python -m pipeline.serve`` (the front and the service, as ``make serve``) until the block ends;
    it must then stop cleanly."""
    from pipeline.lib.local_server import LocalServer

    running = LocalServer(home, **env)
    running.wait_ready()
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture(scope="module")
def http(server: LocalServer) -> Iterator[httpx.Client]:
    """A client of the module's ``server`` fixture."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def burst(url: str, clients: int, requests_each: int, image: bytes) -> tuple[list[int], list[bool]]:
    """``clients`` threads each POST ``image`` to /predict ``requests_each`` times: every status, and
    for each 503 whether it carries ``Retry-After: 1`` and says "overloaded"."""
    statuses: list[int] = []
    refusals_ok: list[bool] = []

    def client_loop() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            for _ in range(requests_each):
                response = client.post("/predict", files={"image": ("a.png", image)})
                statuses.append(response.status_code)
                if response.status_code == 503:
                    refusals_ok.append(response.headers.get("retry-after") == "1" and "overloaded" in response.text)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return statuses, refusals_ok
