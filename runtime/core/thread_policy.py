"""Torch intra-op threads of the engine-core process, chosen per step (EngineConfig.cpu_threads).

What it is for: `ThreadPolicy.threads_for` (pure: a step's token counts -> its thread count), `policy_for`
(which policy a process gets from `cpu_threads`, the device and whether a front end shares the cores) and
`StepThreads` (the engine-core process's per-step hook that applies it, calling torch.set_num_threads only
when the count changes; about 2 us a call).

Why per step: served, the front end (gRPC streaming, detokenization) runs in another process on the same
cores. A GEMM split over every core then waits for whichever of its threads the OS has descheduled to run the
front end, which costs more than the split saves unless the GEMM is large. So a step whose GEMM work (tokens x
weight elements, `ModelWork.of_step`) is below `SERVED_PARALLEL_MIN_WORK` runs on one thread, a larger one
on every core. Alone (in-process `EngineCore`, `trtserve-generate`) nothing shares the cores and the library
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


def policy_for(cpu_threads: int, served: bool, device_type: str, max_threads: int, work: ModelWork
               ) -> ThreadPolicy | None:
    """The policy of a process holding an engine; None: leave torch's threads as they are.

    An explicit `cpu_threads` N is N for every step. Auto (0) is per step in a served engine-core process on
    the CPU with more than one core; alone, or on CUDA (the host threads only launch kernels), torch's default.
    """
    if cpu_threads != AUTO:
        return ThreadPolicy(work, max_threads, fixed=cpu_threads)
    if not served or device_type != "cpu" or max_threads < 2:
        return None
    return ThreadPolicy(work, max_threads)


@dataclass(slots=True)
class StepThreads:
    """EngineCore's `before_forward` hook in the engine-core process: sets the step's thread count."""

    policy: ThreadPolicy
    current: int = field(default_factory=torch.get_num_threads)
    changes: int = 0            # how many times a step changed the count (stats and tests)

    def __call__(self, plan: SchedulerOutput) -> None:
        threads = self.policy.threads_for(plan.num_scheduled_tokens, sum(item.samples for item in plan.scheduled))
        if threads != self.current:
            torch.set_num_threads(threads)
            self.current = threads
            self.changes += 1
