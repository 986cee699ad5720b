"""Our service against TorchServe 0.12 serving the same LeNet-5 weights, on the same machine and load
(issue 18's comparison).

    bash bench/torchserve/setup.sh     # once: TorchServe in .venv-torchserve (java if missing)
    python bench/torchserve_compare.py [--model-dir artifacts/export] [--trained artifacts/train/model.pt]
        [--ladder 1,8,32,128] [--duration 6] [--images data]
    make torchserve-bench              # both of the above

Trains nothing: ``--trained`` is the ``model.pt`` that ``--model-dir`` was exported from (their
model cards must agree: architecture, classes, input, normalisation, MLflow run).

- **Ours**: ``python -m pipeline.serve`` (nginx in front of ``bentoml serve``, as ``make serve``
  runs it) on the ONNX export, with its defaults, through ``bench/serve.py``'s ``Servers``.
- **TorchServe** (``.venv-torchserve``): ``torchserve --start --foreground`` with its best
  configuration from issue 18: 2 workers, batch size 8, max batch delay 10 ms, 1 torch thread per
  worker (``torch.set_num_threads`` and ``OMP_NUM_THREADS``); ``bench/torchserve/handler.py`` runs
  ``model.pt`` in eager PyTorch with our preprocessing (``pipeline/common/images.py``) and the
  export's normalisation. Loopback only; token authorization off (the benchmark has no tokens),
  the model API off, models loaded at start, no per-model pip installs, model URLs limited to
  ``file://``, system-metrics collection off; logs in a temporary folder. TorchServe sends no
  usage telemetry (its "telemetry" is a SageMaker log file written only with ``SM_TELEMETRY_LOG``
  set, which is unset here).

The two run one after the other (never together), each driven by ``bench/serve.py``'s closed-loop
asyncio load generator (the same prebuilt images, keep-alive clients that never pause) at each
``--ladder`` client count for ``--duration`` seconds after a warm-up. Not h2load: Debian 12's
(nghttp2 1.52) logged no answer from TorchServe at 32 clients, and never finished a timed run
against its 503s, which close the connection (nghttp2 issue 2250). Each row: ok/s, p50/p99 of the 200s (ms),
status counts (0 = connection error), the resident memory of the whole process tree before and
after (ours: launcher, nginx, bentoml and its workers; TorchServe: the ``torchserve`` launcher, java
and its Python workers), the 1-minute load average, and the ratios ours/theirs. First both servers
answer every distinct image once: the top-1 classes must agree (the comparison is fair only if
they serve the same model). Then issue 18's targets: ok/s >= 1.5x and p99 <= theirs at every
client count, memory flat under overload (tree RSS across the >= 128-client steps grows < 50 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from serve import (
    Servers,
    fmt,
    http_request,
    load_images,
    measured,
    model_input,
    multipart,
    predict_requests,
    run_load,
    tree,
)

from pipeline.common.cpus import usable_cpus
from pipeline.lib.local_server import free_port

ROOT = Path(__file__).resolve().parent.parent
HANDLER = ROOT / "bench" / "torchserve" / "handler.py"
SETUP = "bash bench/torchserve/setup.sh"
MODEL_NAME = "lenet5"
# issue 18: TorchServe's best configuration on this model
WORKERS, BATCH_SIZE, MAX_BATCH_DELAY_MS, TORCH_THREADS = 2, 8, 10, 1
CARD_FIELDS = ("architecture", "classes", "image_size", "channels", "mean", "std", "mlflow_run_id")
MEMORY_FLAT_MB = 50


def check_same_model(model_dir: Path, trained: Path) -> dict:
    """The card inside ``model.pt``; exits with a message naming the field if the export's card differs."""
    import torch

    saved = torch.load(trained, map_location="cpu", weights_only=True)
    card = saved["card"]
    exported = json.loads((model_dir / "model_card.json").read_text())
    differ = [field for field in CARD_FIELDS if card.get(field) and exported.get(field)
              and card[field] != exported[field]]
    if differ:
        sys.exit(f"error: {trained} is not the model {model_dir} was exported from: {', '.join(differ)} differ "
                 f"({', '.join(f'{f}: {card[f]!r} vs {exported[f]!r}' for f in differ)})")
    return card


