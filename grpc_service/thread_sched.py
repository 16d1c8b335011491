"""The front end's threads under Linux's SCHED_BATCH policy, so that their wakeups stop preempting the engine core.

What it is for: `batch_schedule_threads()`, called by the server once its engine cores run in their own
processes (after those are started: a process keeps the policy it was started with, and theirs stays the
normal one). Every thread of this process, and every thread one of them starts later (a new thread inherits
its creator's policy), then runs under SCHED_BATCH. The front end's threads wake once per streamed message
or engine step (gRPC's completion poller wakes for every message sent; the event loop; the core receiver;
gRPC's event-engine threads); under the normal policy each wakeup on a busy CPU preempts whatever runs there,
on a machine whose cores the front end shares with the engine core often the core's step, or another
front-end thread in the middle of its work. A SCHED_BATCH thread keeps its CPU share (its nice value is
unchanged) but does not preempt on wakeup: it runs at the next scheduling point, or at once on an idle CPU.
Nothing a client receives changes: every message is still sent as soon as that thread runs. Lowering the
policy needs no privilege; where the OS has no SCHED_BATCH (not Linux) this does nothing.
Not for: the engine core's threads (runtime/core/thread_policy.py sets their count, never their policy).
"""
from __future__ import annotations

import logging
import os

LOG = logging.getLogger(__name__)
TASK_DIR = "/proc/self/task"


def batch_schedule_threads() -> int:
    """Put every thread of this process under SCHED_BATCH (priority 0); the number of threads it changed."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None or not hasattr(os, "sched_setscheduler") or not os.path.isdir(TASK_DIR):
        return 0
    changed = 0
    for entry in os.listdir(TASK_DIR):
        try:
            os.sched_setscheduler(int(entry), policy, os.sched_param(0))   # a thread id: that thread alone
        except ProcessLookupError:         # the thread ended meanwhile
            continue
        except OSError as exc:             # a sandbox that forbids it: keep the normal policy, say so once
            LOG.warning("front-end threads keep the normal scheduling policy: %s", exc)
            return changed
        changed += 1
    return changed
