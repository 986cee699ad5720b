"""``bentoml serve`` of this service in a subprocess on a free localhost port.

For the end-to-end tests and ``bench/serve.py``; the service itself never imports it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


class LocalServer:
    """``bentoml serve serving.service:Classifier`` with ``BENTOML_HOME=home``, output in a log file.

    Args:
        home: the BentoML home (model store) and where the log goes.
        **env: extra environment (``SERVING_MODEL``, ``SERVING_BATCHING``, ...); an empty value
            unsets the variable, so the service falls back to its default.
    """

    def __init__(self, home: Path, **env: str) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(home) / f"server-{self.port}.log"
        full_env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", **env}
        for key in [k for k, v in env.items() if not v]:
            full_env.pop(key)
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bentoml", "serve", "serving.service:Classifier", "--port", str(self.port)],
                cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def wait_ready(self, timeout: float = 120) -> None:
        """Return once /readyz answers 200; stop the server and raise if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def stop(self) -> int:
        """SIGTERM, then wait; the exit status (the process group is killed after 30 s)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def log(self) -> str:
        """The last 5,000 characters the server wrote."""
        return self.log_path.read_text()[-5000:]