class TorchServe:
    """``torchserve --start --foreground`` on free loopback ports with the model archived from
    ``trained`` and :mod:`bench.torchserve.handler`; everything it writes goes under ``home``.

    ``process`` and ``url`` are what bench/serve.py's ``measured`` reads (the launcher's pid: its
    tree is java and the Python workers)."""

    def __init__(self, venv: Path, trained: Path, home: Path) -> None:
        self.venv, self.home = venv, home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.management = f"http://127.0.0.1:{free_port()}"
        store = home / "model-store"
        store.mkdir(parents=True)
        self.archive(trained, store)
        config = home / "config.properties"
        config.write_text("\n".join([
            f"inference_address={self.url}",
            f"management_address={self.management}",
            f"metrics_address=http://127.0.0.1:{free_port()}",
            f"model_store={store}",
            f"load_models={MODEL_NAME}.mar",
            f"default_workers_per_model={WORKERS}",
            f"number_of_netty_threads={usable_cpus()}",
            "disable_token_authorization=true",
            "enable_model_api=false",
            "install_py_dep_per_model=false",
            "disable_system_metrics=true",
            "allowed_urls=file://.*",
            "enable_envvars_config=false",
        ]) + "\n")
        logs = home / "logs"
        logs.mkdir()
        env = {**os.environ, "OMP_NUM_THREADS": str(TORCH_THREADS), "MKL_NUM_THREADS": str(TORCH_THREADS),
               "TS_BENCH_TORCH_THREADS": str(TORCH_THREADS), "LOG_LOCATION": str(logs),
               "METRICS_LOCATION": str(logs), "TEMP": str(home), "TMPDIR": str(home),  # its pid file goes there
               "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}"}
        env.pop("SM_TELEMETRY_LOG", None)
        env.pop("TS_CONFIG_FILE", None)
        self.env = env
        self.log_path = home / "torchserve.log"
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [str(venv / "bin" / "torchserve"), "--start", "--foreground", "--ts-config", str(config),
                 "--model-store", str(store), "--disable-token-auth", "--ncs"],
                cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def archive(self, trained: Path, store: Path) -> None:
        """``lenet5.mar``: model.pt, the handler, and copies of ``models/`` and ``pipeline/common/images.py``
        (as ``project_images.py``) for the handler to import."""
        extra = self.home / "extra"
        shutil.copytree(ROOT / "models", extra / "models", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(ROOT / "pipeline" / "common" / "images.py", extra / "project_images.py")
        model_config = self.home / "model-config.yaml"
        model_config.write_text(f"minWorkers: {WORKERS}\nmaxWorkers: {WORKERS}\nbatchSize: {BATCH_SIZE}\n"
                                f"maxBatchDelay: {MAX_BATCH_DELAY_MS}\nresponseTimeout: 120\n")
        subprocess.run([str(self.venv / "bin" / "torch-model-archiver"), "--model-name", MODEL_NAME,
                        "--version", "1.0", "--serialized-file", str(trained), "--handler", str(HANDLER),
                        "--extra-files", str(extra), "--config-file", str(model_config),
                        "--export-path", str(store)], check=True)

    def wait_ready(self, timeout: float = 180) -> None:
        """Return once the model's workers are all READY; raise with the log if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"torchserve exited with {self.process.returncode}:\n{self.log()}")
            try:
                answer = httpx.get(f"{self.management}/models/{MODEL_NAME}", timeout=2)
                if answer.status_code == 200:
                    workers = answer.json()[0]["workers"]
                    if len(workers) == WORKERS and all(w["status"] == "READY" for w in workers):
                        return
            except (httpx.HTTPError, ValueError, KeyError, IndexError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"torchserve not ready after {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        """``torchserve --stop`` (it signals java, which stops its workers), then the process group if
        anything is left after 30 s."""
        if self.process.poll() is None:
            subprocess.run([str(self.venv / "bin" / "torchserve"), "--stop", "--foreground"], env=self.env,
                           cwd=self.home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=90)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # workers java did not reap, if any
        except ProcessLookupError:
            pass
        self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text()[-5000:]


def top1(url: str, path: str, field: str, blobs: list[bytes]) -> list[tuple[int, float]]:
    """(class index, probability) of the top answer for each image, one request at a time."""
    answers = []
    with httpx.Client(timeout=60) as client:
        for blob in blobs:
            response = client.post(f"{url}{path}", files={field: ("i.png", blob, "application/octet-stream")})
            response.raise_for_status()
            best = response.json()["predictions"][0]
            answers.append((int(best["index"]), float(best["probability"])))
    return answers


def tree_breakdown(pid: int) -> str:
    """Each process of the tree at ``pid`` with its resident MB (where the memory is, not only how much)."""
    parts = []
    for process in tree(pid):
        try:
            words = [Path(word).name for word in process.cmdline()[:4]]
            parts.append(f"{' '.join(words)[:48]}: {process.memory_info().rss / 1e6:.0f}")
        except psutil.Error:
            pass
    return "; ".join(parts)


def ratio(ours: float, theirs: float) -> float:
    """ours / theirs; infinite where TorchServe answered nothing (0 ok/s)."""
    return ours / theirs if theirs else float("inf")


def ladder_rows(server, requests: list[bytes], ladder: list[int], duration: float, name: str) -> dict[int, dict]:
    run_load(server.url, [(8, requests)], min(2.0, duration))  # warm-up (and our batcher's calibration)
    print(f"{name}'s process tree after the warm-up (MB): {tree_breakdown(server.process.pid)}", flush=True)
    rows = {}
    for count in ladder:
        print(f"{name}: {count} clients ...", flush=True)
        rows[count] = measured(server, [(count, requests)], duration)[0][0]  # the asyncio clients
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "artifacts" / "export",
                        help="our deployable (classifier.onnx, model_card.json)")
    parser.add_argument("--trained", type=Path, default=ROOT / "artifacts" / "train" / "model.pt",
                        help="the model.pt the deployable was exported from (TorchServe serves it)")
    parser.add_argument("--images", type=Path, default=ROOT / "data", help="image folder (synthetic if absent)")
    parser.add_argument("--distinct", type=int, default=64, help="distinct images to cycle through")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per client count")
    parser.add_argument("--ladder", default="1,8,32,128", help="client counts")
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-torchserve", help="TorchServe's environment")
    args = parser.parse_args()
    for path, what in ((args.model_dir / "classifier.onnx", "run `make run` (the export stage)"),
                       (args.trained, "run `make run` (the train stage)"),
                       (args.venv / "bin" / "torchserve", f"run `{SETUP}`")):
        if not path.is_file():
            print(f"error: {path} not found: {what}", file=sys.stderr)
            return 2
    card = check_same_model(args.model_dir, args.trained)
    ladder = [int(c) for c in args.ladder.split(",")]
    blobs = load_images(args.images, args.distinct)
    size, channels = model_input(args.model_dir)
    ours_requests = predict_requests(blobs)
    theirs_requests = [http_request(f"/predictions/{MODEL_NAME}", multipart([("data", blob)])) for blob in blobs]
    print(f"{card['architecture']}, input {channels}x{size}x{size}, {len(card['classes'])} classes; {len(blobs)} "
          f"distinct images; {os.cpu_count()} CPUs ({usable_cpus()} usable); {args.duration:g} s per client count; "
          f"TorchServe: {WORKERS} workers, batch {BATCH_SIZE}, {MAX_BATCH_DELAY_MS} ms delay, {TORCH_THREADS} torch "
          f"thread(s); load from asyncio clients; load average {os.getloadavg()[0]:.1f}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-torchserve-") as home:
        print("starting TorchServe ...", flush=True)
        theirs = TorchServe(args.venv, args.trained.resolve(), Path(home) / "torchserve")
        try:
            theirs.wait_ready()
            theirs_top1 = top1(theirs.url, f"/predictions/{MODEL_NAME}", "data", blobs)
            theirs_rows = ladder_rows(theirs, theirs_requests, ladder, args.duration, "TorchServe")
        finally:
            theirs.stop()
        print("starting ours (python -m pipeline.serve) ...", flush=True)
        ours_home = Path(home) / "ours"
        ours_home.mkdir()
        ours = Servers(args.model_dir, ours_home).start()
        try:
            ours_top1 = top1(ours.url, "/predict", "image", blobs)
            ours_rows = ladder_rows(ours, ours_requests, ladder, args.duration, "ours")
        finally:
            ours.stop()
    left = [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"])
            if p.info["cmdline"] and str(Path(home)) in " ".join(p.info["cmdline"])]
    print(f"load average after the runs: {os.getloadavg()[0]:.1f}; processes left from this run: {left or 'none'}")

    agree = sum(a[0] == b[0] for a, b in zip(ours_top1, theirs_top1, strict=True))
    gap = max(abs(a[1] - b[1]) for a, b in zip(ours_top1, theirs_top1, strict=True) if a[0] == b[0]) if agree \
        else float("nan")
    print(f"\nSame model: top-1 class agrees on {agree}/{len(blobs)} images (largest top-1 probability gap "
          f"{gap:.2g}: onnxruntime vs eager PyTorch, float32)")

    keys = ["ok/s", "p50", "p99", "gen cpu %", "rss MB", "rss after", "load"]
    print("\n/predict, clients that never pause, from asyncio clients (ms; gen cpu % = the load generator's CPU, "
          "% of one CPU; rss = MB of the process tree before and after the step)")
    print(f"{'clients':>8} {'':>10} " + " ".join(f"{k:>9}" for k in keys) + f" {'x ok/s':>7} {'x p99':>7} statuses")
    for count in ladder:
        o, t = ours_rows[count], theirs_rows[count]
        print(f"{count:8d} {'ours':>10} {fmt(o, keys)} {ratio(o['ok/s'], t['ok/s']):7.2f} "
              f"{ratio(o['p99'], t['p99']):7.2f} {o['statuses']}")
        print(f"{'':8} {'TorchServe':>10} {fmt(t, keys)} {'':7} {'':7} {t['statuses']}")

    def growth(rows: dict[int, dict]) -> float:
        overload = [rows[c] for c in rows if c >= 128]
        return max(r["rss after"] for r in overload) - min(r["rss MB"] for r in overload) if overload \
            else float("nan")

    def whole(rows: dict[int, dict]) -> float:
        return rows[ladder[-1]]["rss after"] - rows[ladder[0]]["rss MB"]

    targets = [("same model: top-1 agrees on every image", agree == len(blobs), f"{agree}/{len(blobs)}")]
    for count in ladder:
        o, t = ours_rows[count], theirs_rows[count]
        targets.append((f"{count} clients: ok/s >= 1.5x TorchServe's", o["ok/s"] >= 1.5 * t["ok/s"],
                        f"{o['ok/s']:.0f} / {t['ok/s']:.0f} = {ratio(o['ok/s'], t['ok/s']):.2f}x at load "
                        f"{o['load']:.1f} / {t['load']:.1f}"))
        targets.append((f"{count} clients: p99 <= TorchServe's", o["p99"] <= t["p99"],
                        f"{o['p99']:.0f} vs {t['p99']:.0f} ms = {ratio(o['p99'], t['p99']):.2f}x"))
    targets.append((f"memory flat under overload (tree RSS across the >= 128-client steps grows < {MEMORY_FLAT_MB} MB)",
                    growth(ours_rows) < MEMORY_FLAT_MB,
                    f"ours {growth(ours_rows):+.0f} MB, TorchServe {growth(theirs_rows):+.0f} MB (whole ladder: ours "
                    f"{whole(ours_rows):+.0f} MB, TorchServe {whole(theirs_rows):+.0f} MB)"))
    print("\nTargets (issue 18, against TorchServe 0.12):")
    for name, met, figure in targets:
        print(f"  {'met   ' if met else 'MISSED'} {name}: {figure}")
    print(json.dumps({"ours": ours_rows, "torchserve": theirs_rows, "top1_agree": [agree, len(blobs)]}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
