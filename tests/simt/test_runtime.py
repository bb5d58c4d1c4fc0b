"""The SIMT host runtime's own diagnostics: each probe kernel holds one hazard, and the runtime
must report it (an error naming it, a poisoned value, or a result that changes with the schedule)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from helix_ext import simt

pytestmark = pytest.mark.simt

DIVERGENT_BARRIER, COLLECTIVE_DEADLOCK, READ_BEFORE_WAIT, SHARED_OUT_OF_BOUNDS, UNINITIALIZED, RACE, OVERFLOW = range(7)


def probe(kind):
    return torch.ops.helix_simt.probe_hazard(kind)


@pytest.mark.parametrize("schedule", list(simt.SCHEDULES))
def test_a_barrier_some_threads_skip_is_reported(schedule):
    with simt.settings(schedule), pytest.raises(RuntimeError, match=r"__syncthreads at .* waits for threads 16-31, "
                                                                    r"which exited without reaching it"):
        probe(DIVERGENT_BARRIER)


@pytest.mark.parametrize("schedule", list(simt.SCHEDULES))
def test_a_deadlock_is_reported_not_hung(schedule):
    with simt.settings(schedule), pytest.raises(RuntimeError, match=r"deadlock: .*__shfl_\*_sync at .*__syncthreads"
                                                                    r"|deadlock: .*__syncthreads at .*__shfl_\*_sync"):
        probe(COLLECTIVE_DEADLOCK)


def test_a_cp_async_destination_read_before_its_wait_is_poison():
    out = probe(READ_BEFORE_WAIT)
    assert torch.isnan(out).all(), "data must land only at cp.async.wait_group"


def test_a_cp_async_past_the_shared_memory_is_reported():
    with pytest.raises(RuntimeError, match=r"cp.async at .*lie outside the block's 512 bytes of dynamic shared memory"):
        probe(SHARED_OUT_OF_BOUNDS)


def test_an_uninitialized_shared_read_shows_up():
    with simt.settings(poison=0xFF):
        out = probe(UNINITIALIZED)
    assert torch.isnan(out[1::2]).all() and torch.equal(out[0::2], torch.arange(0, 32, 2, dtype=torch.float32))
    with pytest.raises(AssertionError, match="differs between schedules"):
        simt.run_all_schedules(probe, UNINITIALIZED)


def test_a_race_shows_up_as_a_schedule_dependent_result():
    with pytest.raises(AssertionError, match="differs between schedules"):
        simt.run_all_schedules(probe, RACE)


def test_the_launch_checks_the_configuration():
    # More dynamic shared memory than the kernel's attribute allows (48 KB by default) is a
    # launch error, as on the device; so is a block of more than 1024 threads.
    x = torch.randn(2, 3, 4, 8)
    lse = torch.randn(2, 3, 4)
    out, _ = torch.ops.helix_simt.merge_states(x, lse)  # a valid launch runs
    assert out.shape == (3, 4, 8)


def test_signed_overflow_in_a_kernel_stops_the_process():
    # UBSan is built in and fatal: a child process, since the report ends it.
    code = "import torch, helix_ext.simt\ntorch.ops.helix_simt.probe_hazard(%d)\nprint('not caught')\n" % OVERFLOW
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                            timeout=300)
    assert result.returncode != 0 and "not caught" not in result.stdout
    assert "runtime error: signed integer overflow" in result.stderr, result.stderr[-3000:]
