"""HOP-B fused combine ops (hopb_signal, hopb_combine) on "virtual ranks": P peer buffers in
one process (on the CPU, or on one GPU), compared with merge_states. The multi-process
protocol (shared / symmetric buffers, epochs, buffer reuse) is tested through the runtime in
tests/parallel/test_fused_exchange.py."""

import threading
import time

import pytest
import torch

import helix_ext
from conftest import DEVICES

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def virtual_peers(num_peers, rows, heads, dim, dtype, device, slots=4, signal_slot=None):
    outs = [torch.randn(rows, heads, dim, device=device).to(dtype) for _ in range(num_peers)]
    lses = [torch.randn(rows, heads, device=device) * 3 for _ in range(num_peers)]
    if num_peers > 1 and rows and heads:
        lses[1][0, 0] = float("-inf")  # an absent part, holding garbage
        outs[1][0, 0] = float("nan")
    flags = [torch.zeros(slots, dtype=torch.int32, device=device) for _ in range(num_peers)]
    epoch = torch.zeros(slots, dtype=torch.int32, device=device)
    if signal_slot is not None:
        for f in flags:  # each peer publishes the slot once...
            torch.ops.helix.hopb_signal(f, torch.zeros(slots, dtype=torch.int32, device=device), signal_slot)
        own = torch.zeros(slots, dtype=torch.int32, device=device)
        torch.ops.helix.hopb_signal(own, epoch, signal_slot)  # ...and so does this rank (epoch 1)
    return outs, lses, flags, epoch


@pytest.mark.parametrize("device", DEVICES)
def test_signal_bumps_the_epoch_and_publishes_it(device):
    flags = torch.zeros(3, dtype=torch.int32, device=device)
    epoch = torch.zeros(3, dtype=torch.int32, device=device)
    for expected in (1, 2, 3):
        torch.ops.helix.hopb_signal(flags, epoch, 1)
        assert flags.tolist() == [0, expected, 0] and epoch.tolist() == [0, expected, 0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("num_peers", [1, 2, 3, 8])
@pytest.mark.parametrize("dim", [7, 128])
def test_combine_equals_merge_states(device, dtype, num_peers, dim):
    outs, lses, flags, epoch = virtual_peers(num_peers, 6, 5, dim, dtype, device, signal_slot=2)
    error = torch.zeros(1, dtype=torch.int32, device=device)
    out, lse = torch.ops.helix.hopb_combine(outs, lses, flags, epoch, 2, 5.0, error)
    expected_out, expected_lse = helix_ext.merge_states(torch.stack(outs), torch.stack(lses))
    # The same merge math in the same part order: the same bits.
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)
    assert error.item() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_a_peer_that_never_signals_is_reported(device):
    outs, lses, flags, epoch = virtual_peers(3, 4, 2, 16, torch.float32, device, signal_slot=0)
    torch.ops.helix.hopb_signal(flags[0], torch.zeros_like(epoch), 1)  # peer 0 signals slot 1...
    own = torch.zeros_like(epoch)
    torch.ops.helix.hopb_signal(own, epoch, 1)  # ...this rank too; peers 1 and 2 never do
    error = torch.zeros(1, dtype=torch.int32, device=device)
    start = time.monotonic()
    if device == "cpu":
        with pytest.raises(RuntimeError, match=r"peer 1 did not signal chunk 1 within 0.3 s"):
            torch.ops.helix.hopb_combine(outs, lses, flags, epoch, 1, 0.3, error)
    else:
        torch.ops.helix.hopb_combine(outs, lses, flags, epoch, 1, 0.3, error)
        torch.cuda.synchronize()
    assert error.item() == 2  # 1 + the first missing peer
    assert time.monotonic() - start < 30


def test_combine_waits_for_a_late_peer_on_the_cpu():
    outs, lses, flags, epoch = virtual_peers(2, 3, 2, 8, torch.float32, "cpu", signal_slot=0)
    late = torch.zeros(4, dtype=torch.int32)
    flags[1] = late  # peer 1 signals only after a while, from another thread
    threading.Timer(0.2, lambda: torch.ops.helix.hopb_signal(late, torch.zeros(4, dtype=torch.int32), 0)).start()
    out, _ = torch.ops.helix.hopb_combine(outs, lses, flags, epoch, 0, 10.0, torch.zeros(1, dtype=torch.int32))
    assert torch.equal(out, helix_ext.merge_states(torch.stack(outs), torch.stack(lses))[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "plus_inf"])
