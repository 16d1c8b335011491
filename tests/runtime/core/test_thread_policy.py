"""The engine core's thread policy (runtime/core/thread_policy.py) and where the core process applies it.

The policy function is pure: a step's work (tokens x decoder weight elements + sampled rows x LM-head
elements) against the threshold, an explicit count kept, auto only when served on a multi-core CPU; the
ParallelCheck of large steps fed made-up step costs (keeps every core while it pays, probing the other count
one large step in PROBE_EVERY and never before; moves to one thread within a few steps when parallel steps
slow down, back when they stop).
Then an in-process EngineCore on tiny-qwen2 with the hook the core process installs
(core_process.install_thread_policy): each forward runs with the thread count the policy chose for its
plan (a long prompt's prefill on every core, the decode steps on one), and an explicit count or overlap
installs no per-step hook. Thread counts are read, never timed. The flags: --cpu-threads -1 is refused
naming the field by trtserve-generate (trtserve-serve's is tests/grpc_service/test_gpu_flags.py).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from engine_format.engine_dir import LoadedEngine, load_engine
from runtime.config import EngineConfig
from runtime.core.core_process import install_thread_policy
from runtime.core.engine_core import EngineCore, EngineRequest
from runtime.core.thread_policy import (AUTO, EARLY_PROBE_MAX_SECONDS, PROBE_EVERY, SERVED_PARALLEL_MIN_WORK, SLOWED,
                                        SERVED_VL_PARALLEL_MIN_WORK, SLOWED_PROBE_GAP, ModelWork, ParallelCheck,
                                        StepThreads, ThreadPolicy, model_work, policy_for, work_class)
from runtime.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine(build_tiny) -> LoadedEngine:
    return load_engine(build_tiny("tiny-qwen2"))


@pytest.fixture
def two_threads() -> Iterator[None]:
    """The test process's torch threads: 2 during the test (as the 2-core server), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_model_work_counts_every_decoder_linear_and_the_lm_head(engine: LoadedEngine) -> None:
    cfg = engine.llm_config
    h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_size, cfg.num_key_value_heads * cfg.head_size
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size      # qkv, dense, gate + up + down
    work = model_work(cfg)
    assert work == ModelWork(cfg.num_hidden_layers * per_layer, cfg.vocab_size * h)
    assert work.per_token == 86016 and work.of_step(16, 16) == 16 * 86016 + 16 * 2056 * 64   # tiny-qwen2


def test_threads_for_switches_at_the_threshold_and_keeps_an_explicit_count() -> None:
    policy = ThreadPolicy(ModelWork(per_token=100, per_sampled=1000), max_threads=4, min_work=5000)
    assert policy.threads_for(num_tokens=10, num_sampled=3) == 1          # 4000
    assert policy.threads_for(num_tokens=20, num_sampled=3) == 4          # 5000: at the threshold
    assert policy.threads_for(num_tokens=50, num_sampled=0) == 4
    assert policy.threads_for(num_tokens=1, num_sampled=1) == 1
    fixed = ThreadPolicy(ModelWork(100, 1000), max_threads=4, fixed=3)
    assert {fixed.threads_for(t, s) for t, s in ((1, 1), (10_000, 64))} == {3}


def test_policy_for_is_per_step_only_served_on_a_multicore_cpu() -> None:
    work = ModelWork(86016, 131584)
    per_step = policy_for(AUTO, served=True, device_type="cpu", max_threads=2, work=work)
    assert per_step == ThreadPolicy(work, 2, None, SERVED_PARALLEL_MIN_WORK)
    vl = policy_for(AUTO, served=True, device_type="cpu", max_threads=2, work=work, vision=True)
    assert vl == ThreadPolicy(work, 2, None, SERVED_VL_PARALLEL_MIN_WORK)      # its front end preprocesses images
    assert policy_for(AUTO, served=False, device_type="cpu", max_threads=2, work=work) is None     # alone
    assert policy_for(AUTO, served=True, device_type="cuda", max_threads=16, work=work) is None
    assert policy_for(AUTO, served=True, device_type="cpu", max_threads=1, work=work) is None
    for served in (True, False):
        assert policy_for(3, served=served, device_type="cpu", max_threads=2, work=work).fixed == 3


