"""Serving throughput: ``bentoml serve`` under load against the in-process ceiling.

    python bench/serve.py [--model-dir artifacts/export] [--requests 2000] [--clients 32]

Both contenders classify the same encoded images (``--distinct`` files spread over
``--images``, default ``data/``; synthetic PNGs if there is none):

  ceiling   one process, no HTTP: pipeline.images.preprocess + onnxruntime, one image at a
            time (the loop a user would write), and the same with batches of 32; measured
            before and after the servers, the better run counts (the machine may be shared)
  service   ``bentoml serve serving.service:Classifier`` on loopback (``--workers`` processes),
            ``--clients`` threads with keep-alive connections sending ``--requests`` multipart
            POSTs to /predict, once with adaptive batching on and once with SERVING_BATCHING=0

The load generator shares the machine with the server, so the ratios are pessimistic.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from pipeline import images  # noqa: E402
from serving.local import LocalServer  # noqa: E402


def load_images(folder: Path | None, count: int) -> list[bytes]:
    """``count`` encoded images: files under ``folder`` (sorted, cycled), or synthetic 28×28 PNGs."""
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder and folder.is_dir() else []
    if files:
        return [files[i * len(files) // count].read_bytes() for i in range(count)] if len(files) >= count \
            else [files[i % len(files)].read_bytes() for i in range(count)]
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(buffer, "PNG")
        blobs.append(buffer.getvalue())
    return blobs


def model_input(model_dir: Path) -> tuple[int, int]:
    """(image_size, channels) from the classifier's metadata."""
    import onnxruntime as ort

    meta = ort.InferenceSession(str(model_dir / "classifier.onnx"), providers=["CPUExecutionProvider"])
    props = meta.get_modelmeta().custom_metadata_map
    return int(props["image_size"]), int(props["channels"])


def ceiling(model_dir: Path, blobs: list[bytes], count: int, batch: int) -> dict:
    """Images/s of preprocess + onnxruntime in this process, ``batch`` images per run."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_dir / "classifier.onnx"), providers=["CPUExecutionProvider"])
    size, channels = model_input(model_dir)
    for blob in blobs[:8]:  # warm-up
        session.run(["probabilities"], {"image": images.preprocess(blob, size, channels)[None]})
    latencies, start = [], time.perf_counter()
    for first in range(0, count, batch):
        t0 = time.perf_counter()
        arrays = [images.preprocess(blobs[i % len(blobs)], size, channels) for i in range(first, first + batch)]
        session.run(["probabilities"], {"image": np.stack(arrays)})
        latencies.append((time.perf_counter() - t0) * 1e3)
    elapsed = time.perf_counter() - start
    done = (count + batch - 1) // batch * batch
    return {"rps": done / elapsed, "p50": float(np.percentile(latencies, 50)),
            "p99": float(np.percentile(latencies, 99)), "errors": 0}


BOUNDARY = "bench-serve-boundary-7f3a9c"


def multipart_body(blob: bytes) -> bytes:
    """A ``multipart/form-data`` body with ``blob`` as the ``image`` field (built once per image)."""
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="image.png"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n")
    return head.encode() + blob + f"\r\n--{BOUNDARY}--\r\n".encode()


def load(url: str, blobs: list[bytes], requests: int, clients: int) -> dict:
    """``requests`` POST /predict from ``clients`` threads; requests/s, latency percentiles, errors.

    Each thread keeps one ``http.client`` connection and sends prebuilt bodies, like wrk or hey:
    the generator shares the CPUs with the server, so it should cost as little as possible
    (measured: 0.3 ms of CPU per request, against 2 to 2.8 ms with httpx building each upload).
    """
    host, port = url.removeprefix("http://").split(":")
    bodies = [multipart_body(blob) for blob in blobs]
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            t0 = time.perf_counter()
            try:
                connection.request("POST", "/predict", body=bodies[i % len(bodies)], headers=headers)
                response = connection.getresponse()
                text = response.read()
                error = "" if response.status == 200 else f"{response.status} {text[:100]!r}"
            except (OSError, http.client.HTTPException) as err:
                error = f"{type(err).__name__}: {err}"
                connection.close()  # reconnects on the next request
            elapsed = (time.perf_counter() - t0) * 1e3
            with lock:
                latencies.append(elapsed)
                if error:
                    errors.append(error)
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    return {"rps": requests / elapsed, "p50": float(np.percentile(latencies, 50)),
            "p99": float(np.percentile(latencies, 99)), "errors": len(errors), "first_error": errors[:1]}


def batch_sizes(url: str) -> float:
    """Mean images per onnxruntime call of /predict, from the server's Prometheus metrics."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = sum(float(v) for v in re.findall(r"^classifier_batch_size_sum\S* (\S+)$", text, re.M))
    count = sum(float(v) for v in re.findall(r"^classifier_batch_size_count\S* (\S+)$", text, re.M))
    return total / count if count else float("nan")


