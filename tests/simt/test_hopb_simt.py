"""The HOP-B signal and combine kernels on the SIMT host runtime, with virtual peers."""

from __future__ import annotations

import threading

import pytest
import torch

from helix_ext import simt
from helix_ext.reference import merge_states_reference
from tolerance import assert_close_to_reference

pytestmark = pytest.mark.simt


def virtual_peers(num_peers, rows, heads, dim, dtype, signalling=None, slot=1):
    outs = [torch.randn(rows, heads, dim).to(dtype) for _ in range(num_peers)]
    lses = [torch.randn(rows, heads) * 3 for _ in range(num_peers)]
    lses[0][0, 0] = float("-inf")
    flags = [torch.zeros(4, dtype=torch.int32) for _ in range(num_peers)]
    for peer in range(num_peers) if signalling is None else signalling:
        torch.ops.helix_simt.hopb_signal(flags[peer], torch.zeros(4, dtype=torch.int32), slot)
    epoch = torch.zeros(4, dtype=torch.int32)
    torch.ops.helix_simt.hopb_signal(torch.zeros(4, dtype=torch.int32), epoch, slot)  # this rank: epoch 1
    return outs, lses, flags, epoch


def test_signal_bumps_the_epoch_and_publishes_it():
    flags, epoch = torch.zeros(4, dtype=torch.int32), torch.tensor([0, 5, 0, 0], dtype=torch.int32)
    torch.ops.helix_simt.hopb_signal(flags, epoch, 1)
    assert epoch.tolist() == [0, 6, 0, 0] and flags.tolist() == [0, 6, 0, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("dim", [7, 64])  # scalar and 16-byte paths
@pytest.mark.parametrize("num_peers", [1, 3])
def test_combine_equals_the_merge(dtype, dim, num_peers):
    simt.module().reset_publications()
    outs, lses, flags, epoch = virtual_peers(num_peers, 5, 3, dim, dtype)
    error = torch.zeros(1, dtype=torch.int32)
    out, lse = simt.run_all_schedules(torch.ops.helix_simt.hopb_combine, outs, lses, flags, epoch, 1, 5.0, error,
                                      multiprocessor_count=1)
    reference_out, reference_lse = merge_states_reference(torch.stack(outs), torch.stack(lses), out_dtype=torch.float64)
    base_out, base_lse = merge_states_reference(torch.stack(outs), torch.stack(lses), compute_dtype=torch.float32)
    assert_close_to_reference(out, reference_out, base_out, accumulated_terms=num_peers, name="out")
    assert_close_to_reference(lse, reference_lse, base_lse, accumulated_terms=num_peers, name="lse")
    assert error.item() == 0


def test_a_peer_that_never_signals_times_out_with_its_number():
    simt.module().reset_publications()
    outs, lses, flags, epoch = virtual_peers(3, 4, 2, 16, torch.bfloat16, signalling=[0])
    error = torch.zeros(1, dtype=torch.int32)
    torch.ops.helix_simt.hopb_combine(outs, lses, flags, epoch, 1, 0.05, error)
    assert error.item() == 2, "peer 1 (reported as 1 + peer) never signalled"


def test_combine_waits_for_a_late_peer():
    # The emulated acquire loads see a flag another host thread publishes while the kernel spins.
    simt.module().reset_publications()
    outs, lses, flags, epoch = virtual_peers(2, 4, 2, 16, torch.float32, signalling=[0])
    late = flags[1]
    timer = threading.Timer(0.2, lambda: torch.ops.helix.hopb_signal(late, torch.zeros(4, dtype=torch.int32), 1))
    timer.start()
    error = torch.zeros(1, dtype=torch.int32)
    out, _ = torch.ops.helix_simt.hopb_combine(outs, lses, flags, epoch, 1, 10.0, error)
    timer.join()
    assert error.item() == 0
    assert torch.equal(out, torch.ops.helix_simt.merge_states(torch.stack(outs), torch.stack(lses))[0])


def test_combine_grid_stride():
    # 32 * 8 rows of 64 fp32 (4096 16-byte vectors) for the 8 CTAs of 256 threads one SM gets.
    simt.module().reset_publications()
    outs, lses, flags, epoch = virtual_peers(2, 32, 8, 64, torch.float32)
    error = torch.zeros(1, dtype=torch.int32)
    out, lse = simt.run_all_schedules(torch.ops.helix_simt.hopb_combine, outs, lses, flags, epoch, 1, 5.0, error,
                                      multiprocessor_count=1)
    expected_out, expected_lse = simt.run_all_schedules(torch.ops.helix_simt.merge_states, torch.stack(outs),
                                                        torch.stack(lses))
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse) and error.item() == 0