def test_the_threshold_separates_the_measured_served_workloads() -> None:
    """docs/perf/2026-11-30/thread_policy.md: tiny-qwen2 decode at c=16 served faster on one thread,
    small-qwen2 decode at c=1 on two (quiet session-3 records)."""
    tiny = ModelWork(86016, 2056 * 64)
    small = ModelWork(24117248, 2056 * 512)
    assert tiny.of_step(16, 16) < SERVED_PARALLEL_MIN_WORK <= small.of_step(1, 1)
    # a VL engine: tiny-qwen2-vl's steps of up to 5 image requests' prefills (128 tokens each) stay below it,
    # qwen2-vl-2b's decode of one token (28 layers of 1536 wide, 8960 intermediate, 256 KV wide, 151936
    # vocabulary) lies above it
    qwen2_vl_2b = ModelWork(28 * (1536 * (1536 + 2 * 256) + 1536 * 1536 + 3 * 1536 * 8960), 151936 * 1536)
    assert tiny.of_step(5 * 128, 5) < SERVED_VL_PARALLEL_MIN_WORK <= qwen2_vl_2b.of_step(1, 1)


def _drive(check: ParallelCheck, seconds_per_work: dict[int, float], steps: int, work: int = 1000) -> list[int]:
    """`steps` large steps whose (given, not timed) cost per unit of work depends on the thread count (long
    steps by default: seconds per work x 1000 work)."""
    counts = []
    for _ in range(steps):
        threads = check.next_threads()
        check.record(threads, seconds_per_work[threads] * work, work)
        counts.append(threads)
    return counts


def test_parallel_check_keeps_every_core_while_it_pays_and_probes_one_thread_rarely() -> None:
    check = ParallelCheck(max_threads=2)
    counts = _drive(check, {2: 1.0, 1: 1.3}, steps=4 * PROBE_EVERY)
    # no probe before the PROBE_EVERY-th large step (a class of a few long prefills never pays one), then its
    # warm-up and first sample on one thread, then one in PROBE_EVERY
    assert counts[:PROBE_EVERY - 1] == [2] * (PROBE_EVERY - 1) and counts[PROBE_EVERY - 1:PROBE_EVERY + 2] == [1, 1, 2]
    assert counts.count(1) == 2 + 3 and all(c == 1 for i, c in enumerate(counts, 1) if i % PROBE_EVERY == 0)
    assert check.chosen == 2 and check.cost == {2: 1.0, 1: 1.3}


def test_parallel_check_moves_to_one_thread_when_parallel_steps_wait_and_back_when_they_stop() -> None:
    check = ParallelCheck(max_threads=2)
    assert _drive(check, {2: 1.0, 1: 1.3}, steps=10) == [2] * 10
    counts = _drive(check, {2: 10.0, 1: 1.0}, steps=2 * PROBE_EVERY)      # other jobs arrive on the cores
    # the first slow step puts the running cost past SLOWED x its baseline: the probe's warm-up and sample
    assert counts[:4] == [2, 1, 1, 1] and check.chosen == 1
    assert counts.count(2) == 1 + 2                      # then a probe of every core in PROBE_EVERY steps
    _drive(check, {2: 1.0, 1: 1.3}, steps=PROBE_EVERY)                     # the cores are free again
    assert check.chosen == 2
    loaded_from_start = ParallelCheck(max_threads=2)      # no baseline to compare with: the scheduled probe
    counts = _drive(loaded_from_start, {2: 10.0, 1: 1.0}, steps=PROBE_EVERY + 1)
    assert loaded_from_start.chosen == 1 and counts.count(1) == 2
    within_margin = ParallelCheck(max_threads=2)
    _drive(within_margin, {2: 1.0, 1: 0.9}, steps=3 * PROBE_EVERY)        # one thread only 10 % cheaper: stay
    assert within_margin.chosen == 2