def serve_and_load(model_dir: Path, home: Path, blobs: list[bytes], args: argparse.Namespace,
                   env: dict[str, str]) -> dict:
    server = LocalServer(home, SERVING_MODEL=str(model_dir.resolve()), **env)
    try:
        server.wait_ready()
        load(server.url, blobs, min(200, args.requests), args.clients)  # warm-up, and the batcher's training
        result = load(server.url, blobs, args.requests, args.clients)
        result["batch"] = batch_sizes(server.url)
        return result
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description="Serving throughput against the in-process ceiling.")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "artifacts" / "export",
                        help="folder with classifier.onnx and saliency.onnx")
    parser.add_argument("--images", type=Path, default=ROOT / "data", help="image folder (synthetic if absent)")
    parser.add_argument("--distinct", type=int, default=64, help="distinct images to cycle through")
    parser.add_argument("--requests", type=int, default=2000, help="timed /predict requests per server run")
    parser.add_argument("--clients", type=int, default=32, help="concurrent client threads")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="SERVING_WORKERS for the server (default: one per CPU, the README's CPU setting)")
    args = parser.parse_args()
    if not (args.model_dir / "classifier.onnx").is_file():
        print(f"error: {args.model_dir}/classifier.onnx not found (run `python -m pipeline.export`)", file=sys.stderr)
        return 2
    blobs = load_images(args.images, args.distinct)
    size, channels = model_input(args.model_dir)
    print(f"{len(blobs)} distinct images, model input {channels}x{size}x{size}, {os.cpu_count()} CPUs, "
          f"{args.workers} server workers, {args.clients} clients, {args.requests} requests per run, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    def ceilings() -> dict[str, dict]:
        return {"in-process loop, batch 1": ceiling(args.model_dir, blobs, min(args.requests, 500), 1),
                "in-process, batch 32": ceiling(args.model_dir, blobs, min(args.requests, 512), 32)}

    rows = ceilings()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as home:
        workers = {"SERVING_WORKERS": str(args.workers)}
        for name, env in (("service, batching on", {"SERVING_BATCHING": "1"}),
                          ("service, batching off", {"SERVING_BATCHING": "0"})):
            print(f"running {name} ...", flush=True)
            rows[name] = serve_and_load(args.model_dir, Path(home), blobs, args, {**env, **workers})
    # Measured again after the servers: on a shared machine the best of the two is the fair ceiling.
    for name, row in ceilings().items():
        rows[name] = max(rows[name], row, key=lambda r: r["rps"])
    print(f"load average after the runs: {os.getloadavg()[0]:.1f}")

    ceiling_rps = rows["in-process loop, batch 1"]["rps"]
    print(f"\n{'':28} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'× loop':>7} {'batch':>6}")
    for name, row in rows.items():
        batch = f"{row['batch']:.1f}" if "batch" in row else ""
        print(f"{name:28} {row['rps']:8.1f} {row['p50']:8.1f} {row['p99']:8.1f} {row['errors']:7d} "
              f"{row['rps'] / ceiling_rps:7.2f} {batch:>6}")
    on, off = rows["service, batching on"], rows["service, batching off"]
    print(f"\nbatching on / off: {on['rps'] / off['rps']:.2f}x requests/s")
    for name, row in rows.items():
        if row["errors"]:
            print(f"{name}: first error: {row['first_error'][0]}")
    print(json.dumps({name: {k: v for k, v in row.items() if k != "first_error"} for name, row in rows.items()}))
    return 0 if not (on["errors"] or off["errors"]) else 1


if __name__ == "__main__":
    sys.exit(main())