@pytest.mark.parametrize("start", [2 ** 31 - 2, -2], ids=["int32_wrap", "uint32_wrap"])
def test_epochs_wrap_and_a_stale_peer_is_still_waited_for(start):
    # Epochs just below the wrap: this rank and peer 0 signal twice (across the wrap), peer 1
    # once. Peer 1's flag (INT32_MAX or -1) is one signal behind: the combine must time out on
    # it, not take it for a flag ahead of the epoch; after its second signal the merge goes through.
    simt.module().reset_publications()
    outs, lses, flags, _ = virtual_peers(2, 4, 2, 16, torch.float32, signalling=[])
    epochs = [torch.full((4,), start, dtype=torch.int32) for _ in range(3)]
    own = torch.zeros(4, dtype=torch.int32)
    for _ in range(2):
        torch.ops.helix_simt.hopb_signal(own, epochs[2], 1)
        torch.ops.helix_simt.hopb_signal(flags[0], epochs[0], 1)
    torch.ops.helix_simt.hopb_signal(flags[1], epochs[1], 1)
    assert epochs[2][1].item() == (-2 ** 31 if start > 0 else 0) and flags[1][1].item() == start + 1
    error = torch.zeros(1, dtype=torch.int32)
    torch.ops.helix_simt.hopb_combine(outs, lses, flags, epochs[2], 1, 0.05, error)
    assert error.item() == 2, "peer 1's stale flag was taken as fresh"
    torch.ops.helix_simt.hopb_signal(flags[1], epochs[1], 1)
    torch.ops.helix_simt.hopb_signal(flags[0], epochs[0], 1)  # peer 0 now one ahead: also fine
    error.zero_()
    out, lse = simt.run_all_schedules(torch.ops.helix_simt.hopb_combine, outs, lses, flags, epochs[2], 1, 5.0, error,
                                      multiprocessor_count=1)
    assert error.item() == 0
    expected_out, expected_lse = torch.ops.helix_simt.merge_states(torch.stack(outs), torch.stack(lses))
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)


def test_a_nan_lse_gives_a_nan_row():
    # The kernel's merge treats NaN (and +inf) as poison, never as an absent part.
    simt.module().reset_publications()
    outs, lses, flags, epoch = virtual_peers(3, 4, 2, 16, torch.float32)
    lses[1][2, 1] = float("nan")
    lses[2][3, 0] = float("inf")
    error = torch.zeros(1, dtype=torch.int32)
    out, lse = simt.run_all_schedules(torch.ops.helix_simt.hopb_combine, outs, lses, flags, epoch, 1, 5.0, error,
                                      multiprocessor_count=1)
    assert error.item() == 0
    assert torch.isnan(out[2, 1]).all() and torch.isnan(lse[2, 1]) and torch.isnan(out[3, 0]).all()
    assert torch.isnan(out).sum() == 32 and torch.isnan(lse).sum() == 2


