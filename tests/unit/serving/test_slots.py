"""Machine-wide compute slots: shared by key across threads and processes, freed when a holder dies."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import numpy as np
import pytest

from tests.helpers import OverlapModel
from serving.slots import ComputeSlots
from serving.batcher import MicroBatcher


def test_slots_are_exclusive_between_holders_and_reusable(tmp_path):
    a, b = ComputeSlots("k", 2, tmp_path), ComputeSlots("k", 2, tmp_path)
    first = a.acquire()
    taken = []
    t = threading.Thread(target=lambda: taken.append(b.acquire(timeout=1)))
    t.start(); t.join()
    assert sorted([first, *taken]) == [0, 1]  # the second holder got the other slot
    with pytest.raises(TimeoutError, match="no free compute slot of 2"):
        a.acquire(timeout=0.05)  # a new thread's attempt would wait too; this one holds slot `first`
    b.release(taken[0])
    assert a.acquire(timeout=1) == taken[0]
    assert ComputeSlots("other", 1, tmp_path).acquire(timeout=0.1) == 0  # another key: other slots
    with pytest.raises(ValueError, match="count must be at least 1, got 0"):
        ComputeSlots("k", 0, tmp_path)


def test_a_dead_process_never_keeps_its_slot(tmp_path):
    code = ("import sys, time; from serving.slots import ComputeSlots; "
            f"ComputeSlots('k', 1, {str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        slots = ComputeSlots("k", 1, tmp_path)
        with pytest.raises(TimeoutError):
            slots.acquire(timeout=0.2)
        child.kill(); child.wait()
        assert slots.acquire(timeout=5) == 0  # the kernel dropped the dead holder's lock
    finally:
        child.kill()


def test_batchers_sharing_slots_never_run_more_model_calls_than_slots(tmp_path):
    model = OverlapModel(delay=0.02)

    async def go():
        # Two "workers", each allowed 2 calls side by side, share one machine-wide slot.
        batchers = [MicroBatcher(model, 1, 10_000, concurrency=2, gate=ComputeSlots("k", 1, tmp_path))
                    for _ in range(2)]
        images = np.zeros((1, 32, 32, 3), np.uint8)
        return await asyncio.gather(*[b.submit(images) for b in batchers for _ in range(6)])

    assert len(asyncio.run(go())) == 12
    assert model.peak == 1