def test_a_class_of_short_steps_probes_right_after_its_first_sample() -> None:
    """Short steps (at most EARLY_PROBE_MAX_SECONDS) make a probe cheap: warm-up and sample on one thread right
    after the first sample on every core, so a front end that competes from the start is found at once."""
    short = EARLY_PROBE_MAX_SECONDS / 2
    quiet = ParallelCheck(max_threads=2)
    counts = _drive(quiet, {2: short, 1: 1.3 * short}, steps=PROBE_EVERY, work=1)
    assert counts[:5] == [2, 2, 1, 1, 2] and quiet.chosen == 2 and counts.count(1) == 2 + 1
    loaded = ParallelCheck(max_threads=2)
    counts = _drive(loaded, {2: short, 1: short / 4}, steps=8, work=1)
    assert counts[:5] == [2, 2, 1, 1, 1] and loaded.chosen == 1


def test_a_confirmed_slowdown_is_the_new_baseline() -> None:
    """Steps that slow down for their own reasons (longer contexts: attention is not in the work measure) trigger
    one probe; when it confirms every core, their cost is the new baseline and no probe follows until the
    scheduled one."""
    check = ParallelCheck(max_threads=2)
    _drive(check, {2: 1.0, 1: 1.6}, steps=SLOWED_PROBE_GAP)
    counts = _drive(check, {2: 2 * SLOWED, 1: 5.0}, steps=PROBE_EVERY - SLOWED_PROBE_GAP - 2)
    assert counts[:4] == [2, 1, 1, 2] and counts.count(1) == 2 and check.chosen == 2