def test_a_nan_or_plus_inf_lse_gives_a_nan_row(device, bad):
    # -inf is an absent part and nothing else: a peer's NaN or +inf LSE makes the row NaN, as in
    # merge_states (the same merge math), never a silently dropped part.
    outs, lses, flags, epoch = virtual_peers(3, 4, 2, 16, torch.float32, device, signal_slot=0)
    lses[2][3, 1] = bad
    error = torch.zeros(1, dtype=torch.int32, device=device)
    out, lse = torch.ops.helix.hopb_combine(outs, lses, flags, epoch, 0, 5.0, error)
    assert torch.isnan(out[3, 1]).all() and torch.isnan(lse[3, 1])
    expected_out, expected_lse = helix_ext.merge_states(torch.stack(outs), torch.stack(lses))
    assert torch.equal(out.isnan(), expected_out.isnan()) and torch.equal(lse.isnan(), expected_lse.isnan())
    assert torch.isnan(out).sum() == 16 and torch.isnan(lse).sum() == 1


INT32_MAX = 2 ** 31 - 1


@pytest.mark.parametrize("device", DEVICES)
def test_epochs_wrap_as_serial_numbers(device):
    # Epochs are 32-bit serial numbers: INT32_MAX + 1 wraps to INT32_MIN without overflow, and
    # so does -1 + 1 = 0 (2^32 signals later).
    flags = torch.zeros(2, dtype=torch.int32, device=device)
    epoch = torch.tensor([INT32_MAX - 1, -1], dtype=torch.int32, device=device)
    for expected in (INT32_MAX, -INT32_MAX - 1, -INT32_MAX):
        torch.ops.helix.hopb_signal(flags, epoch, 0)
        assert flags[0].item() == expected and epoch[0].item() == expected
    torch.ops.helix.hopb_signal(flags, epoch, 1)
    assert flags[1].item() == 0 and epoch[1].item() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("start", [INT32_MAX - 1, -2], ids=["int32_wrap", "uint32_wrap"])
