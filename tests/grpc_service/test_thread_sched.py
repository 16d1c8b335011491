"""The front end's threads under SCHED_BATCH (grpc_service/thread_sched.py).

In a fresh interpreter (the test process's own threads keep their policy): after
`batch_schedule_threads()` every thread of the process, one started before and one started after, runs under
SCHED_BATCH and the count says how many were changed. The served check (the server's threads SCHED_BATCH, its
engine core's the normal policy) is in tests/grpc_service/test_engine_process.py.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = """
import os, threading
from grpc_service.thread_sched import batch_schedule_threads
stop = threading.Event()
before = threading.Thread(target=stop.wait); before.start()
assert os.sched_getscheduler(before.native_id) == os.SCHED_OTHER
changed = batch_schedule_threads()
after = threading.Thread(target=stop.wait); after.start()
policies = {int(t): os.sched_getscheduler(int(t)) for t in os.listdir("/proc/self/task")}
stop.set(); before.join(); after.join()
assert changed >= 2, changed
assert set(policies.values()) == {os.SCHED_BATCH}, policies
assert after.native_id in policies
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
def test_every_thread_and_later_ones_run_under_sched_batch() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
