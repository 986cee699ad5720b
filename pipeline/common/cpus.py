"""How many CPUs this process may actually use, and every thread and worker count derived from it.

``os.cpu_count()`` counts the machine's cores, but a process pinned with ``taskset``, a Docker
container with ``--cpus`` or a Kubernetes pod with a CPU limit gets fewer. Sizing thread
pools by the machine makes threads queue for a share they cannot have. Every count the
pipeline and the service use is decided here, one function per decision, from
:func:`usable_cpus`; nothing else calls ``os.cpu_count()`` or keeps a library's default (torch
and onnxruntime both count the machine's cores). Stdlib only, so it ships in the Bento.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _own_cgroups(proc_cgroup: Path) -> tuple[str, str]:
    """This process's cgroup v2 path and v1 ``cpu`` controller path (``/`` when unknown)."""
    v2 = v1 = "/"
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return v2, v1
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            v2 = path or "/"
        elif "cpu" in controllers.split(","):
            v1 = path or "/"
    return v2, v1


def _dirs_up(base: Path, cgroup: str) -> list[Path]:
    """``base/cgroup`` and every parent up to ``base``: a limit anywhere above applies too.

    Inside a container the cgroup namespace makes the own cgroup ``/`` (just ``base``); on a
    host the path names a slice whose parents may carry the quota.
    """
    parts = [p for p in cgroup.strip("/").split("/") if p and p != ".."]
    return [base.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _quota_v2(directory: Path) -> float | None:
    """CPUs allowed by ``cpu.max`` (``"max 100000"`` or ``"150000 100000"``), None if unlimited."""
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max" or float(period) <= 0:
        return None
    return float(quota) / float(period)


def _quota_v1(directory: Path) -> float | None:
    """CPUs allowed by ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1 = unlimited)."""
    try:
        quota = float((directory / "cpu.cfs_quota_us").read_text())
        period = float((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def cgroup_cpu_limit(cgroup_root: str | Path = "/sys/fs/cgroup",
                     proc_cgroup: str | Path = "/proc/self/cgroup") -> float | None:
    """The tightest CPU quota (in CPUs, may be fractional) over cgroup v2 and v1; None if none."""
    root = Path(cgroup_root)
    v2_path, v1_path = _own_cgroups(Path(proc_cgroup))
    limits = [_quota_v2(d) for d in _dirs_up(root, v2_path)]
    # v1 mounts the controller as cpu/, cpu,cpuacct/ or cpuacct,cpu/ (often symlinked together)
    for controller in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        if (root / controller).is_dir():
            limits += [_quota_v1(d) for d in _dirs_up(root / controller, v1_path)]
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None


def usable_cpus(cgroup_root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup") -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v1/v2 CPU quota.

    A fractional quota rounds up (1.5 CPUs → 2 threads: the second thread still gets half a
    CPU of work done); never less than 1. Both paths are parameters so tests can pass a fake tree.
    """
    cpus = _affinity()
    limit = cgroup_cpu_limit(cgroup_root, proc_cgroup)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


# ----------------------------------------------------------------------------- the decisions
def torch_threads() -> int:
    """torch threads of a stage that runs a trained model on the CPU (evaluate, export)."""
    return usable_cpus()


def onnx_check_threads() -> int:
    """onnxruntime intra-op threads of a pipeline-side session (export's checks, the registry's
    signature): one process alone on the machine, so every usable CPU."""
    return usable_cpus()


def preprocess_workers(setting: int) -> int:
    """Decoding processes of the preprocess stage: ``preprocess.workers``, 0 = every usable CPU."""
    return setting or usable_cpus()


def train_thread_ceiling(usable: int, ranks: int) -> int:
    """Most torch threads one training process may take: the usable CPUs shared by the ``ranks``
    DDP processes on this machine."""
    return max(1, usable // ranks)


def train_threads(setting: int | str, usable: int, ranks: int) -> int:
    """torch threads per training process for ``train.threads`` (a total over the machine's ranks;
    0 or ``"adaptive"``, where the pacer starts, = the ceiling)."""
    if setting in (0, "adaptive"):
        return train_thread_ceiling(usable, ranks)
    return max(1, int(setting) // ranks)


def server_workers(cpus: int) -> int:
    """``bentoml serve`` worker processes: one per usable CPU (bench/serve.py: workers x 1 thread
    beats one worker with a thread per core)."""
    return cpus


def server_session_threads() -> int:
    """onnxruntime intra-op threads of one serving worker's session: its workers share the CPUs."""
    return 1


def decode_threads(cpus: int, workers: int) -> int:
    """Image-decoding threads per serving worker: the CPUs its workers leave over, at least one."""
    return max(1, math.ceil(cpus / max(1, workers)))


if __name__ == "__main__":
    print(usable_cpus())