def test_a_stale_peer_across_the_wrap_is_waited_for(device, start):
    # Epochs started just below the wrap. This rank signals across it (expected: start + 2,
    # past the wrap); peer 0 has signalled as often, peer 1 one time less: its flag (start + 1,
    # INT32_MAX or -1) is stale and must be waited for, not taken as ahead of the epoch.
    outs, lses, flags, _ = virtual_peers(2, 3, 2, 8, torch.float32, device)
    epochs = [torch.full((4,), start, dtype=torch.int32, device=device) for _ in range(3)]
    own = torch.zeros(4, dtype=torch.int32, device=device)
    for _ in range(2):
        torch.ops.helix.hopb_signal(own, epochs[2], 0)  # this rank
        torch.ops.helix.hopb_signal(flags[0], epochs[0], 0)
    torch.ops.helix.hopb_signal(flags[1], epochs[1], 0)
    assert flags[0][0].item() == epochs[2][0].item() and flags[1][0].item() in (INT32_MAX, -1)
    error = torch.zeros(1, dtype=torch.int32, device=device)
    if device == "cpu":
        with pytest.raises(RuntimeError, match=r"peer 1 did not signal chunk 0"):
            torch.ops.helix.hopb_combine(outs, lses, flags, epochs[2], 0, 0.2, error)
    else:
        torch.ops.helix.hopb_combine(outs, lses, flags, epochs[2], 0, 0.2, error)
        torch.cuda.synchronize()
    assert error.item() == 2
    # Once peer 1 signals, the combine goes through; a peer ahead by one (the next layer's signal
    # already out) passes too.
    torch.ops.helix.hopb_signal(flags[0], epochs[0], 0)
    torch.ops.helix.hopb_signal(flags[1], epochs[1], 0)
    error.zero_()
    out, lse = torch.ops.helix.hopb_combine(outs, lses, flags, epochs[2], 0, 5.0, error)
    assert error.item() == 0
    assert torch.equal(out, helix_ext.merge_states(torch.stack(outs), torch.stack(lses))[0])


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    outs, lses, flags, epoch = virtual_peers(2, 3, 2, 8, torch.float32, device, signal_slot=0)
    error = torch.zeros(1, dtype=torch.int32, device=device)
    cases = [
        (([], [], [], epoch, 0, 1.0, error), r"needs 1 to 32 peers, got 0"),
        ((outs, lses[:1], flags, epoch, 0, 1.0, error), r"must list the same peers"),
        ((outs, lses, flags, epoch, 9, 1.0, error), r"with a flag for chunk 9"),
        (([outs[0], outs[1][:, :1]], lses, flags, epoch, 0, 1.0, error), r"peer_out\[1\] must be contiguous"),
        ((outs, [lses[0], lses[1].double()], flags, epoch, 0, 1.0, error), r"peer_lse\[1\] must be a contiguous float32"),
        (([o.int() for o in outs], lses, flags, epoch, 0, 1.0, error), r"must be float32, bfloat16 or float16"),
        ((outs, lses, flags, epoch, 0, 0.0, error), r"timeout_s must be in \(0, 3600\]"),
        ((outs, lses, flags, epoch, 0, float("inf"), error), r"timeout_s must be in \(0, 3600\]"),
        ((outs, lses, flags, epoch, 0, 1e300, error), r"timeout_s must be in \(0, 3600\]"),
        ((outs, lses, flags, epoch, 0, float("nan"), error), r"timeout_s must be in \(0, 3600\]"),
        # Flags and epochs are read by raw pointer at [chunk]: strided or expanded views are refused.
        ((outs, lses, [flags[0], torch.zeros(8, dtype=torch.int32, device=device)[::2]], epoch, 1, 1.0, error),
         r"peer_flags\[1\] must be a contiguous 1-D int32"),
        ((outs, lses, [flags[0], flags[1][:1].expand(4)], epoch, 1, 1.0, error),
         r"peer_flags\[1\] must be a contiguous 1-D int32"),
        ((outs, lses, flags, torch.zeros(8, dtype=torch.int32, device=device)[::2], 1, 1.0, error),
         r"epoch must be a contiguous 1-D int32"),
        ((outs, lses, flags, epoch[:1].expand(4), 1, 1.0, error), r"epoch must be a contiguous 1-D int32"),
        # D = 0 would leave the merged LSE unwritten.
        (([o[..., :0] for o in outs], lses, flags, epoch, 0, 1.0, error), r"head dim D >= 1"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.helix.hopb_combine(*args)
    # The fake kernel refuses what it can see without data (timeouts, D = 0).
    for args, message in [cases[i] for i in (6, 7, 8, 9, 14)]:
        with pytest.raises(RuntimeError, match=message), torch._subclasses.FakeTensorMode() as mode:
            fake = [[mode.from_tensor(t) for t in a] if isinstance(a, list) else
                    mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            torch.ops.helix.hopb_combine.default(*fake)
    with pytest.raises(RuntimeError, match=r"chunk 5 is outside flags"):
        torch.ops.helix.hopb_signal(flags[0], epoch, 5)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    outs, lses, flags, epoch = virtual_peers(3, 4, 2, 16, torch.bfloat16, device, signal_slot=0)
    outs[1][0, 0] = 0.0  # opcheck compares outputs; keep the garbage finite
    error = torch.zeros(1, dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.helix.hopb_combine.default, (outs, lses, flags, epoch, 0, 5.0, error))
    torch.library.opcheck(torch.ops.helix.hopb_signal.default, (flags[0].clone(), epoch.clone(), 1))


@pytest.mark.gpu
def test_peers_on_concurrent_streams():
    # Peers play on their own streams: they write their partials late and signal; the combine
    # (a few co-resident CTAs) spins until then.
    outs, lses, flags, epoch = virtual_peers(4, 8, 4, 128, torch.bfloat16, "cuda")
    own = torch.zeros_like(epoch)
    torch.ops.helix.hopb_signal(own, epoch, 0)
    finals = [(o.clone(), l.clone()) for o, l in zip(outs, lses)]
    for o, l in zip(outs, lses):
        o.zero_()
        l.fill_(float("-inf"))
    torch.cuda.synchronize()
    error = torch.zeros(1, dtype=torch.int32, device="cuda")
    combine_stream = torch.cuda.Stream()
    with torch.cuda.stream(combine_stream):
        out, lse = torch.ops.helix.hopb_combine(outs, lses, flags, epoch, 0, 20.0, error)
    for peer, (o, l) in enumerate(finals):
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            torch.cuda._sleep(1_000_000)  # let the combine start spinning first
            outs[peer].copy_(o)
            lses[peer].copy_(l)
            torch.ops.helix.hopb_signal(flags[peer], torch.zeros_like(epoch), 0)
    torch.cuda.synchronize()
    assert error.item() == 0
    expected = helix_ext.merge_states(torch.stack([o for o, _ in finals]), torch.stack([l for _, l in finals]))
    torch.testing.assert_close((out, lse), expected, rtol=0, atol=0)


@pytest.mark.gpu
def test_graph_replays_see_new_inputs_and_epochs():
    # Captured: each peer's signal then this rank's signal then the combine. 1000 replays with
    # the inputs changed between them: the device-side epochs advance, no replay reads a stale flag.
    outs, lses, flags, epoch = virtual_peers(4, 16, 8, 64, torch.bfloat16, "cuda")
    peer_epochs = [torch.zeros_like(epoch) for _ in flags]
    own = torch.zeros_like(epoch)
    error = torch.zeros(1, dtype=torch.int32, device="cuda")

    def step():
        for f, e in zip(flags, peer_epochs):
            torch.ops.helix.hopb_signal(f, e, 0)
        torch.ops.helix.hopb_signal(own, epoch, 0)
        return torch.ops.helix.hopb_combine(outs, lses, flags, epoch, 0, 10.0, error)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = step()
    for replay in range(1000):
        for o, l in zip(outs, lses):
            o.copy_(torch.randn_like(o, dtype=torch.float32))
            l.copy_(torch.randn_like(l) * 3)
        graph.replay()
        if replay % 100 == 99 or replay < 3:
            expected = helix_ext.merge_states(torch.stack(outs), torch.stack(lses))
            torch.testing.assert_close((out, lse), expected, rtol=0, atol=0)
    torch.cuda.synchronize()
    assert error.item() == 0 and epoch[0].item() == 1001  # one eager step, then 1000 replays


# ----------------------------------------------------------------------------- hopb_all_reduce
def signalled_parts(num_peers, shape, dtype, device, slot=1, signalling=None):
    """Peers' parts (fresh random values) with flags: the `signalling` peers (default all) and
    this rank have signalled `slot` once (epoch 1)."""
    parts = [(torch.randn(shape, dtype=torch.float64, device=device) * 4).to(dtype) for _ in range(num_peers)]
    flags = [torch.zeros(2, dtype=torch.int32, device=device) for _ in range(num_peers)]
    for peer in range(num_peers) if signalling is None else signalling:
        torch.ops.helix.hopb_signal(flags[peer], torch.zeros(2, dtype=torch.int32, device=device), slot)
    epoch = torch.zeros(2, dtype=torch.int32, device=device)
    torch.ops.helix.hopb_signal(torch.zeros(2, dtype=torch.int32, device=device), epoch, slot)
    return parts, flags, epoch


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("num_peers", [1, 2, 6])
@pytest.mark.parametrize("shape", [(1, 576), (3, 7), (4, 1, 64)], ids=["1x576", "3x7", "4x1x64"])
def test_all_reduce_is_the_sum_of_the_parts(device, dtype, num_peers, shape):
    from helix_ext.reference import hopb_all_reduce_reference

    parts, flags, epoch = signalled_parts(num_peers, shape, dtype, device)
    error = torch.zeros(1, dtype=torch.int32, device=device)
    out = torch.ops.helix.hopb_all_reduce(parts, flags, epoch, 1, 5.0, error)
    assert out.shape == parts[0].shape and out.dtype == dtype and error.item() == 0
    # Exact (float64) sum: within one rounding of the fp32 accumulation per term plus the output's.
    exact = hopb_all_reduce_reference(parts, out_dtype=torch.float64)
    scale = sum(p.double().abs() for p in parts)
    bound = scale * (num_peers * 2.0 ** -24 + torch.finfo(dtype).eps) + 1e-30
    assert ((out.double() - exact).abs() <= bound).all()
    # The kernels' own order (fp32, peer by peer): the same bits, so every rank agrees.
    assert torch.equal(out, hopb_all_reduce_reference(parts, compute_dtype=torch.float32))


@pytest.mark.parametrize("device", DEVICES)
def test_all_reduce_reports_a_peer_that_never_signals(device):
    parts, flags, epoch = signalled_parts(4, (2, 16), torch.float32, device, signalling=[0, 1, 3])
    error = torch.zeros(1, dtype=torch.int32, device=device)
    start = time.monotonic()
    if device == "cpu":
        with pytest.raises(RuntimeError, match=r"hopb_all_reduce: peer 2 did not signal chunk 1 within 0.2 s"):
            torch.ops.helix.hopb_all_reduce(parts, flags, epoch, 1, 0.2, error)
    else:
        torch.ops.helix.hopb_all_reduce(parts, flags, epoch, 1, 0.2, error)
        torch.cuda.synchronize()
    assert error.item() == 3  # 1 + the missing peer
    assert time.monotonic() - start < 30


def test_all_reduce_waits_for_a_late_peer_on_the_cpu():
    parts, flags, epoch = signalled_parts(3, (2, 40), torch.bfloat16, "cpu", signalling=[0, 2])
    final = parts[1].clone()
    parts[1].fill_(float("nan"))  # written by the peer just before it signals

    def late_peer():
        parts[1].copy_(final)
        torch.ops.helix.hopb_signal(flags[1], torch.zeros(2, dtype=torch.int32), 1)

    threading.Timer(0.2, late_peer).start()
    out = torch.ops.helix.hopb_all_reduce(parts, flags, epoch, 1, 10.0, torch.zeros(1, dtype=torch.int32))
    from helix_ext.reference import hopb_all_reduce_reference
    assert torch.equal(out, hopb_all_reduce_reference(parts, compute_dtype=torch.float32))


@pytest.mark.parametrize("device", DEVICES)
def test_all_reduce_bad_inputs(device):
    parts, flags, epoch = signalled_parts(2, (3, 8), torch.float32, device)
    error = torch.zeros(1, dtype=torch.int32, device=device)
    cases = [
        (([], [], epoch, 1, 1.0, error), r"needs 1 to 32 peers, got 0"),
        ((parts, flags[:1], epoch, 1, 1.0, error), r"must list the same peers"),
        ((parts, flags, epoch, 5, 1.0, error), r"with a flag for chunk 5"),
        (([parts[0], parts[1][:, :4]], flags, epoch, 1, 1.0, error), r"peer_parts\[1\] must be contiguous"),
        (([parts[0], parts[1].t().contiguous().t()], flags, epoch, 1, 1.0, error), r"peer_parts\[1\] must be contiguous"),
        (([p.int() for p in parts], flags, epoch, 1, 1.0, error), r"must be float32, bfloat16 or float16"),
        ((parts, [flags[0], torch.zeros(8, dtype=torch.int32, device=device)[::2]], epoch, 1, 1.0, error),
         r"peer_flags\[1\] must be a contiguous 1-D int32"),
        ((parts, flags, epoch[:1].expand(2), 1, 1.0, error), r"epoch must be a contiguous 1-D int32"),
        ((parts, flags, epoch, 1, 1.0, error.float()), r"error must be an int32 tensor"),
        ((parts, flags, epoch, 1, 0.0, error), r"timeout_s must be in \(0, 3600\]"),
        ((parts, flags, epoch, 1, float("nan"), error), r"timeout_s must be in \(0, 3600\]"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.helix.hopb_all_reduce(*args)
    for args, message in [cases[i] for i in (0, 9, 10)]:  # what the fake kernel sees without data
        with pytest.raises(RuntimeError, match=message), torch._subclasses.FakeTensorMode() as mode:
            fake = [[mode.from_tensor(t) for t in a] if isinstance(a, list) else
                    mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            torch.ops.helix.hopb_all_reduce.default(*fake)


@pytest.mark.parametrize("device", DEVICES)
def test_all_reduce_opcheck_and_compile(device):
    parts, flags, epoch = signalled_parts(3, (2, 24), torch.bfloat16, device)
    error = torch.zeros(1, dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.helix.hopb_all_reduce.default, (parts, flags, epoch, 1, 5.0, error))

    def reduce(parts):
        return torch.ops.helix.hopb_all_reduce(parts, flags, epoch, 1, 5.0, error) * 2

    torch.testing.assert_close(torch.compile(reduce, fullgraph=True)(parts), reduce(parts), rtol=0, atol=0)