# ----------------------------------------------------------------------------- hopb_all_reduce
def signalled_parts(num_peers, numel, dtype, signalling=None, slot=1):
    parts = [(torch.randn(numel, dtype=torch.float64) * 4).to(dtype) for _ in range(num_peers)]
    flags = [torch.zeros(2, dtype=torch.int32) for _ in range(num_peers)]
    for peer in range(num_peers) if signalling is None else signalling:
        torch.ops.helix_simt.hopb_signal(flags[peer], torch.zeros(2, dtype=torch.int32), slot)
    epoch = torch.zeros(2, dtype=torch.int32)
    torch.ops.helix_simt.hopb_signal(torch.zeros(2, dtype=torch.int32), epoch, slot)  # this rank: epoch 1
    return parts, flags, epoch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("numel", [7, 576])  # scalar and 16-byte paths
@pytest.mark.parametrize("num_peers", [1, 3])
def test_all_reduce_equals_the_sum(dtype, numel, num_peers):
    from helix_ext.reference import hopb_all_reduce_reference

    simt.module().reset_publications()
    parts, flags, epoch = signalled_parts(num_peers, numel, dtype)
    error = torch.zeros(1, dtype=torch.int32)
    out = simt.run_all_schedules(torch.ops.helix_simt.hopb_all_reduce, parts, flags, epoch, 1, 5.0, error,
                                 multiprocessor_count=1)
    assert error.item() == 0
    # The kernel's order (fp32, peer by peer): the same bits as the reference in that order and
    # as the CPU op (every rank, CPU or GPU, agrees).
    assert torch.equal(out, hopb_all_reduce_reference(parts, compute_dtype=torch.float32))
    assert torch.equal(out, torch.ops.helix.hopb_all_reduce(parts, flags, epoch, 1, 5.0, error))
    exact = hopb_all_reduce_reference(parts, out_dtype=torch.float64)
    bound = sum(p.double().abs() for p in parts) * (num_peers * 2.0 ** -24 + torch.finfo(dtype).eps)
    assert ((out.double() - exact).abs() <= bound).all()


def test_all_reduce_grid_stride():
    # 40960 fp32 = 10240 16-byte vectors for the 8 CTAs of 256 threads one SM gets: 5 trips.
    from helix_ext.reference import hopb_all_reduce_reference

    simt.module().reset_publications()
    parts, flags, epoch = signalled_parts(2, 40960, torch.float32)
    error = torch.zeros(1, dtype=torch.int32)
    out = simt.run_all_schedules(torch.ops.helix_simt.hopb_all_reduce, parts, flags, epoch, 1, 5.0, error,
                                 multiprocessor_count=1)
    assert error.item() == 0 and torch.equal(out, hopb_all_reduce_reference(parts, compute_dtype=torch.float32))


def test_all_reduce_times_out_with_the_missing_peer():
    simt.module().reset_publications()
    parts, flags, epoch = signalled_parts(3, 64, torch.bfloat16, signalling=[0, 2])
    error = torch.zeros(1, dtype=torch.int32)
    torch.ops.helix_simt.hopb_all_reduce(parts, flags, epoch, 1, 0.05, error)
    assert error.item() == 2, "peer 1 (reported as 1 + peer) never signalled"


def test_all_reduce_waits_for_a_late_peer():
    from helix_ext.reference import hopb_all_reduce_reference

    simt.module().reset_publications()
    parts, flags, epoch = signalled_parts(2, 64, torch.float32, signalling=[0])
    final = parts[1].clone()
    parts[1].fill_(float("nan"))

    def late_peer():
        parts[1].copy_(final)
        torch.ops.helix.hopb_signal(flags[1], torch.zeros(2, dtype=torch.int32), 1)

    timer = threading.Timer(0.2, late_peer)
    timer.start()
    error = torch.zeros(1, dtype=torch.int32)
    out = torch.ops.helix_simt.hopb_all_reduce(parts, flags, epoch, 1, 10.0, error)
    timer.join()
    assert error.item() == 0 and torch.equal(out, hopb_all_reduce_reference(parts, compute_dtype=torch.float32))
