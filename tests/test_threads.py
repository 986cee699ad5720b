"""CPU threads: the usable-CPU count (affinity, cgroup quota) and the training thread pacer."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from pipeline.common.cpus import cgroup_cpu_limit, usable_cpus
from pipeline.lib import pacing
from pipeline.lib.config import Params, ParamsError, load_params
from pipeline.lib.pacing import ThreadPacer, candidate_counts

ROOT = Path(__file__).resolve().parent.parent
AFFINITY = len(os.sched_getaffinity(0))


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ----------------------------------------------------------------------------- usable_cpus
def test_cgroup_v2_quota_caps_the_count(tmp_path):
    write(tmp_path / "cpu.max", "50000 100000\n")  # half a CPU: still one thread
    assert cgroup_cpu_limit(tmp_path, tmp_path / "none") == 0.5
    assert usable_cpus(tmp_path) == 1


def test_cgroup_v2_fractional_quota_rounds_up(tmp_path):
    write(tmp_path / "cpu.max", "150000 100000\n")
    assert usable_cpus(tmp_path) == min(AFFINITY, 2)


def test_cgroup_v2_without_quota_is_the_affinity(tmp_path):
    write(tmp_path / "cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(tmp_path, tmp_path / "none") is None
    assert usable_cpus(tmp_path) == AFFINITY


def test_cgroup_v1_quota(tmp_path):
    write(tmp_path / "cpu,cpuacct" / "cpu.cfs_quota_us", "100000\n")
    write(tmp_path / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(tmp_path, tmp_path / "none") == 1.0
    assert usable_cpus(tmp_path) == 1
    write(tmp_path / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")  # unlimited
    assert usable_cpus(tmp_path) == AFFINITY


def test_a_quota_on_a_parent_cgroup_applies(tmp_path):
    # On a host (no cgroup namespace) the process sits in a slice; a limit set above it counts.
    write(tmp_path / "proc_cgroup", "0::/kubepods/pod1/container\n")
    write(tmp_path / "root" / "kubepods" / "pod1" / "cpu.max", "200000 100000\n")
    write(tmp_path / "root" / "kubepods" / "pod1" / "container" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(tmp_path / "root", tmp_path / "proc_cgroup") == 2.0
    write(tmp_path / "proc_v1", "4:cpu,cpuacct:/docker/abc\n")
    write(tmp_path / "v1" / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "300000\n")
    write(tmp_path / "v1" / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(tmp_path / "v1", tmp_path / "proc_v1") == 3.0


def test_no_cgroup_files_is_the_affinity(tmp_path):
    assert cgroup_cpu_limit(tmp_path, tmp_path / "none") is None
    assert usable_cpus(tmp_path) == AFFINITY


def test_affinity_mask_caps_the_count(tmp_path):
    # taskset's effect, for real: a child pinned to one CPU counts one.
    code = ("import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from pipeline.common.cpus import usable_cpus; print(usable_cpus(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip() == "1", done.stderr


# ----------------------------------------------------------------------------- params
def test_threads_param_takes_counts_and_adaptive(tmp_path):
    assert Params.model_validate({"train": {"threads": "adaptive"}}).train.threads == "adaptive"
    assert Params.model_validate({"train": {"threads": 3}}).train.threads == 3
    for bad in ("fast", -1, "2", True):
        write(tmp_path / "params.yaml", f"train:\n  threads: {bad!r}\n" if isinstance(bad, str) else
              f"train:\n  threads: {str(bad).lower()}\n")
        with pytest.raises(ParamsError, match=r"params.yaml: train.threads: expected a whole number >= 0 .*'adaptive'"):
            load_params(tmp_path / "params.yaml")


# ----------------------------------------------------------------------------- pacer
@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_queueing(monkeypatch):
    """The runqueue check reads the real scheduler; on a busy test machine it would fire."""
    monkeypatch.setattr(pacing, "runqueue_wait_seconds", lambda: 0.0)


def test_candidate_counts():
    assert candidate_counts(1) == [1]
    assert candidate_counts(2) == [1, 2]
    assert candidate_counts(6) == [1, 2, 4, 6]


def test_fixed_count_sizes_to_usable_cpus_and_ranks(torch_threads):
    assert ThreadPacer(0, usable=4).threads == 4
    assert torch.get_num_threads() == 4
    assert ThreadPacer(0, usable=4, world=2).threads == 2  # two ranks share the machine
    assert ThreadPacer(3, usable=8).threads == 3


def test_adaptive_keeps_the_fastest_count(torch_threads, no_queueing, caplog):
    # step time as a function of the thread count in force: 1 thread fastest on a busy machine,
    # then the load goes away and epoch 2 re-measures
    busy, quiet = {1: 1e-4, 2: 3e-4, 4: 5e-4}, {1: 5e-4, 2: 3e-4, 4: 1e-4}
    pacer = ThreadPacer("adaptive", usable=4)
    caplog.set_level(logging.INFO, "pipeline.lib.pacing")
    for epoch, per_image, best in ((1, busy, 1), (2, quiet, 4)):
        pacer.start_epoch(epoch)
        for _ in range(200):  # long epochs: a trial costs little, one every epoch
            pacer.step_done(per_image[torch.get_num_threads()] * 64, 64)
        assert pacer.threads == best and torch.get_num_threads() == best
    assert "epoch 1: 1 thread (adaptive" in caplog.text and "epoch 2: 4 threads (adaptive" in caplog.text
    assert "WARNING" not in caplog.text


def test_adaptive_spaces_trials_to_keep_their_cost_near_5_percent(torch_threads, no_queueing, caplog):
    # 20-step epochs on a busy machine: the cut-short 2- and 4-thread steps cost 6 steps' worth
    # per trial, so re-measuring every epoch would cost 30%
    per_image = {1: 1e-4, 2: 3e-4, 4: 5e-4}
    pacer = ThreadPacer("adaptive", usable=4)
    caplog.set_level(logging.INFO, "pipeline.lib.pacing")
    spent = 0.0
    for epoch in range(1, 13):
        pacer.start_epoch(epoch)
        for _ in range(20):
            spent += per_image[torch.get_num_threads()] * 64
            pacer.step_done(per_image[torch.get_num_threads()] * 64, 64)
    trials = [r.getMessage() for r in caplog.records if "adaptive" in r.getMessage()]
    assert [t.split(":")[0] for t in trials] == ["epoch 1", "epoch 7"]
    assert spent / (12 * 20 * 64 * per_image[1]) <= 1.051


def test_adaptive_trial_spans_short_epochs(torch_threads, no_queueing):
    per_image = {1: 1e-4, 2: 3e-4}
    pacer = ThreadPacer("adaptive", usable=2)
    for epoch in range(1, 6):  # 2 steps per epoch, 8 needed to time both counts
        pacer.start_epoch(epoch)
        for _ in range(2):
            pacer.step_done(per_image[torch.get_num_threads()] * 64, 64)
    assert pacer.threads == 1 and torch.get_num_threads() == 1


def test_slowdown_within_an_epoch_warns_once_with_the_factor(torch_threads, no_queueing, caplog):
    pacer = ThreadPacer(2, usable=2)
    pacer.start_epoch(1)
    for seconds in [0.5] + [0.01] * 10 + [0.03] * 20:  # warm-up step, quiet start, then 3x slower
        pacer.step_done(seconds, 64)
    pacer.start_epoch(2)
    for _ in range(30):
        pacer.step_done(0.05, 64)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "3.0x slower than at the start of epoch 1" in warnings[0] and "train.threads: 1" in warnings[0]


def test_steady_steps_do_not_warn(torch_threads, no_queueing, caplog):
    pacer = ThreadPacer(2, usable=2)
    pacer.start_epoch(1)
    for seconds in [0.5] + [0.01, 0.012, 0.011] * 20:
        pacer.step_done(seconds, 64)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_threads_queued_for_a_cpu_from_the_start_warn(torch_threads, monkeypatch, caplog):
    # contention present before training starts: no slowdown to see, but the scheduler says
    # our 2 threads spent 40% of their time waiting for a CPU
    clock = {"now": 0.0, "waited": 0.0}
    monkeypatch.setattr(pacing, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    monkeypatch.setattr(pacing, "runqueue_wait_seconds", lambda: clock["waited"])
    pacer = ThreadPacer(2, usable=2)
    pacer.start_epoch(1)
    for _ in range(10):
        clock["now"] += 0.01
        clock["waited"] += 0.01 * 2 * 0.4
        pacer.step_done(0.01, 64)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "waited for a CPU 40% of the time" in warnings[0], warnings


def test_one_thread_never_warns(torch_threads, no_queueing, caplog):
    pacer = ThreadPacer(1, usable=2)
    pacer.start_epoch(1)
    for seconds in [0.01] * 6 + [0.1] * 20:
        pacer.step_done(seconds, 64)
    assert not caplog.records


def test_runqueue_wait_is_read_from_the_scheduler():
    waited = pacing.runqueue_wait_seconds()
    if sys.platform.startswith("linux") and Path("/proc/self/schedstat").exists():
        assert isinstance(waited, float) and waited >= 0
    else:
        assert waited is None
