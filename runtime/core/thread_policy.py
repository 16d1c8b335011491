"""Torch intra-op threads of the engine-core process, chosen per step (EngineConfig.cpu_threads).

What it is for: `ThreadPolicy.threads_for` (pure: a step's token counts -> its thread count), `policy_for`
(which policy a process gets from `cpu_threads`, the device and whether a front end shares the cores) and
`StepThreads` (the engine-core process's per-step hook that applies it, calling torch.set_num_threads only
when the count changes; about 2 us a call), with `ParallelCheck` confirming from measured step times that the
large steps really gain from every core.

Why per step: served, the front end (gRPC streaming, detokenization) runs in another process on the same
cores. A GEMM split over every core then waits for whichever of its threads the OS has descheduled to run the
front end, which costs more than the split saves unless the GEMM is large. So a step whose GEMM work (tokens x
weight elements, `ModelWork.of_step`) is below `SERVED_PARALLEL_MIN_WORK` runs on one thread, a larger one
on every core while the measured step times agree (`ParallelCheck`: other jobs on the cores make even large
parallel steps wait). Alone (in-process `EngineCore`, `trtserve-generate`) nothing shares the cores and the library
never changes its caller's threads: torch's default (all cores) stays.
Not for: where the hook is called (EngineCore.step) or the vision encoder's ONNX Runtime threads.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine_format.checkpoint_layout import linear_shapes
from engine_format.llm_config import LLMConfig
from runtime.core.scheduler import SchedulerOutput

AUTO = 0        # EngineConfig.cpu_threads: choose per step (served), torch's default (alone)

# Smallest step work (tokens x weight elements) run on every core when served; below it one thread. Where it
# comes from (docs/perf/2026-11-30/thread_policy.md): benchmarks/thread_policy_gemm.py, tiny-qwen2's GEMM
# shapes at 1 vs 2 threads interleaved beside a Python spin loop (the front end) on the 2-core Xeon: one
# thread ahead up to 7.0e6 (32 tokens), two ahead from 1.4e7 (64 tokens) in the runs where no thread was
# descheduled; a step whose second thread is descheduled waits milliseconds (20-130 ms per step measured
# under load 8), so a miss costs far more than the split gains and the threshold errs high. The quiet served
# records (docs/perf/2026-11-30/session3) agree: tiny-qwen2, whose decode steps are <= 3.5e6 at c=16, ran
# faster with one core thread at c=1/4/16; small-qwen2, whose decode steps are >= 2.5e7 from c=1, faster
# with two. 1.6e7 lies between both.
SERVED_PARALLEL_MIN_WORK = 16_000_000
# The same for an engine with a vision encoder: its front end decodes and preprocesses every image on the same
# cores, so a step split over both waits for it more often. Served tiny-qwen2-vl c=16 (one 224x224 image per
# request), 3 interleaved pairs against 1.6e7: 5150 / 5262 / 5801 -> 5853 / 5852 / 5522 tok/s; `--cpu-threads 2`
# lost 25 % there and `--cpu-threads 1` gained 6 %. A VL model of real size (qwen2-vl-2b: 1.3e9 per token) is
# above it from one token.
SERVED_VL_PARALLEL_MIN_WORK = 64_000_000


@dataclass(frozen=True, slots=True)
class ModelWork:
    """Weight elements one token multiplies: the decoder linears (every token) and the LM head (sampled rows)."""

    per_token: int
    per_sampled: int

    def of_step(self, num_tokens: int, num_sampled: int) -> int:
        return num_tokens * self.per_token + num_sampled * self.per_sampled


def model_work(cfg: LLMConfig) -> ModelWork:
    per_token = sum(out_features * in_features for out_features, in_features in linear_shapes(cfg).values())
    return ModelWork(per_token, cfg.vocab_size * cfg.hidden_size)


@dataclass(frozen=True, slots=True)
class ThreadPolicy:
    """`fixed` threads for every step, or (fixed None) one thread below `min_work` and `max_threads` from it."""

    work: ModelWork
    max_threads: int
    fixed: int | None = None
    min_work: int = SERVED_PARALLEL_MIN_WORK

    def threads_for(self, num_tokens: int, num_sampled: int) -> int:
        if self.fixed is not None:
            return self.fixed
        return self.max_threads if self.work.of_step(num_tokens, num_sampled) >= self.min_work else 1


def policy_for(cpu_threads: int, served: bool, device_type: str, max_threads: int, work: ModelWork,
               vision: bool = False) -> ThreadPolicy | None:
    """The policy of a process holding an engine; None: leave torch's threads as they are.

    An explicit `cpu_threads` N is N for every step. Auto (0) is per step in a served engine-core process on
    the CPU with more than one core (`vision`: the engine has a vision encoder, SERVED_VL_PARALLEL_MIN_WORK);
    alone, or on CUDA (the host threads only launch kernels), torch's default.
    """
    if cpu_threads != AUTO:
        return ThreadPolicy(work, max_threads, fixed=cpu_threads)
    if not served or device_type != "cpu" or max_threads < 2:
        return None
    return ThreadPolicy(work, max_threads, min_work=SERVED_VL_PARALLEL_MIN_WORK if vision else SERVED_PARALLEL_MIN_WORK)


# Above the threshold the measured steps have the last word (`ParallelCheck`): other processes than the front end
# on the cores make every parallel step wait (small-qwen2's steps ran 4-13x slower on 2 threads than on 1 under
# load 7-9, docs/perf/2026-11-30/thread_policy.md), which no work threshold can see.
PROBE_EVERY = 64            # large steps of a class between two scheduled runs on the count not in use
EARLY_PROBE_MAX_SECONDS = 0.02  # a class whose steps take at most this probes right after its first sample
SLOWED = 1.5                # every core is suspect (a probe is due) when it costs this much over its baseline,
SLOWED_PROBE_GAP = 8        # at most once in this many large steps
SWITCH_MARGIN = 1.25        # the count not in use is taken when its cost per unit of work is this much lower
COST_SMOOTHING = 0.5        # weight of a new step in the running estimate of the count in use


@dataclass(slots=True)
class ParallelCheck:
    """For steps at or above the threshold: every core, unless measured step times say one thread is cheaper.

    Each large step's wall time per unit of work updates its thread count's estimate (the count in use: a running
    average; the count not in use: replaced by each probe). A probe (one large step on the count not in use) is
    due right after the class's first sample when its steps are short (EARLY_PROBE_MAX_SECONDS: the probe costs
    little, and a front end that competes from the start, the VL encoder's, is found at once), every PROBE_EVERY
    large steps of the class, and when every core costs SLOWED times its baseline (its cost when the last probe
    confirmed it, or its first sample: other jobs arrived), at most one in SLOWED_PROBE_GAP steps; on one thread
    only the scheduled probes run (a class's cost per unit of work varies by more than SLOWED on its own where the
    work measure leaves much out, the VL steps' encoder and attention). The count not in use is taken when its
    estimate is SWITCH_MARGIN times lower. A class of long steps thus pays no probe in its first PROBE_EVERY
    steps on a quiet machine: a served small-qwen2 run at c=16 has a prefill class of a few steps of 0.4 s, and
    probing it twice (warm-up and sample) on one thread cost 7-10 % of the run's throughput (auto 690 / 696
    against a fixed two threads 767 / 791 tok/s). The first step a count runs in a class is a warm-up, not a
    sample: the first call of a kernel on a thread count pays its compilation or loading and fresh pages (served
    small-qwen2: 0.35 s against 0.016 s, which kept the class on one thread for the rest of a run). Pure: the
    caller measures and reports the times.
    """

    max_threads: int
    chosen: int = 0                     # 0: max_threads (set at construction)
    cost: dict[int, float] = field(default_factory=dict)       # seconds per unit of work, per thread count
    baseline: float = 0.0               # the chosen count's cost when last confirmed (0: not measured yet)
    last_seconds: float = 0.0           # the last sampled step's wall time on the chosen count
    last_probe: int = 0                 # num_large of the last probe
    num_large: int = 0
    warmed: set[int] = field(default_factory=set)              # thread counts that ran their warm-up step

    def __post_init__(self) -> None:
        self.chosen = self.chosen or self.max_threads

    @property
    def other(self) -> int:
        return 1 if self.chosen == self.max_threads else self.max_threads

    def next_threads(self) -> int:
        """The thread count of the next large step."""
        self.num_large += 1
        if self.chosen not in self.cost:
            return self.chosen
        if self.other in self.warmed and self.other not in self.cost:       # a probe's warm-up ran: its sample
            return self.other
        if self.other not in self.cost and self.last_seconds <= EARLY_PROBE_MAX_SECONDS:
            return self.other
        if self.num_large % PROBE_EVERY == 0 or (self.chosen == self.max_threads
                                                 and self.num_large - self.last_probe >= SLOWED_PROBE_GAP
                                                 and self.cost[self.chosen] > SLOWED * self.baseline):
            self.last_probe = self.num_large
            return self.other
        return self.chosen

    def record(self, threads: int, seconds: float, work: int) -> None:
        """A large step's wall time, run on `threads`."""
        if threads not in self.warmed:
            self.warmed.add(threads)
            return
        cost = seconds / max(work, 1)
        if threads == self.chosen:
            self.last_seconds = seconds
            if threads in self.cost:
                cost = (1 - COST_SMOOTHING) * self.cost[threads] + COST_SMOOTHING * cost
            else:
                self.baseline = cost
            self.cost[threads] = cost
            return
        self.cost[threads] = cost                         # a probe
        if cost * SWITCH_MARGIN < self.cost[self.chosen]:
            self.chosen = threads
            self.baseline = cost
        else:
            self.baseline = self.cost[self.chosen]        # confirmed: a slowdown up to here is not other jobs


