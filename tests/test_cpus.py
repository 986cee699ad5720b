"""pipeline.common.cpus: usable CPUs from the affinity mask and cgroup v1/v2 quotas (fake cgroup trees)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.common import cpus


def tree(root: Path, files: dict[str, str], membership: str) -> tuple[Path, Path]:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc = root / "proc_self_cgroup"
    proc.write_text(membership)
    return root, proc


@pytest.fixture
def eight_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("files", "membership", "want"), [
    ({"cpu.max": "max 100000\n"}, "0::/\n", 8),  # v2, no quota
    ({"cpu.max": "200000 100000\n"}, "0::/\n", 2),  # v2: docker --cpus 2, cgroup mounted as the root
    ({"kubepods/pod1/cpu.max": "150000 100000\n", "cpu.max": "max 100000"}, "0::/kubepods/pod1\n", 2),  # 1.5 → 2
    ({"kubepods/pod1/cpu.max": "50000 100000\n"}, "0::/kubepods/pod1\n", 1),  # half a CPU: at least 1
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, "4:cpu,cpuacct:/\n", 3),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, "4:cpu:/\n", 8),  # v1 unlimited
    ({"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "400000", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"},
     "4:cpu,cpuacct:/docker/abc\n", 4),  # v1 nested
    ({"cpu.max": "garbage"}, "0::/\n", 8),  # unreadable quota: ignored
    ({"cpu.max": "1600000 100000\n"}, "0::/\n", 8),  # a quota above the affinity: the affinity
    ({}, "", 8),  # no cgroup files at all (macOS, a bare chroot)
])
def test_usable_cpus_from_fake_cgroups(tmp_path: Path, eight_cpus, files: dict, membership: str, want: int) -> None:
    root, proc = tree(tmp_path, files, membership)
    assert cpus.usable_cpus(cgroup_root=root, proc_cgroup=proc) == want


@pytest.mark.timeout(10)
def test_usable_cpus_honours_the_affinity_mask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3}, raising=False)
    root, proc = tree(tmp_path, {"cpu.max": "800000 100000"}, "0::/\n")
    assert cpus.usable_cpus(cgroup_root=root, proc_cgroup=proc) == 2


@pytest.mark.timeout(10)
def test_usable_cpus_on_this_machine_is_within_the_affinity() -> None:
    assert 1 <= cpus.usable_cpus() <= len(os.sched_getaffinity(0))


@pytest.mark.timeout(10)
def test_serving_defaults_follow_the_usable_cpus() -> None:
    from serving.settings import Settings

    for count in (1, 2, 8):
        settings = Settings.from_env(env={}, cpus=count)
        assert (settings.workers, settings.threads, settings.decode_threads) == (count, 1, 1)
    pinned = Settings.from_env(env={"SERVING_WORKERS": "1"}, cpus=4)
    assert (pinned.workers, pinned.decode_threads) == (1, 4)  # one process: decode on every CPU
    with pytest.raises(ValueError, match="SERVING_WORKERS=0"):
        Settings.from_env(env={"SERVING_WORKERS": "0"}, cpus=2)


@pytest.mark.timeout(10)
def test_training_threads_share_the_usable_cpus_among_the_ranks() -> None:
    assert [cpus.train_threads(setting, usable=8, ranks=2) for setting in (0, "adaptive", 6, 1)] == [4, 4, 3, 1]
    assert cpus.train_thread_ceiling(usable=3, ranks=4) == 1  # never 0, however many ranks
    assert cpus.preprocess_workers(3) == 3 and cpus.preprocess_workers(0) == cpus.usable_cpus()
    assert cpus.decode_threads(cpus=8, workers=3) == 3 and cpus.decode_threads(cpus=2, workers=8) == 1


@pytest.mark.timeout(10)
def test_thread_counts_are_decided_in_cpus_only() -> None:
    """Nothing else counts the machine's cores, and the pipeline opens onnxruntime sessions in one
    place only (whose thread count cpus.onnx_check_threads decides)."""
    root = Path(__file__).resolve().parent.parent
    sources = {p.relative_to(root).as_posix(): p.read_text()
               for package in ("pipeline", "models", "serving") for p in (root / package).rglob("*.py")}
    assert [name for name, text in sources.items() if "cpu_count(" in text] == ["pipeline/common/cpus.py"]
    sessions = [name for name, text in sources.items() if "InferenceSession(" in text and name.startswith("pipeline")]
    assert sessions == ["pipeline/lib/onnx_checks.py"]
    threads = [name for name, text in sources.items() if "set_num_threads(" in text]
    assert all("pipeline.common.cpus import" in sources[name] for name in threads), threads
