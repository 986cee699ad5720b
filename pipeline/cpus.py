"""How many CPUs this process may really use: affinity and cgroup quotas, not ``os.cpu_count()``.

In a container ``os.cpu_count()`` reports the host's cores, while the CPU quota of the
cgroup (``docker run --cpus 2``, a Kubernetes ``limits.cpu``) is what the scheduler grants:
sizing thread pools and workers by the host count oversubscribes the quota and gets the
process throttled. Standard library only, so it ships in the Bento (bentofile.yaml).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroup_dirs(cgroup_root: Path, proc_cgroup: Path) -> list[Path]:
    """The cgroup folders that hold this process's quota: its own path under each hierarchy,
    then the root (a container sees its own cgroup mounted as the root)."""
    dirs: list[Path] = []
    text = _read(proc_cgroup) or ""
    for line in text.splitlines():
        parts = line.split(":", 2)  # "hierarchy-id:controllers:path"; v2 is "0::/path"
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.lstrip("/")
        if controllers == "":  # v2 unified hierarchy
            dirs.append(cgroup_root / rel)
        elif "cpu" in controllers.split(","):  # v1: cpu or cpu,cpuacct
            for mount in (cgroup_root / "cpu", cgroup_root / "cpu,cpuacct", cgroup_root / "cpuacct,cpu"):
                dirs.append(mount / rel)
                dirs.append(mount)
    dirs.append(cgroup_root)
    return [d for i, d in enumerate(dirs) if d not in dirs[:i]]


def cgroup_quota(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota in CPUs (``cpu.max`` on cgroup v2, ``cpu.cfs_quota_us / cpu.cfs_period_us``
    on v1), or None when there is none. The smallest quota found on the way up counts."""
    quotas: list[float] = []
    for folder in _own_cgroup_dirs(cgroup_root, proc_cgroup):
        v2 = _read(folder / "cpu.max")  # "max 100000" or "200000 100000"
        if v2:
            fields = v2.split()
            if len(fields) >= 1 and fields[0] != "max":
                try:
                    period = int(fields[1]) if len(fields) > 1 else 100_000
                    if int(fields[0]) > 0 and period > 0:
                        quotas.append(int(fields[0]) / period)
                except ValueError:
                    pass
        quota, period_text = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
        if quota and period_text:
            try:
                if int(quota) > 0 and int(period_text) > 0:  # -1 = no quota
                    quotas.append(int(quota) / int(period_text))
            except ValueError:
                pass
    return min(quotas) if quotas else None


def usable_cpus(cgroup_root: Path | str = CGROUP_ROOT, proc_cgroup: Path | str = Path("/proc/self/cgroup")) -> int:
    """CPUs this process can use: its affinity mask, capped by a cgroup quota (rounded up, at least 1).

    Args:
        cgroup_root: where the cgroup filesystem is mounted (tests pass a fake tree).
        proc_cgroup: this process's cgroup membership file.
    """
    count = _affinity()
    quota = cgroup_quota(Path(cgroup_root), Path(proc_cgroup))
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


if __name__ == "__main__":
    print(usable_cpus())
