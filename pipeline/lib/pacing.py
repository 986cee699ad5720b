"""The CPU thread count of the training steps: sized, watched for contention, or re-chosen.

On a shared machine (CI runner, workstation with other jobs) more threads can be much slower:
every step waits at intra-op barriers for its slowest thread, and a thread the scheduler
parks behind another process stalls all of them. LeNet-5 on 2 cores with one busy competitor:
2 threads 3,639 img/s, 1 thread 9,429. So the fixed count warns once when it sees contention,
and ``train.threads: adaptive`` times the candidate counts at each epoch's start and keeps the
fastest (floating-point sums then depend on the machine's load: not bit-reproducible). A trial
costs the steps run at the slower counts, so trials are spaced to keep that under BUDGET of the
training time (every epoch when epochs are long, every few when they are a handful of steps).
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time

import torch

from pipeline.common.cpus import train_thread_ceiling, train_threads

log = logging.getLogger(__name__)

WINDOW = 5  # steps per median: one slow step is noise, five are a trend
SLOWDOWN = 1.5  # recent / epoch-start step time that counts as contention
WAITING = 0.25  # share of the threads' time spent queued for a CPU that counts as contention
TRIAL_WARMUP = 1  # untimed steps after a thread-count change (oneDNN re-plans its kernels)
TRIAL_STEPS = 3  # timed steps per candidate
ABORT = 2.0  # a candidate this much slower than the first one on any step is dropped at once
BUDGET = 0.05  # share of training time re-measuring may cost: sets the epochs between trials


def runqueue_wait_seconds() -> float | None:
    """Seconds this process's threads have spent runnable but queued for a CPU (Linux
    ``/proc/self/task/*/schedstat``, second field); None where the kernel does not say."""
    total, seen = 0, False
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/schedstat") as stat:
                total += int(stat.read().split()[1])
                seen = True
        except (OSError, ValueError, IndexError):  # a thread that just ended
            continue
    return total / 1e9 if seen else None


def candidate_counts(most: int) -> list[int]:
    """1, 2, 4, … below ``most``, and ``most``: few enough to time every epoch."""
    counts, n = {most}, 1
    while n < most:
        counts.add(n)
        n *= 2
    return sorted(counts)


class ThreadPacer:
    """Sets ``torch``'s thread count and sees each training step's duration.

    Args:
        setting: ``train.threads``: a count (0 = ``usable``), or ``"adaptive"``.
        usable: CPUs this process may use (:func:`pipeline.common.cpus.usable_cpus`).
        world: processes sharing those CPUs (DDP ranks on one machine).
    """

    def __init__(self, setting: int | str, usable: int, world: int = 1) -> None:
        self.adaptive = setting == "adaptive"
        self.threads = train_threads(setting, usable, world)  # adaptive starts at the ceiling
        self.candidates = candidate_counts(train_thread_ceiling(usable, world))
        self.warned = False
        self.epoch = 0
        self._seconds_per_image: list[float] = []
        self._trial: list[int] = []  # counts still to time in the running trial, current first
        self._timed: dict[int, list[float]] = {}  # count -> seconds per image of its trial steps
        self._trial_cost = [0.0, 0]  # seconds and images the running trial has taken
        self._waste: float | None = None  # seconds the finished trial cost beyond the chosen count
        self._best_per_image = 0.0
        self._epoch_images = 0
        self._next_trial = 1  # epoch
        self._trials = 0
        self._wait_mark: tuple[float, float] | None = None
        torch.set_num_threads(self.threads)

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._seconds_per_image = []
        if self._waste is not None and self._epoch_images:
            # the trial that just finished cost `waste`: the next one comes after enough epochs
            # (at the chosen count's speed) that trials stay under BUDGET of the training time
            epoch_seconds = self._epoch_images * self._best_per_image
            self._next_trial = epoch - 1 + max(1, math.ceil(self._waste / max(BUDGET * epoch_seconds, 1e-9)))
            self._waste = None
        self._epoch_images = 0
        # An epoch shorter than the trial carries it into the next one instead of restarting it.
        if self.adaptive and len(self.candidates) > 1 and not self._trial and epoch >= self._next_trial:
            # First trial: 1 thread first, the safe reference on a busy machine. Later ones: the
            # current choice first, so the slower counts are the ones cut short.
            first = [self.threads] if self._trials else [1]
            self._trial = first + [n for n in self.candidates if n not in first]
            self._timed, self._trial_cost = {}, [0.0, 0]
            torch.set_num_threads(self._trial[0])

    def step_done(self, seconds: float, images: int) -> None:
        """Called after every training step with its wall time and batch size."""
        per_image = seconds / max(images, 1)
        self._epoch_images += images
        if self._trial:
            self._time_candidate(per_image, seconds, images)
        elif not self.adaptive and self.threads > 1 and not self.warned:
            self._watch(per_image)

    # ----------------------------------------------------------------- adaptive
    def _time_candidate(self, per_image: float, seconds: float, images: int) -> None:
        count = self._trial[0]
        timed = self._timed.setdefault(count, [])
        timed.append(per_image)
        self._trial_cost[0] += seconds
        self._trial_cost[1] += images
        reference = next(iter(self._timed.values()))
        hopeless = timed is not reference and per_image > ABORT * statistics.median(reference[TRIAL_WARMUP:])
        if len(timed) < TRIAL_WARMUP + TRIAL_STEPS and not hopeless:
            return
        self._trial.pop(0)
        if self._trial:
            torch.set_num_threads(self._trial[0])
            return
        rates = {n: 1 / statistics.median(t[TRIAL_WARMUP:] or t) for n, t in self._timed.items()}
        self.threads = max(rates, key=rates.get)
        torch.set_num_threads(self.threads)
        self._trials += 1
        self._best_per_image = 1 / rates[self.threads]
        self._waste = max(0.0, self._trial_cost[0] - self._trial_cost[1] * self._best_per_image)
        log.info("epoch %d: %d thread%s (adaptive; img/s %s)", self.epoch, self.threads,
                 "" if self.threads == 1 else "s",
                 ", ".join(f"{n}: {r:,.0f}{'' if len(self._timed[n]) > TRIAL_STEPS else ' (cut short)'}"
                           for n, r in rates.items()))

    # ----------------------------------------------------------------- fixed count: warn once
    def _watch(self, per_image: float) -> None:
        steps = self._seconds_per_image
        steps.append(per_image)
        if len(steps) == 1:  # the first step warms kernels up; measure from its end
            self._wait_mark = (runqueue_wait_seconds() or 0.0, time.perf_counter())
        elif len(steps) == 1 + WINDOW:
            self._check_queueing()
        elif len(steps) > 1 + WINDOW and len(steps) % WINDOW == 0:
            factor = statistics.median(steps[-WINDOW:]) / statistics.median(steps[1:1 + WINDOW])
            if factor >= SLOWDOWN:
                self._warn(f"training steps became {factor:.1f}x slower than at the start of epoch {self.epoch}")

    def _check_queueing(self) -> None:
        """Contention that was there from the start: the threads queued for a CPU."""
        waited = runqueue_wait_seconds()
        if waited is None or self._wait_mark is None:
            return
        wall = time.perf_counter() - self._wait_mark[1]
        share = (waited - self._wait_mark[0]) / max(wall * self.threads, 1e-9)
        if share >= WAITING:
            self._warn(f"the training threads waited for a CPU {share:.0%} of the time in epoch {self.epoch}'s "
                       f"first steps (at least {1 / max(1 - share, 0.05):.1f}x slower than on idle CPUs)")

    def _warn(self, what: str) -> None:
        self.warned = True
        log.warning("%s: other processes are using these CPUs. With %d threads every step waits for the "
                    "slowest one; on a shared machine train.threads: 1 is often several times faster, or set "
                    "train.threads: adaptive to measure (not bit-reproducible).", what, self.threads)