def test_probes_on_a_slowdown_are_spaced_and_only_on_every_core() -> None:
    """A cost that keeps jumping (each probe confirming every core) probes at most once in SLOWED_PROBE_GAP
    steps; on one thread a slowdown probes nothing before the scheduled probe."""
    check = ParallelCheck(max_threads=2)
    _drive(check, {2: 1.0, 1: 1.6}, steps=SLOWED_PROBE_GAP)
    counts = []
    for i in range(PROBE_EVERY - SLOWED_PROBE_GAP - 1):
        counts += _drive(check, {2: SLOWED ** (2 + i), 1: 10.0 * SLOWED ** (2 + i)}, steps=1)
    assert check.chosen == 2 and 2 <= counts.count(1) <= 2 * (len(counts) // SLOWED_PROBE_GAP + 1)
    one = ParallelCheck(max_threads=2)
    _drive(one, {2: 10.0, 1: 1.0}, steps=PROBE_EVERY + 1)                 # moved to one thread
    assert one.chosen == 1
    counts = []
    for i in range(PROBE_EVERY // 2):
        counts += _drive(one, {2: 100.0, 1: SLOWED ** (2 + i)}, steps=1)
    assert counts.count(2) == 0


def test_a_slow_first_step_per_thread_count_is_a_warm_up_not_a_sample() -> None:
    """The first step of a class on a thread count (compilation, fresh pages) is not counted: a first parallel
    step 20x slower than the rest does not move the class to one thread."""
    check = ParallelCheck(max_threads=2)
    threads = check.next_threads()
    check.record(threads, 20.0 * 1000, 1000)                                # the warm-up on 2 threads
    counts = [threads] + _drive(check, {2: 1.0, 1: 1.6}, steps=2 * PROBE_EVERY)
    assert check.chosen == 2 and counts.count(1) == 2 + 1 and check.cost == {2: 1.0, 1: 1.6}


def test_step_threads_feeds_large_steps_to_the_check_and_uses_its_choice(engine: LoadedEngine,
                                                                         two_threads: None) -> None:
    core = EngineCore(engine, EngineConfig(device="cpu", overlap="off"), text_output=False)
    hook = install_thread_policy(core, AUTO)
    assert hook is not None and hook.measured
    seen: list[int] = []
    for first in (10, 1000):     # two long prefills (large), each followed by one decode step (small)
        seen += [t for _, t in _run_with_hook(core, first, 200, max_tokens=2, step_done=hook.step_done)]
    # both large steps (one size class) on 2 threads: the 1st a warm-up, the 2nd a sample; decode steps are small
    assert seen == [2, 1, 2, 1] and list(hook.checks) == [1]
    assert set(hook.checks[1].cost) == {2} and hook.checks[1].num_large == 2
    seen = [t for _, t in _run_with_hook(core, 1500, 200, max_tokens=1, step_done=hook.step_done)]
    assert seen == [1] and set(hook.checks[1].cost) == {2}, "short steps: the 3rd probes 1 thread (its warm-up)"
    seen = [t for _, t in _run_with_hook(core, 1400, 400, max_tokens=1, step_done=hook.step_done)]
    assert seen == [2] and sorted(hook.checks) == [1, 2], "a twice larger step has its own check"


def test_work_classes_double() -> None:
    assert [work_class(w, 100) for w in (100, 199, 200, 399, 400, 800, 1600)] == [1, 1, 2, 2, 3, 4, 5]


def _run_with_hook(core: EngineCore, first_token: int, prompt_len: int, max_tokens: int,
                   step_done: Callable[[float], None] | None = None) -> list[tuple[int, int]]:
    """(tokens in the step, torch threads during its forward) for every step of one greedy request; each step
    reported to `step_done` as the core process does (with a made-up time: 1 ms)."""
    seen: list[tuple[int, int]] = []
    execute = core.executor.execute

    def recording_execute(plan):
        seen.append((plan.num_scheduled_tokens, torch.get_num_threads()))
        return execute(plan)

    core.executor.execute = recording_execute
    prompt = list(range(first_token, first_token + prompt_len))     # no prefix shared with another run
    try:
        core.add_request(EngineRequest(f"r{first_token}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0)))
        while core.has_unfinished():
            core.step()
            if step_done is not None:
                step_done(0.001)
    finally:
        core.executor.execute = execute
    return seen


def test_the_core_process_hook_sets_each_forwards_threads(engine: LoadedEngine, two_threads: None) -> None:
    core = EngineCore(engine, EngineConfig(device="cpu", overlap="off"), text_output=False)
    hook = install_thread_policy(core, AUTO)
    assert isinstance(hook, StepThreads) and core.before_forward is hook
    # a prefill past the threshold (200 x 86016 + 131584 weight elements) on every core, then decode on one
    prompt_len = 200
    assert model_work(engine.llm_config).of_step(prompt_len, 1) >= SERVED_PARALLEL_MIN_WORK
    seen = _run_with_hook(core, 10, prompt_len, max_tokens=4)
    assert seen == [(prompt_len, 2), (1, 1), (1, 1), (1, 1)]
    assert hook.changes == 1 and hook.current == 1 == torch.get_num_threads()
    seen = _run_with_hook(core, 1000, prompt_len, max_tokens=2)             # a new prefill: back to every core
    assert [threads for _, threads in seen] == [2, 1] and hook.changes == 3


def test_an_explicit_count_or_overlap_installs_no_hook(engine: LoadedEngine, two_threads: None) -> None:
    core = EngineCore(engine, EngineConfig(device="cpu", overlap="off", cpu_threads=1), text_output=False)
    assert install_thread_policy(core, 1) is None and core.before_forward is None
    overlapped = EngineCore(engine, EngineConfig(device="cpu", overlap="on"), text_output=False)
    assert install_thread_policy(overlapped, AUTO) is None and overlapped.before_forward is None


def test_generate_refuses_negative_cpu_threads_naming_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    from runtime.generate_cli import main

    assert main(["--engine", "no-such-engine", "--prompt", "hi", "--cpu-threads", "-1"]) == 2
    err = capsys.readouterr().err
    assert "cpu_threads" in err and "-1" in err
