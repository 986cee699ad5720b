"""The service as deployed: nginx (the HTTP front, ``serving/front/nginx.conf``) in front of
``bentoml serve serving.service:Classifier`` on a loopback port.

:func:`run_stack` is what ``python -m pipeline.serve`` (and so ``make serve``) runs in the
foreground; :class:`LocalServer` starts that command in a subprocess on a free localhost port, for
the end-to-end tests and ``bench/serve.py``. The service itself never imports this module.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from pipeline.common.cpus import usable_cpus
from pipeline.common.envsettings import describe as env_lines
from pipeline.common.envsettings import env_field, read_env
from pipeline.common.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
FRONT_TEMPLATE = ROOT / "serving" / "front" / "nginx.conf"
FRONT_PACKAGE = "nginx"  # the Debian package with /usr/sbin/nginx
ECHO_PACKAGE = "libnginx-mod-http-echo"  # nginx's echo module (echo_sleep), for FRONT_REJECT_DELAY_MS
ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")
STOP_GRACE_S = 20


@dataclass(frozen=True)
class FrontSettings:
    """The front's limits, each read from the ``FRONT_*`` variable in its metadata (integers)."""

    max_body_bytes: int = env_field("FRONT_MAX_BODY_BYTES", 10 * 1024 * 1024, "request body limit → 413 (JSON)")
    header_timeout_s: int = env_field("FRONT_HEADER_TIMEOUT", 10, "seconds for the whole header block → closed (408)")
    body_timeout_s: int = env_field("FRONT_BODY_TIMEOUT", 20, "seconds between two reads of the body → closed (408)")
    answer_timeout_s: int = env_field("FRONT_ANSWER_TIMEOUT", 60,
                                 "seconds between two reads of the service's answer → 503 (above SERVING_TIMEOUT)")
    max_requests: int = env_field("FRONT_MAX_REQUESTS", 512,
                             "requests in progress (body arriving or with the service) → 503 + Retry-After, "
                             "before the body is read")
    max_service_requests: int = env_field("FRONT_MAX_SERVICE_REQUESTS", 0,
                                     "requests with the service at once (bodies in) → 503 + Retry-After "
                                     "(0: 16 per usable CPU)")
    max_requests_per_client: int = env_field("FRONT_MAX_REQUESTS_PER_CLIENT", 0,
                                        "requests in progress from one IP address → 503 (0: FRONT_MAX_REQUESTS)")
    max_connections: int = env_field("FRONT_MAX_CONNECTIONS", 4096,
                                "open connections per nginx worker, clients and service together")
    backlog: int = env_field("FRONT_BACKLOG", 4096, "connections waiting to be accepted (capped by net.core.somaxconn)")
    workers: int = env_field("FRONT_WORKERS", 1, "nginx worker processes (one serves thousands of connections)")
    service_connection_requests: int = env_field(
        "FRONT_SERVICE_CONNECTION_REQUESTS", 4,
        "requests per kept-alive connection to the service, then a new one (spreads them over its workers)")
    reject_delay_ms: int = env_field(
        "FRONT_REJECT_DELAY_MS", 50,
        "an overload 503 is sent after this wait, so clients that retry at once cannot spin the CPUs "
        f"(0: at once; needs nginx's echo module, Debian '{ECHO_PACKAGE}')")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> FrontSettings:
        """Settings from ``env`` (default ``os.environ``); a bad value is a :class:`UserError` naming it."""
        values = read_env(cls, env, minimums={"max_requests_per_client": 0, "max_service_requests": 0,
                                              "reject_delay_ms": 0},
                          error=UserError)
        return cls(**values)


def describe_front() -> str:
    """A table of the front's settings: variable, value here, meaning."""
    return "\n".join(env_lines(FrontSettings.from_env()))


def front_binary() -> str:
    """The nginx executable: ``FRONT_NGINX`` if set, else ``nginx`` on PATH or in ``/usr/sbin`` (off a
    normal user's PATH); a one-line error naming the Debian package when there is none."""
    configured = os.environ.get("FRONT_NGINX", "").strip()
    if configured:
        found = shutil.which(configured)
    else:
        found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise UserError(f"nginx not found: the HTTP front needs it; install the Debian package "
                        f"'{FRONT_PACKAGE}' (sudo apt-get install -y {FRONT_PACKAGE})")
    return found


def front_config(settings: FrontSettings, host: str, port: int, upstream: str, run_dir: Path) -> str:
    """``serving/front/nginx.conf`` with its ``{{name}}`` fields filled in."""
    values = {**dataclasses.asdict(settings), "host": host, "port": port, "upstream": upstream,
              "run_dir": str(run_dir), "front_workers": settings.workers,
              "max_requests_per_client": settings.max_requests_per_client or settings.max_requests,
              "max_service_requests": settings.max_service_requests or 16 * usable_cpus(),
              "body_buffer_bytes": min(settings.max_body_bytes, 1024 * 1024),
              # nginx started by root runs its workers as "nobody", who cannot write the run folder
              # (bodies over the buffer go to temp files there): keep them as the launching user.
              "user_directive": "user root;" if os.geteuid() == 0 else "",
              **overload_reply(settings.reject_delay_ms)}
    text = FRONT_TEMPLATE.read_text()
    for name, value in values.items():
        text = text.replace("{{" + name + "}}", str(value))
    if "{{" in text:
        raise RuntimeError(f"{FRONT_TEMPLATE}: unfilled field at {text[text.index('{{'):][:40]!r}")
    return text


