"""helix.flash_decode against its float64 reference, on CPU, CUDA (where present) and the emulated CUDA
kernel (the SIMT host runtime, device "simt")."""

from __future__ import annotations

import math

import pytest
import torch

import helix_ext
from helix_ext.reference import flash_decode_reference
from conftest import DEVICES, DEVICES_AND_SIMT, call_op, tensor_device
from tolerance import assert_close_to_reference

NEG_INF = float("-inf")
FP8 = torch.float8_e4m3fn


class Case:
    """A paged decode-attention problem with fresh random contents (never zeros).

    Blocks are dealt to sequences in a shuffled order; block_table entries past a sequence's
    length hold ids that are out of range, which a kernel must never follow.
    """

    def __init__(self, seq_lens, num_q_heads, num_kv_heads, head_dim_k, head_dim_v=None, *, block_size=16,
                 q_dtype=torch.bfloat16, kv_dtype=None, mla=False, device="cpu", spare_blocks=3, num_queries=None,
                 query_key_lens=None):
        self.backend, device = device, tensor_device(device)
        kv_dtype = kv_dtype or q_dtype
        head_dim_v = head_dim_v or head_dim_k
        batch = len(seq_lens)
        blocks_per_seq = [math.ceil(length / block_size) for length in seq_lens]
        max_blocks = max(blocks_per_seq + [1]) + 1
        num_blocks = sum(blocks_per_seq) + spare_blocks
        order = torch.randperm(num_blocks)
        table = torch.randint(num_blocks, num_blocks + 1000, (batch, max_blocks))
        start = 0
        for b, count in enumerate(blocks_per_seq):
            table[b, :count] = order[start:start + count]
            start += count
        # num_queries: q [B, Q, Hq, Dk] (several query tokens per sequence), seeing
        # query_key_lens [B][Q] keys each (None: the op's default, causal over the last Q keys).
        q_shape = (batch, num_q_heads, head_dim_k) if num_queries is None else (batch, num_queries, num_q_heads,
                                                                                 head_dim_k)
        self.q = torch.randn(q_shape).to(q_dtype).to(device)
        self.query_key_lens = (None if query_key_lens is None else
                               torch.tensor(query_key_lens, dtype=torch.int32, device=device))
        self.k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim_k).to(kv_dtype).to(device)
        self.v_cache = None if mla else torch.randn(num_blocks, block_size, num_kv_heads, head_dim_v).to(kv_dtype).to(device)
        self.block_table = table.to(torch.int32).to(device)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        self.softmax_scale = head_dim_k ** -0.5
        self.head_dim_v = head_dim_v if mla else -1
        fp8 = kv_dtype == FP8
        self.k_scale = torch.tensor(0.5 + torch.rand(()).item(), device=device) if fp8 else None
        self.v_scale = torch.tensor(0.5 + torch.rand(()).item(), device=device) if fp8 and not mla else None

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.block_table, self.seq_lens, self.softmax_scale,
                self.head_dim_v, self.k_scale, self.v_scale)

    def run(self, num_splits=0, **simt_options):
        extra = {} if self.query_key_lens is None else {"query_key_lens": self.query_key_lens}
        return call_op(self.backend, "flash_decode", *self.args(), num_splits=num_splits, **extra, **simt_options)

    def reference(self, **kwargs):
        cpu_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in self.args()]
        lens = None if self.query_key_lens is None else self.query_key_lens.cpu()
        return flash_decode_reference(*cpu_args, query_key_lens=lens, **kwargs)

    def keys_seen(self):
        """[B, Q] (a 3-D q: [B]): how many keys each query token sees."""
        lens = self.seq_lens.cpu().long()
        if self.q.dim() == 3:
            return lens
        if self.query_key_lens is not None:
            return self.query_key_lens.cpu().long()
        num_queries = self.q.shape[1]
        return (lens[:, None] + torch.arange(num_queries) - num_queries + 1).clamp(min=0)

    def check(self, num_splits=0, **simt_options):
        out, lse = self.run(num_splits, **simt_options)
        assert out.dtype == self.q.dtype and lse.dtype == torch.float32
        assert out.device == self.q.device and out.is_contiguous() and lse.is_contiguous()
        ref_out, ref_lse = self.reference(out_dtype=torch.float64)
        # Baseline: the same attention in fp32 with probabilities rounded to q's dtype before
        # they weight V, as a tensor-core kernel (and FlashAttention) computes it.
        base_out, base_lse = self.reference(compute_dtype=torch.float32, probability_dtype=self.q.dtype)
        terms = max(1, int(self.seq_lens.max()))
        assert_close_to_reference(out, ref_out, base_out, accumulated_terms=terms, name="out")
        assert_close_to_reference(lse, ref_lse, base_lse, accumulated_terms=terms, name="lse")
        empty = self.keys_seen() == 0
        assert torch.all(out[empty.to(out.device)] == 0) and torch.all(lse[empty.to(lse.device)] == NEG_INF)
        return out, lse