def work_class(work: int, min_work: int) -> int:
    """Large steps grouped by size, a factor of 2 a class (1: [min_work, 2 min_work), 2: [2, 4) min_work, ...):
    each class has its own ParallelCheck, so a prefill's cost per unit of work (its per-step overhead spread
    over many tokens) is never compared with a one-token decode step's."""
    return (work // max(min_work, 1)).bit_length()


@dataclass(slots=True)
class StepThreads:
    """EngineCore's `before_forward` hook in the engine-core process: sets the step's thread count
    (`step_done` reports the step's wall time, which large steps feed to their size class's ParallelCheck;
    `measured` False: the work threshold alone)."""

    policy: ThreadPolicy
    measured: bool = True
    checks: dict[int, ParallelCheck] = field(default_factory=dict)     # per work_class
    current: int = field(default_factory=torch.get_num_threads)
    changes: int = 0            # how many times a step changed the count (stats and tests)
    large_step: tuple[ParallelCheck, int, int] | None = None     # (its check, threads, work) of the step running

    def __call__(self, plan: SchedulerOutput) -> None:
        num_sampled = sum(item.samples for item in plan.scheduled)
        threads = self.policy.threads_for(plan.num_scheduled_tokens, num_sampled)
        self.large_step = None
        if threads > 1 and self.policy.fixed is None and self.measured:
            work = self.policy.work.of_step(plan.num_scheduled_tokens, num_sampled)
            key = work_class(work, self.policy.min_work)
            check = self.checks.get(key)
            if check is None:
                check = self.checks[key] = ParallelCheck(self.policy.max_threads)
            threads = check.next_threads()
            self.large_step = (check, threads, work)
        if threads != self.current:
            torch.set_num_threads(threads)
            self.current = threads
            self.changes += 1

    def step_done(self, seconds: float) -> None:
        if self.large_step is not None:
            check, threads, work = self.large_step
            check.record(threads, seconds, work)
        self.large_step = None