def overload_reply(delay_ms: int) -> dict[str, str]:
    """How the front sends an overload 503: after ``delay_ms`` (nginx's echo module: ``echo_sleep``, then
    the usual answer), else at once. A client that ignores ``Retry-After`` and retries at once would
    otherwise make thousands of rejections a second, and their CPU is taken from the answers."""
    if delay_ms > 0 and ECHO_MODULE.is_file():
        return {"load_modules": f"load_module {ECHO_MODULE};", "reject_prefix": "/__front/wait",
                "reject_wait_location": "location ~ ^/__front/wait(/__front/50[23])$ { internal; "
                                        f"echo_sleep {delay_ms / 1000:.3f}; echo_exec $1; }}"}
    if delay_ms > 0:
        print(f"front: overload 503s are sent at once: FRONT_REJECT_DELAY_MS needs nginx's echo module "
              f"(sudo apt-get install -y {ECHO_PACKAGE})", file=sys.stderr, flush=True)
    return {"load_modules": "", "reject_prefix": "", "reject_wait_location": ""}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def run_stack(host: str, port: int, run_dir: Path | None = None, service_port: int | None = None) -> int:
    """Run nginx on ``host:port`` in front of ``bentoml serve`` on 127.0.0.1 until either exits or
    this process gets SIGINT/SIGTERM; then stop both. Returns the exit status (the service's when it
    failed, 0 after a signal).

    Args:
        host, port: where clients connect (the front).
        run_dir: nginx's prefix (config, pid, temp files, access log); default a fresh temp folder,
            removed at the end.
        service_port: the service's loopback port (default: a free one).
    """
    settings = FrontSettings.from_env()
    nginx = front_binary()
    service_port = service_port or free_port()
    owned = run_dir is None
    run_dir = Path(tempfile.mkdtemp(prefix="front-")) if run_dir is None else Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "nginx.conf").write_text(front_config(settings, host, port, f"127.0.0.1:{service_port}", run_dir))
    print(f"front: nginx on {host}:{port} → service on 127.0.0.1:{service_port} (nginx prefix {run_dir})",
          flush=True)
    stopping: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    children: list[subprocess.Popen] = []
    try:
        children.append(subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", "serving.service:Classifier", "--host", "127.0.0.1",
             "--port", str(service_port)], cwd=ROOT))
        children.append(subprocess.Popen([nginx, "-e", "stderr", "-p", str(run_dir), "-c", "nginx.conf"], cwd=run_dir))
        while not stopping and all(child.poll() is None for child in children):
            time.sleep(0.2)
        failed = [child for child in children if child.poll() not in (None, 0)]
        return 0 if stopping else (failed[0].returncode if failed else 1)
    finally:
        _stop_all(children)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if owned:
            shutil.rmtree(run_dir, ignore_errors=True)


def _stop_all(children: list[subprocess.Popen]) -> None:
    """SIGTERM (nginx: fast shutdown; bentoml: graceful), then SIGKILL after the grace period."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


class LocalServer:
    """``python -m pipeline.serve`` (nginx + ``bentoml serve``) on a free localhost port, with
    ``BENTOML_HOME=home`` and its output in a log file there.

    Args:
        home: the BentoML home (model store), where the log and the front's folder go.
        **env: extra environment (``SERVING_MODEL``, ``SERVING_BATCHING``, ``FRONT_*``, ...); an
            empty value unsets the variable, so its default applies.
    """

    def __init__(self, home: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(home) / f"server-{self.port}.log"
        self.front_dir = Path(home) / f"front-{self.port}"
        full_env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", **env}
        for key in [k for k, v in env.items() if not v]:
            full_env.pop(key)
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pipeline.serve", "--host", "127.0.0.1", "--port", str(self.port),
                 "--run-dir", str(self.front_dir)],
                cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def wait_ready(self, timeout: float = 120) -> None:
        """Return once /readyz answers 200 through the front; stop and raise if it exits or times out."""
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
        """SIGTERM to the launcher (it stops nginx and the service), then wait; the process group is
        killed if it is still there after the launcher's grace period. The launcher's exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_GRACE_S + 10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def access_log(self) -> str:
        """The front's access log (one line per answer, with its status)."""
        path = self.front_dir / "access.log"
        return path.read_text() if path.exists() else ""

    def log(self) -> str:
        """The last 5,000 characters the server wrote."""
        return self.log_path.read_text()[-5000:]