LENGTHS = [0, 1, 15, 16, 17, 100]  # with block_size 16: empty, one token, block_size - 1, +0, +1, several


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 2, 3, 5, 7, 8, 16])
def test_gqa_groups_and_head_dims(device, head_dim, group):
    Case(LENGTHS, num_q_heads=2 * group, num_kv_heads=2, head_dim_k=head_dim, device=device).check()


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_group_of_128_heads(device, num_kv_heads):
    Case([0, 33, 130], num_q_heads=128 * num_kv_heads, num_kv_heads=num_kv_heads, head_dim_k=128,
         device=device).check()


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
@pytest.mark.parametrize("block_size", [1, 7, 16, 64, 256])
def test_block_sizes(device, block_size):
    lengths = [block_size - 1, block_size, block_size + 1, 3 * block_size + 5]
    Case(lengths, num_q_heads=8, num_kv_heads=2, head_dim_k=128, block_size=block_size, device=device).check()


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("fp8", [False, True], ids=["kv_same", "kv_fp8"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_dtypes(device, q_dtype, fp8, head_dim):
    Case([3, 40, 77], num_q_heads=8, num_kv_heads=2, head_dim_k=head_dim, q_dtype=q_dtype,
         kv_dtype=FP8 if fp8 else q_dtype, device=device).check()


def test_float32_on_the_cpu():
    # float32 caches and queries (the runtime's exact-arithmetic test models): no rounding of P.
    Case([0, 7, 300], num_q_heads=6, num_kv_heads=2, head_dim_k=48, q_dtype=torch.float32).check()
    Case([5, 70], num_q_heads=4, num_kv_heads=1, head_dim_k=80, head_dim_v=64, q_dtype=torch.float32,
         mla=True).check()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("q_dtype, kv_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                                (torch.bfloat16, FP8), (torch.float32, torch.float32)],
                         ids=["bf16", "fp16", "fp8", "fp32"])
@pytest.mark.parametrize("group, num_kv_heads, head_dim", [(1, 8, 128), (3, 6, 72), (4, 5, 48), (2, 3, 7)])
def test_cpu_vector_items_span_kv_heads(threads, q_dtype, kv_dtype, group, num_kv_heads, head_dim):
    # The CPU vector engine (groups of 1-4) gives a work item several KV heads (up to 16 query
    # heads: here 8, 5+1, 4+1 and 3 KV heads per item) when there are items enough for the
    # threads; head dims with 32-wide, 16-wide and scalar tails; tiles that end mid-block.
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        Case([0, 1, 130, 2100, 4200], num_q_heads=group * num_kv_heads, num_kv_heads=num_kv_heads,
             head_dim_k=head_dim, block_size=48, q_dtype=q_dtype, kv_dtype=kv_dtype).check()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
@pytest.mark.parametrize("group, head_dim", [(16, 128), (1, 128), (8, 72)])
@pytest.mark.parametrize("codes", ["finite", "small"])
def test_fp8_cache_holding_every_code(device, group, head_dim, codes):
    # Every finite E4M3 code (+-0 to +-448) in K and in V, or only the subnormal and smallest
    # normal ones (magnitudes up to 2^-5, so that an error in one of them is not lost beside
    # values of hundreds): the CPU converts rows 32 codes at a time in 16-bit lanes (normal codes
    # by shifts, subnormals from a table) with scalar tails (72 = 2 * 32 + 8); the AMX engine
    # (group 16) and the vector one (groups 1, 8). The CUDA kernel's head dims are 64, 128, 256.
    head_dim = 64 if head_dim == 72 and device != "cpu" else head_dim
    case = Case([0, 5, 300, 700], num_q_heads=2 * group, num_kv_heads=2, head_dim_k=head_dim, block_size=64,
                kv_dtype=FP8, device=device)
    magnitude_end = 0x7F if codes == "finite" else 0x10
    chosen = torch.tensor([c for c in range(256) if c & 0x7F < magnitude_end], dtype=torch.uint8)
    for name in ("k_cache", "v_cache"):
        cache = getattr(case, name)
        picks = chosen[torch.randint(len(chosen), (cache.numel(),))]
        picks[: len(chosen)] = chosen  # each code at least once, in the first rows
        setattr(case, name, picks.view(FP8).view(cache.shape).to(cache.device))
    case.q = case.q / 64 if codes == "finite" else case.q * 64  # scores of a few units either way
    case.check()


# Several query tokens per sequence (q [B, Q, Hq, Dk]): the CPU kernel so far (the CUDA one
# takes Q = 1; see test_cuda_refuses_several_query_tokens).
QUERY_DTYPES = [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, FP8),
                (torch.float32, torch.float32)]


@pytest.mark.parametrize("q_dtype, kv_dtype", QUERY_DTYPES, ids=["bf16", "fp16", "fp8", "fp32"])
@pytest.mark.parametrize("num_queries", [2, 4, 8])
@pytest.mark.parametrize("group, num_kv_heads, head_dim", [(16, 1, 128), (4, 2, 64), (1, 4, 128), (3, 2, 72)])
def test_several_query_tokens_causal_default(q_dtype, kv_dtype, num_queries, group, num_kv_heads, head_dim):
    # The default visibility: causal over the shard's last Q keys (a sequence shorter than Q has
    # queries that see nothing). Q x group rows per KV head: the AMX engine (bf16, Q x group > 4)
    # and the vector one; lengths across 2048-token work items and 512-token softmax spans.
    Case([0, 1, 3, 70, 2049, 2600], num_q_heads=group * num_kv_heads, num_kv_heads=num_kv_heads,
         head_dim_k=head_dim, block_size=32, q_dtype=q_dtype, kv_dtype=kv_dtype, num_queries=num_queries).check()


# Visibility on Helix shards: 4 query tokens (the last accepted one and 3 drafts) whose keys were
# appended round-robin: on the owner of the first two new keys every query sees the old keys and
# the new ones up to its own; on the next owner the first two queries see only old keys; a query
# that sees nothing (a shard that holds only later tokens); the boundaries of work items.
SHARD_VISIBILITY = {
    "first_owner": ([300, 2050], [[298, 299, 300, 300], [2048, 2049, 2050, 2050]]),
    "second_owner": ([300, 2050], [[298, 298, 299, 300], [2048, 2048, 2049, 2050]]),
    "sees_nothing": ([5, 40], [[0, 0, 3, 5], [0, 1, 1, 40]]),
    "across_items": ([4200, 4097], [[2047, 2048, 2049, 4200], [1, 2048, 4096, 4097]]),
}


@pytest.mark.parametrize("q_dtype, kv_dtype", QUERY_DTYPES, ids=["bf16", "fp16", "fp8", "fp32"])
@pytest.mark.parametrize("pattern", list(SHARD_VISIBILITY))
@pytest.mark.parametrize("group, num_kv_heads", [(16, 1), (2, 2), (1, 8)])
def test_several_query_tokens_given_visibility(q_dtype, kv_dtype, pattern, group, num_kv_heads):
    lengths, visible = SHARD_VISIBILITY[pattern]
    Case(lengths, num_q_heads=group * num_kv_heads, num_kv_heads=num_kv_heads, head_dim_k=64, block_size=64,
         q_dtype=q_dtype, kv_dtype=kv_dtype, num_queries=4, query_key_lens=visible).check()


@pytest.mark.parametrize("fp8", [False, True], ids=["kv_same", "kv_fp8"])
@pytest.mark.parametrize("num_queries", [2, 5])
def test_several_query_tokens_mla(fp8, num_queries):
    # MLA (V inside the K entry), 16 heads: Q x 16 rows (80 with Q = 5: two head slabs).
    Case([0, 9, 700], num_q_heads=16, num_kv_heads=1, head_dim_k=576, head_dim_v=512, block_size=64,
         kv_dtype=FP8 if fp8 else torch.bfloat16, mla=True, num_queries=num_queries).check()


@pytest.mark.parametrize("block_size", [1, 7, 64])
def test_several_query_tokens_block_sizes(block_size):
    Case([block_size - 1 or 1, block_size + 1, 3 * block_size + 5], num_q_heads=8, num_kv_heads=2, head_dim_k=64,
         block_size=block_size, num_queries=3).check()


@pytest.mark.parametrize("q_dtype, kv_dtype", QUERY_DTYPES, ids=["bf16", "fp16", "fp8", "fp32"])
@pytest.mark.parametrize("group, num_kv_heads", [(16, 1), (1, 4)])
def test_one_query_token_in_4d_is_the_3d_result_bit_for_bit(q_dtype, kv_dtype, group, num_kv_heads):
    # q [B, 1, Hq, Dk], with query_key_lens = seq_lens or without, gives the 3-D op's bits.
    case = Case([0, 1, 100, 2500], num_q_heads=group * num_kv_heads, num_kv_heads=num_kv_heads, head_dim_k=128,
                block_size=64, q_dtype=q_dtype, kv_dtype=kv_dtype)
    out, lse = case.run()
    args = list(case.args())
    args[0] = case.q.unsqueeze(1)
    for lens in (None, case.seq_lens[:, None].clone()):
        out4, lse4 = helix_ext.flash_decode(*args, query_key_lens=lens)
        assert out4.shape == (4, 1, group * num_kv_heads, 128) and lse4.shape == (4, 1, group * num_kv_heads)
        assert torch.equal(out4[:, 0].view(torch.int16 if out.dtype != torch.float32 else torch.int32),
                           out.view(torch.int16 if out.dtype != torch.float32 else torch.int32))
        assert torch.equal(lse4[:, 0].view(torch.int32), lse.view(torch.int32))


def test_several_query_tokens_match_one_query_at_a_time():
    # Query i of a Q-token call equals a 1-token call over its visible keys (seq_lens =
    # query_key_lens[:, i]) to rounding: the kernel's rows are independent.
    case = Case([700, 2100], num_q_heads=8, num_kv_heads=1, head_dim_k=128, block_size=64,
                q_dtype=torch.float32, num_queries=4, query_key_lens=[[0, 350, 699, 700], [2047, 2048, 2049, 2100]])
    out, lse = case.run()
    args = list(case.args())
    for i in range(4):
        args[0], args[4] = case.q[:, i], case.query_key_lens[:, i].contiguous()
        single_out, single_lse = helix_ext.flash_decode(*args)
        torch.testing.assert_close(out[:, i], single_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse[:, i], single_lse, rtol=1e-6, atol=1e-6)


def test_several_query_tokens_bad_inputs():
    case = Case([5, 20], num_q_heads=4, num_kv_heads=2, head_dim_k=64, block_size=8, num_queries=3)
    args = case.args()

    def lens(rows, dtype=torch.int32):
        return torch.tensor(rows, dtype=dtype)

    bad = [
        (lens([[1, 2, 3]]), r"query_key_lens must be 2-D \[B=2, Q=3\]"),
        (lens([[1, 2, 3], [1, 2, 3]], torch.int64), r"query_key_lens must be int32"),
        (lens([[1, 3, 2], [1, 2, 3]]), r"query_key_lens\[0, 2\] = 2 must be in \[3, seq_lens\[0\] = 5\]"),
        (lens([[1, 2, 6], [1, 2, 3]]), r"query_key_lens\[0, 2\] = 6 must be in \[2, seq_lens\[0\] = 5\]"),
        (lens([[1, 2, 3], [-1, 2, 3]]), r"query_key_lens\[1, 0\] = -1 must be in \[0, seq_lens\[1\] = 20\]"),
    ]
    for value, message in bad:
        with pytest.raises(RuntimeError, match=message):
            helix_ext.flash_decode(*args, query_key_lens=value)
    with pytest.raises(RuntimeError, match=r"query_key_lens must be 2-D"), torch._subclasses.FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        torch.ops.helix.flash_decode.default(*fake, query_key_lens=mode.from_tensor(lens([[1, 2, 3]])))
    with pytest.raises(RuntimeError, match=r"q must be 3-D \[B, Hq, Dk\] or 4-D"):
        helix_ext.flash_decode(case.q[None], *args[1:])


CUDA_KERNEL_DEVICES = [d for d in DEVICES_AND_SIMT if d != "cpu"]


@pytest.mark.parametrize("device", CUDA_KERNEL_DEVICES)
@pytest.mark.parametrize("num_splits", [0, 3])
@pytest.mark.parametrize("q_dtype, kv_dtype", QUERY_DTYPES[:3], ids=["bf16", "fp16", "fp8"])
@pytest.mark.parametrize("num_queries, group, num_kv_heads, head_dim",
                         [(2, 16, 1, 128), (4, 4, 2, 64), (3, 1, 4, 128), (8, 3, 2, 64)])
def test_several_query_tokens_cuda_kernel(device, num_splits, q_dtype, kv_dtype, num_queries, group, num_kv_heads,
                                          head_dim):
    # The CUDA kernel packs a KV head's Q x group rows into its 16-row MMA tiles (Q x 16 = 32
    # rows: two head tiles; 8 x 3 = 24: a partial second tile), each row masking the keys its
    # query does not see; splits of the token range merged per (query, head) row.
    Case([0, 1, 3, 70, 300], num_q_heads=group * num_kv_heads, num_kv_heads=num_kv_heads, head_dim_k=head_dim,
         block_size=16, q_dtype=q_dtype, kv_dtype=kv_dtype, num_queries=num_queries, device=device).check(num_splits)


@pytest.mark.parametrize("device", CUDA_KERNEL_DEVICES)
@pytest.mark.parametrize("pattern", list(SHARD_VISIBILITY))
@pytest.mark.parametrize("num_splits", [0, 4])
def test_several_query_tokens_given_visibility_cuda_kernel(device, pattern, num_splits):
    lengths, visible = SHARD_VISIBILITY[pattern]
    Case(lengths, num_q_heads=8, num_kv_heads=2, head_dim_k=64, block_size=64, num_queries=4, query_key_lens=visible,
         device=device).check(num_splits)


@pytest.mark.parametrize("device", CUDA_KERNEL_DEVICES)
@pytest.mark.parametrize("fp8", [False, True], ids=["kv_same", "kv_fp8"])
def test_several_query_tokens_mla_cuda_kernel(device, fp8):
    Case([0, 9, 130], num_q_heads=16, num_kv_heads=1, head_dim_k=576, head_dim_v=512, block_size=64,
         kv_dtype=FP8 if fp8 else torch.bfloat16, mla=True, num_queries=2, device=device).check()


@pytest.mark.parametrize("device", CUDA_KERNEL_DEVICES)
def test_one_query_token_in_4d_cuda_kernel(device):
    case = Case([0, 5, 200], num_q_heads=8, num_kv_heads=2, head_dim_k=64, block_size=16, device=device)
    out, lse = case.run()
    case.q = case.q.unsqueeze(1)
    out4, lse4 = case.check()
    assert torch.equal(out4[:, 0].cpu().view(torch.int16), out.cpu().view(torch.int16))
    assert torch.equal(lse4[:, 0].cpu(), lse.cpu())


@pytest.mark.parametrize("dpbf16", ["1", "0"], ids=["dpbf16", "fp32_loops"])
@pytest.mark.parametrize("group, head_dim", [(1, 128), (2, 64), (4, 256), (3, 72)])
def test_cpu_bf16_vector_engine_both_product_paths(monkeypatch, dpbf16, group, head_dim):
    # bf16 q and K/V in the vector engine: vdpbf16ps where the CPU has AVX512-BF16 (its P x V
    # for Dv a multiple of 32; 72 takes the fp32 loops for P x V), and the fp32 loops
    # (HELIX_CPU_DPBF16=0, or a CPU without it): both against the reference.
    monkeypatch.setenv("HELIX_CPU_DPBF16", dpbf16)
    Case([0, 1, 63, 64, 65, 700], num_q_heads=2 * group, num_kv_heads=2, head_dim_k=head_dim, block_size=32).check()


@pytest.mark.gpu
def test_float32_is_rejected_on_cuda():
    with pytest.raises(RuntimeError, match=r"float32 runs on the CPU only"):
        Case([5], num_q_heads=4, num_kv_heads=2, head_dim_k=64, q_dtype=torch.float32, device="cuda").run()


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
@pytest.mark.parametrize("num_q_heads", [16, 128])
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("fp8", [False, True], ids=["kv_same", "kv_fp8"])
def test_mla(device, num_q_heads, q_dtype, fp8):
    Case([0, 1, 63, 64, 65, 300], num_q_heads=num_q_heads, num_kv_heads=1, head_dim_k=576, head_dim_v=512,
         block_size=64, q_dtype=q_dtype, kv_dtype=FP8 if fp8 else q_dtype, mla=True, device=device).check()


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_mla_forced_num_splits(device, num_splits):
    # MLA's two Dv warps split each score's 576-deep reduction and add the halves through
    # shared memory: one split, several, tiles cut short, two head tiles (128 heads).
    Case([1, 65, 300], num_q_heads=128, num_kv_heads=1, head_dim_k=576, head_dim_v=512, block_size=64,
         mla=True, device=device).check(num_splits=num_splits)


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
def test_long_sequences(device):
    # Longer than one CPU chunk (2048 tokens) and many GPU tiles and splits.
    Case([5000, 2049, 1], num_q_heads=16, num_kv_heads=2, head_dim_k=128, block_size=64, device=device).check()


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
@pytest.mark.parametrize("num_splits", [1, 2, 7, 64])
def test_forced_num_splits(device, num_splits):
    case = Case([0, 1, 300, 1000], num_q_heads=8, num_kv_heads=1, head_dim_k=128, block_size=32, device=device)
    case.check(num_splits=num_splits)


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
def test_strided_inputs(device):
    # K and V as views of one fused [num_blocks, block_size, 2, Hkv, D] cache, q as a slice of a
    # wider buffer, block_table as a column slice: strides everywhere but the head dim.
    case = Case([20, 47], num_q_heads=6, num_kv_heads=3, head_dim_k=64, block_size=8, device=device)
    device = tensor_device(device)
    fused = torch.stack([case.k_cache, case.v_cache], dim=2)
    case.k_cache, case.v_cache = fused[:, :, 0], fused[:, :, 1]
    wide_q = torch.randn(case.q.shape[0], case.q.shape[1], 72, device=device).to(case.q.dtype)
    wide_q[..., :64] = case.q
    case.q = wide_q[..., :64]
    wide_table = torch.zeros(case.block_table.shape[0], case.block_table.shape[1] + 2, dtype=torch.int32,
                             device=device)
    wide_table[:, 1:-1] = case.block_table
    case.block_table = wide_table[:, 1:-1]
    assert not case.k_cache.is_contiguous() and not case.q.is_contiguous() and not case.block_table.is_contiguous()
    case.check()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kvp", range(2, 9))
def test_helix_sharding_reproduces_unsharded_attention(device, kvp):
    """Deal every sequence's blocks round-robin over KVP shards (as Helix's KV cache does),
    run flash_decode on each shard, merge_states the partials: the unsharded answer."""
    block_size = 16
    case = Case([0, 5, 16, 130, 400], num_q_heads=8, num_kv_heads=2, head_dim_k=128, block_size=block_size,
                device=device)
    lengths = case.seq_lens.cpu().tolist()
    parts_out, parts_lse = [], []
    for shard in range(kvp):
        tables, shard_lengths = [], []
        for b, length in enumerate(lengths):
            logical = list(range(shard, math.ceil(length / block_size), kvp))
            tokens = sum(min(block_size, length - i * block_size) for i in logical)
            row = case.block_table[b].cpu()[logical].tolist() + [0] * (case.block_table.shape[1] - len(logical))
            tables.append(row)
            shard_lengths.append(tokens)
        out, lse = helix_ext.flash_decode(case.q, case.k_cache, case.v_cache,
                                          torch.tensor(tables, dtype=torch.int32, device=device),
                                          torch.tensor(shard_lengths, dtype=torch.int32, device=device),
                                          case.softmax_scale)
        parts_out.append(out)
        parts_lse.append(lse)
    merged_out, merged_lse = helix_ext.merge_states(torch.stack(parts_out), torch.stack(parts_lse))
    ref_out, ref_lse = case.reference(out_dtype=torch.float64)
    base_out, base_lse = case.reference(compute_dtype=torch.float32, probability_dtype=case.q.dtype)
    # Each shard rounds its output to bf16 before the merge: allow a couple more ulps.
    assert_close_to_reference(merged_out, ref_out, base_out, ulps=4.0, accumulated_terms=400, name="merged out")
    assert_close_to_reference(merged_lse, ref_lse, base_lse, accumulated_terms=400, name="merged lse")


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
@pytest.mark.parametrize("where", ["q", "k", "k_fp8_nan_code", "k_scale", "v_cache_past_length"])
def test_nan_scores_give_nan_rows(device, where):
    # -inf means an empty shard and nothing else: a NaN score makes its (b, h) row NaN, out and
    # lse alike (never 0 and -inf, which the merge would silently drop), on every split count.
    # Garbage past a sequence's length is never read.
    fp8 = where in ("k_fp8_nan_code", "k_scale")
    case = Case([0, 40, 37, 3000], num_q_heads=4, num_kv_heads=2, head_dim_k=64, block_size=16, device=device,
                kv_dtype=FP8 if fp8 else None)
    poisoned = torch.zeros(4, 4, dtype=torch.bool)
    if where == "q":
        case.q[1, 2, 5] = float("nan")
        case.q[3, 0, 0] = float("nan")
        poisoned[1, 2] = poisoned[3, 0] = True
    elif where in ("k", "k_fp8_nan_code"):
        block = case.block_table[2, 1].item()  # sequence 2, token 16 + 3, KV head 1
        if where == "k":
            case.k_cache[block, 3, 1, 7] = float("nan")
        else:
            case.k_cache.view(torch.uint8)[block, 3, 1, 7] = 0x7F  # e4m3's NaN code
        poisoned[2, 2:] = True
        block = case.block_table[3, 150].item()  # sequence 3, token 2400 (beyond the CPU's first chunk)
        case.k_cache[block, 0, 0] = float("nan")
        poisoned[3, :2] = True
    elif where == "k_scale":
        case.k_scale = torch.tensor(float("nan"), device=case.q.device)
        poisoned[1:] = True
    else:
        # NaN in K and V past sequence 2's length (37 = 2 blocks + 5 tokens): never read.
        block = case.block_table[2, 2].item()
        case.k_cache[block, 5:] = float("nan")
        case.v_cache[block, 5:] = float("nan")
    reference_out, reference_lse = case.reference(out_dtype=torch.float64)
    assert torch.equal(torch.isnan(reference_lse), poisoned)
    for num_splits in (0, 1, 3):
        out, lse = case.check(num_splits=num_splits)
        assert torch.isnan(out.cpu()[poisoned]).all() and torch.isnan(lse.cpu()[poisoned]).all(), num_splits
        assert not torch.isnan(out.cpu()[~poisoned]).any() and not torch.isnan(lse.cpu()[~poisoned]).any()


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
def test_overflowing_scores_give_nan_rows(device):
    # Finite bf16 q and k whose dot products overflow fp32 (1e20 * 1e20 * 64): the kernels' scores
    # are +-inf or NaN, so the row is NaN (the float64 reference stays finite: no comparison).
    case = Case([0, 30, 2500], num_q_heads=2, num_kv_heads=1, head_dim_k=64, block_size=16, device=device)
    case.q[1:, 0] = 1e20
    block = case.block_table[1, 1].item()
    case.k_cache[block, 2, 0] = 1e20  # sequence 1, token 18: one score overflows, head 0 only
    case.k_cache[case.block_table[2, 100].item(), 0, 0] = 1e20  # sequence 2, token 1600
    for num_splits in (0, 1, 4):
        out, lse = case.run(num_splits=num_splits)
        out, lse = out.cpu(), lse.cpu()
        for b in (1, 2):
            assert torch.isnan(out[b, 0]).all() and torch.isnan(lse[b, 0]), (b, num_splits)
            assert torch.isfinite(out[b, 1]).all() and torch.isfinite(lse[b, 1]), (b, num_splits)
        assert torch.all(out[0] == 0) and torch.all(lse[0] == NEG_INF)


def test_size_one_last_dim_with_any_stride():
    # Strides of size-1 dims do not matter: a last dim of size 1 is contiguous whatever its
    # stride (CPU only: the CUDA kernel takes head dims of 64 and up).
    case = Case([3, 17], num_q_heads=2, num_kv_heads=1, head_dim_k=1, block_size=8, q_dtype=torch.float32)
    for name in ("q", "k_cache", "v_cache"):
        tensor = getattr(case, name)
        strided = tensor.as_strided(tensor.shape, (*tensor.stride()[:-1], 7))
        assert strided.stride(-1) == 7 and torch.equal(strided, tensor)
        setattr(case, name, strided)
    case.check()


@pytest.mark.parametrize("device", DEVICES)
def test_huge_expanded_block_table_is_a_clear_error(device, monkeypatch):
    # A block_table expanded to 2^62 columns: max_blocks * block_size overflows int64 unless the
    # capacity is computed in checked arithmetic; the length check must still name seq_lens.
    monkeypatch.setenv("HELIX_CHECK_INPUTS", "1")
    case = Case([5], num_q_heads=4, num_kv_heads=2, head_dim_k=64, block_size=8, device=device)
    table = case.block_table[:, :1].expand(1, 2 ** 62)  # 2^62 blocks of 8 tokens: 2^65 tokens
    lens = torch.tensor([-1], dtype=torch.int32, device=case.q.device)
    message = r"seq_lens\[0\] = -1 is outside \[0, max_blocks \* block_size"
    if device == "cuda":
        message += r"|block_table holds \d+ blocks of 8 tokens per sequence"
    with pytest.raises(RuntimeError, match=message):
        helix_ext.flash_decode(case.q, case.k_cache, case.v_cache, table, lens, case.softmax_scale)


def bad_inputs(device):
    case = Case([5, 20], num_q_heads=4, num_kv_heads=2, head_dim_k=64, block_size=8, device=device)
    q, k, v, table, lens, scale = case.q, case.k_cache, case.v_cache, case.block_table, case.seq_lens, 0.125
    bad_table = table.clone()
    bad_table[1, 0] = k.shape[0]
    negative_table = table.clone()
    negative_table[0, 0] = -1
    too_long = lens.clone()
    too_long[0] = table.shape[1] * k.shape[1] + 1
    fp8_k, fp8_v = k.to(FP8), v.to(FP8)
    one = torch.tensor(1.0, device=device)
    return [
        ("block id out of range", (q, k, v, bad_table, lens, scale), {}, r"block_table\[1, 0\] = \d+ is not a block id"),
        ("negative block id", (q, k, v, negative_table, lens, scale), {}, r"block_table\[0, 0\] = -1"),
        ("seq_len beyond its table", (q, k, v, table, too_long, scale), {}, r"seq_lens\[0\] = \d+ is outside"),
        ("Hq not a multiple of Hkv", (q[:, :3], k, v, table, lens, scale), {}, r"multiple of k_cache's KV head count"),
        ("head dim mismatch", (q[..., :32], k, v, table, lens, scale), {}, r"k_cache's head dim \(64\) must equal"),
        ("v dtype mismatch", (q, k, v.half(), table, lens, scale), {}, r"v_cache must have k_cache's dtype"),
        ("q float64", (q.double(), k, v, table, lens, scale), {}, r"q must be bfloat16, float16 or float32"),
        ("cache dtype mismatch", (q, k.half(), v.half(), table, lens, scale), {}, r"k_cache must have q's dtype"),
        ("fp8 without k_scale", (q, fp8_k, fp8_v, table, lens, scale), {}, r"k_scale is required"),
        ("fp8 without v_scale", (q, fp8_k, fp8_v, table, lens, scale), {"k_scale": one}, r"v_scale is required"),
        ("int64 block_table", (q, k, v, table.long(), lens, scale), {}, r"block_table must be int32"),
        ("int64 seq_lens", (q, k, v, table, lens.long(), scale), {}, r"seq_lens must be int32"),
        ("2-D q", (q[0], k, v, table, lens, scale), {}, r"q must be 3-D"),
        ("3-D k_cache", (q, k[0], v, table, lens, scale), {}, r"k_cache must be 4-D"),
        ("v_cache shape", (q, k, v[:, :4], table, lens, scale), {}, r"v_cache must match k_cache"),
        ("v_scale with MLA", (q, k, None, table, lens, scale), {"v_scale": one}, r"v_scale must be None"),
        ("MLA head_dim_v > Dk", (q, k, None, table, lens, scale), {"head_dim_v": 65}, r"head_dim_v must be -1 or in"),
        ("seq_lens batch", (q, k, v, table, lens[:1], scale), {}, r"seq_lens must be 1-D \[B=2\]"),
        ("scale shape", (q, k, v, table, lens, scale), {"k_scale": torch.ones(2, device=device)},
         r"k_scale must be a float32 tensor with one element"),
        ("non-finite softmax_scale", (q, k, v, table, lens, float("nan")), {}, r"softmax_scale must be finite"),
        # Finite as a double, infinite as the float the kernels use.
        ("softmax_scale beyond float32", (q, k, v, table, lens, 1e39), {}, r"softmax_scale must be finite in float32"),
        ("negative softmax_scale beyond float32", (q, k, v, table, lens, -3.5e38), {},
         r"softmax_scale must be finite in float32"),
        # Finite in float32, but the kernels scale it by log2(e): 3e38 * 1.44 is inf.
        ("softmax_scale times log2(e) beyond float32", (q, k, v, table, lens, 3e38), {},
         r"softmax_scale must be finite in float32 times log2\(e\)"),
        ("q's last dim strided", (torch.randn(2, 4, 128, device=device).to(q.dtype)[..., ::2], k, v, table, lens,
                                  scale), {}, r"q's last dim must be contiguous"),
    ]


VALUE_CHECKS = ("block id out of range", "negative block id", "seq_len beyond its table")


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device, monkeypatch):
    monkeypatch.setenv("HELIX_CHECK_INPUTS", "1")  # value checks on CUDA too
    for label, args, kwargs, message in bad_inputs(device):
        with pytest.raises(RuntimeError, match=message):
            helix_ext.flash_decode(*args, **kwargs)
        if label in VALUE_CHECKS:
            continue  # values are not checked while tracing
        with pytest.raises(RuntimeError, match=message), torch._subclasses.FakeTensorMode() as mode:
            fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake_kwargs = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            torch.ops.helix.flash_decode.default(*fake, **fake_kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mla", [False, True], ids=["gqa", "mla"])
def test_opcheck(device, mla):
    if mla:
        case = Case([3, 70], num_q_heads=16, num_kv_heads=1, head_dim_k=576, head_dim_v=512, block_size=64,
                    mla=True, device=device)
    else:
        # (Not fp8: opcheck's schema check multiplies inputs, which torch cannot do in float8.)
        case = Case([3, 70], num_q_heads=8, num_kv_heads=2, head_dim_k=64, q_dtype=torch.float16, device=device)
    torch.library.opcheck(torch.ops.helix.flash_decode.default, case.args())


def test_opcheck_several_query_tokens():
    case = Case([3, 70], num_q_heads=8, num_kv_heads=2, head_dim_k=64, q_dtype=torch.float16, num_queries=3,
                query_key_lens=[[1, 2, 3], [0, 69, 70]])
    torch.library.opcheck(torch.ops.helix.flash_decode.default, case.args(),
                          {"query_key_lens": case.query_key_lens})


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile(device):
    torch._dynamo.reset()
    case = Case([3, 70], num_q_heads=8, num_kv_heads=2, head_dim_k=64, device=device)

    def step(q, k_cache, v_cache, block_table, seq_lens):
        out, lse = helix_ext.flash_decode(q, k_cache, v_cache, block_table, seq_lens, 0.125)
        return out.float() * 2, lse

    compiled = torch.compile(step, fullgraph=True)
    inputs = (case.q, case.k_cache, case.v_cache, case.block_table, case.seq_lens)
    torch.testing.assert_close(compiled(*inputs), step(*inputs), rtol=0, atol=0)


def test_torch_compile_several_query_tokens():
    torch._dynamo.reset()
    case = Case([3, 70], num_q_heads=8, num_kv_heads=2, head_dim_k=64, num_queries=4,
                query_key_lens=[[0, 1, 2, 3], [40, 41, 70, 70]])

    def step(q, k_cache, v_cache, block_table, seq_lens, query_key_lens):
        out, lse = helix_ext.flash_decode(q, k_cache, v_cache, block_table, seq_lens, 0.125,
                                          query_key_lens=query_key_lens)
        return out.float() * 2, lse

    compiled = torch.compile(step, fullgraph=True)
    inputs = (case.q, case.k_cache, case.v_cache, case.block_table, case.seq_lens, case.query_key_lens)
    torch.testing.assert_close(compiled(*inputs), step(*inputs), rtol=0, atol=0)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    # Capacity for 300 tokens per sequence; each replay brings new lengths (within it), a new
    # block assignment and new cache/query contents in the captured buffers.
    case = Case([300, 300, 300], num_q_heads=16, num_kv_heads=2, head_dim_k=128, block_size=16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        case.run()  # warm up (kernel attributes, workspace sizes) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_lse = case.run()
    used_blocks = math.ceil(300 / 16)
    for lengths in ([10, 300, 0], [290, 1, 77], [0, 0, 5]):
        case.q.copy_(torch.randn_like(case.q, dtype=torch.float32))
        case.k_cache.copy_(torch.randn_like(case.k_cache, dtype=torch.float32))
        case.v_cache.copy_(torch.randn_like(case.v_cache, dtype=torch.float32))
        order = torch.randperm(case.k_cache.shape[0], device="cuda")[:3 * used_blocks].view(3, used_blocks)
        case.block_table[:, :used_blocks] = order.to(torch.int32)
        case.seq_lens.copy_(torch.tensor(lengths, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        replayed = (static_out.clone(), static_lse.clone())
        eager = case.run()
        torch.testing.assert_close(replayed, eager, rtol=0, atol=0)
        case.check()  # and both agree with the reference for these lengths


@pytest.mark.gpu
def test_cuda_matches_cpu():
    for mla in (False, True):
        if mla:
            case = Case([0, 77, 1000], num_q_heads=128, num_kv_heads=1, head_dim_k=576, head_dim_v=512,
                        block_size=64, mla=True, device="cpu")
        else:
            case = Case([0, 77, 1000], num_q_heads=16, num_kv_heads=2, head_dim_k=128, device="cpu")
        cpu_out, cpu_lse = case.run()
        cuda_args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in case.args()]
        cuda_out, cuda_lse = helix_ext.flash_decode(*cuda_args)
        torch.testing.assert_close(cuda_out.cpu(), cpu_out, rtol=2 ** -6, atol=2 ** -8)
        torch.testing.assert_close(cuda_lse.cpu(), cpu_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.slow
def test_cache_beyond_2_pow_31_elements_and_a_million_token_shard():
    # k_cache and v_cache of 2**31 + elements each (4 GiB of bf16), one sequence of 2**20
    # tokens whose last blocks sit at the far end of the cache: 64-bit offsets throughout.
    block_size, num_kv_heads, head_dim = 256, 8, 128
    num_blocks = (2 ** 31) // (block_size * num_kv_heads * head_dim) + 64
    k_cache = torch.empty(num_blocks, block_size, num_kv_heads, head_dim, dtype=torch.bfloat16, device="cuda").normal_()
    v_cache = torch.empty_like(k_cache).normal_()
    tokens = 2 ** 20
    blocks = tokens // block_size
    table = torch.arange(num_blocks - blocks, num_blocks, dtype=torch.int32, device="cuda").flip(0).unsqueeze(0)
    q = torch.randn(1, 16, head_dim, dtype=torch.bfloat16, device="cuda")
    lens = torch.tensor([tokens], dtype=torch.int32, device="cuda")
    out, lse = helix_ext.flash_decode(q, k_cache, v_cache, table, lens, head_dim ** -0.5)
    # Reference on the GPU in float32 (the float64 one would need 2**20 x 16 x 128 x 8 bytes twice).
    ref_out, ref_lse = flash_decode_reference(q, k_cache, v_cache, table, lens, head_dim ** -0.5,
                                              compute_dtype=torch.float32, out_dtype=torch.float32)
    torch.testing.assert_close(out.float(), ref_out, rtol=2 ** -6, atol=2e-3)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-3)


@pytest.mark.gpu
def test_cuda_rejects_what_its_kernel_cannot_run():
    case = Case([5, 20], num_q_heads=4, num_kv_heads=2, head_dim_k=96, device="cuda")
    with pytest.raises(RuntimeError, match=r"the CUDA kernel supports \(Dk, Dv\)"):
        case.run()
    # Rows that are not 16-byte aligned (a view starting one element in).
    case = Case([5, 20], num_q_heads=4, num_kv_heads=2, head_dim_k=64, device="cuda")
    wide = torch.randn(*case.k_cache.shape[:3], 65, device="cuda").to(case.k_cache.dtype)
    case.k_cache = wide[..., 1:]
    with pytest.raises(RuntimeError, match=r"reads k_cache in 16-byte rows"):
        case.run()


def _masked_dense_attention(case, visible):
    """Several query tokens per sequence written out densely, independently of the reference's
    per-query recursion: every key of the sequence scored, keys at or past visible[b, i] masked
    with -inf, float64 throughout."""
    q = case.q.double()  # [B, Q, Hq, Dk]
    batch, num_queries, num_q_heads, _ = q.shape
    block_size, num_kv_heads = case.k_cache.shape[1], case.k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.zeros(batch, num_queries, num_q_heads, case.v_cache.shape[3], dtype=torch.float64)
    lse = torch.full((batch, num_queries, num_q_heads), NEG_INF, dtype=torch.float64)
    for b in range(batch):
        length = int(case.seq_lens[b])
        if length == 0:
            continue
        blocks = case.block_table[b, :math.ceil(length / block_size)].long()
        keys = case.k_cache[blocks].double().flatten(0, 1)[:length].repeat_interleave(group, dim=1)
        values = case.v_cache[blocks].double().flatten(0, 1)[:length].repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,lhd->qhl", q[b], keys) * case.softmax_scale  # [Q, Hq, L]
        position = torch.arange(length)
        mask = position[None, :] >= visible[b][:, None]  # [Q, L]
        scores = scores.masked_fill(mask[:, None, :], NEG_INF)
        seen = visible[b] > 0
        lse[b, seen] = torch.logsumexp(scores[seen], dim=-1)
        out[b, seen] = torch.einsum("qhl,lhd->qhd", torch.softmax(scores[seen], dim=-1), values)
    return out, lse


@pytest.mark.parametrize("explicit", [False, True], ids=["causal_default", "query_key_lens"])
def test_reference_with_several_query_tokens(explicit):
    # The reference's semantics for Q > 1 (issue 18), checked against a dense masked
    # computation: the default is causal over the shard's last Q keys (clamped at 0), an
    # explicit query_key_lens may give any non-decreasing counts, a query that sees nothing
    # gives 0 and -inf, and Q = 1 is today's 3-D result.
    num_queries = 3
    case = Case([0, 2, 17, 40], num_q_heads=4, num_kv_heads=2, head_dim_k=32, q_dtype=torch.float32)
    case.q = torch.randn(4, num_queries, 4, 32)
    lengths = case.seq_lens.long()
    if explicit:
        visible = torch.tensor([[0, 0, 0], [0, 1, 2], [5, 5, 17], [38, 39, 40]])
        kwargs = {"query_key_lens": visible.to(torch.int32)}
    else:
        visible = (lengths[:, None] + torch.arange(num_queries)[None, :] - num_queries + 1).clamp(min=0)
        kwargs = {}
    out, lse = flash_decode_reference(case.q, case.k_cache, case.v_cache, case.block_table, case.seq_lens,
                                      case.softmax_scale, **kwargs)
    assert out.shape == (4, num_queries, 4, 32) and lse.shape == (4, num_queries, 4)
    expected_out, expected_lse = _masked_dense_attention(case, visible)
    torch.testing.assert_close(out.double(), expected_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-6, atol=1e-6)
    assert torch.all(lse[visible == 0] == NEG_INF) and torch.all(out[visible == 0] == 0)
    single_out, single_lse = flash_decode_reference(case.q[:, -1], case.k_cache, case.v_cache, case.block_table,
                                                    visible[:, -1].to(torch.int32), case.softmax_scale)
    torch.testing.assert_close(out[:, -1], single_out, rtol=0, atol=0)
    torch.testing.assert_close(lse[:, -1], single_lse, rtol=0, atol=0)
