"""Helix configs, the rank layout and the round-robin KV cache (no processes needed)."""

import pytest
import torch

from helix_ext.ops import CUDA_FLASH_DECODE_HEAD_DIMS
from helix_ext.parallel.config import HelixConfig, HelixConfigError, RankLayout, default_layout
from helix_ext.parallel.kv_cache import HelixKVCache
from helix_ext.parallel.models import tiny_deepseek, tiny_llama


@pytest.mark.parametrize("config, model, message", [
    (HelixConfig(kvp=2, tpa=4), (8, 2, False, 0), r"tpa \(4\) must be <= the number of KV heads \(2\)"),
    (HelixConfig(kvp=1, tpa=3), (8, 4, False, 0), r"tpa \(3\) must divide the number of KV heads \(4\)"),
    (HelixConfig(kvp=4, tpa=1, ep=3), (8, 1, True, 6), r"tpf x ep \(1 x 3\) must equal kvp x tpa = 4"),
    (HelixConfig(kvp=4, tpa=1, ep=2, tpf=2), (8, 1, True, 5), r"ep \(2\) must divide the number of experts \(5\)"),
    (HelixConfig(kvp=2, tpa=1, ep=2), (8, 2, False, 0), r"a dense FFN runs TP = N = 2: ep must be 1"),
    (HelixConfig(kvp=0, tpa=1), (8, 2, False, 0), r"kvp must be >= 1"),
    (HelixConfig(kvp=2, exchange="shmem"), (8, 2, False, 0), r"exchange must be 'nccl' or 'fused'"),
])
def test_invalid_configs_name_the_constraint(config, model, message):
    with pytest.raises(HelixConfigError, match=message):
        config.validate(*model)


@pytest.mark.parametrize("model", [tiny_llama(), tiny_deepseek()], ids=["llama", "deepseek"])
def test_tiny_models_have_head_dims_the_cuda_kernel_takes(model):
    # The tiny models keep their point (GQA with a group > 1; MLA's 576/512 latent cache with few
    # heads and a small hidden size) in shapes the CUDA flash_decode is compiled for.
    assert model.cache_head_dims in CUDA_FLASH_DECODE_HEAD_DIMS
    if model.mla:
        assert model.cache_head_dims == (576, 512) and model.hidden_size <= 256
    else:
        assert model.num_q_heads // model.num_kv_heads > 1


@pytest.mark.parametrize("config, model, message", [
    # --experts nvfp4 on 8 ranks: 8 TPF slices of a 64-wide expert FFN are 8 columns, half a block.
    (HelixConfig(kvp=8), tiny_deepseek(expert_format="nvfp4"), r"nvfp4 experts: the FFN dim \(64\) is 4 blocks"),
    (HelixConfig(kvp=4, ep=2, tpf=2), tiny_deepseek(expert_format="mxfp4", moe_ffn_dim=48),
     r"mxfp4 experts: the hidden size \(128\) and the FFN dim \(48\) must be multiples of the mxfp4 block"),
    (HelixConfig(kvp=2, tpa=2), tiny_llama(ffn_format="nvfp4", ffn_dim=200),
     r"nvfp4 dense FFN: the hidden size \(128\) and the FFN dim \(200\) must be multiples"),
])
def test_validate_model_refuses_what_the_decoder_would(config, model, message):
    # Refused up front, before any rank starts (the decoder's constructor used to be the first to fail).
    with pytest.raises(HelixConfigError, match=message):
        config.validate_model(model)


def test_validate_model_accepts_fp4_experts_in_whole_blocks():
    HelixConfig(kvp=4).validate_model(tiny_deepseek(expert_format="nvfp4"))  # 4 blocks over tpf = 4
    HelixConfig(kvp=8, ep=2).validate_model(tiny_deepseek(expert_format="nvfp4"))  # tpf = 4


@pytest.mark.parametrize("world, kv_heads, kvp, tpa, expected", [
    (8, 4, None, None, (2, 4)), (8, 1, None, None, (8, 1)), (6, 3, None, None, (2, 3)), (8, 3, None, None, (8, 1)),
    (1, 4, None, None, (1, 1)), (8, 4, 8, None, (8, 1)), (8, 4, None, 2, (4, 2)), (12, 4, 3, 4, (3, 4)),
])
def test_default_layout_follows_the_world_size(world, kv_heads, kvp, tpa, expected):
    # Under torchrun the demo derives a valid layout from the world size (kvp x tpa = world).
    assert default_layout(world, kv_heads, kvp, tpa) == expected
    got_kvp, got_tpa = default_layout(world, kv_heads, kvp, tpa)
    assert got_kvp * got_tpa == world or (kvp is not None and tpa is not None)
    HelixConfig(kvp=got_kvp, tpa=got_tpa).validate(8 * kv_heads, kv_heads, False)


def test_default_layout_rejects_a_split_that_does_not_divide_the_world():
    with pytest.raises(HelixConfigError, match=r"kvp \(3\) must divide the world size \(8\)"):
        default_layout(8, 4, kvp=3)


@pytest.mark.parametrize("num_q_heads, num_kv_heads, kvp, tpa", [
    (8, 4, 2, 2), (8, 2, 4, 1), (9, 3, 1, 3), (9, 3, 2, 3), (9, 3, 8, 1), (9, 3, 5, 3), (128, 1, 8, 1)])
def test_every_query_head_is_merged_by_exactly_one_rank(num_q_heads, num_kv_heads, kvp, tpa):
    config = HelixConfig(kvp=kvp, tpa=tpa)
    config.validate(num_q_heads, num_kv_heads, False)
    merged, tpa_heads = [], set()
    for rank in range(config.world_size):
        layout = RankLayout(rank, config, num_q_heads, num_kv_heads)
        assert layout.tpa_index == rank // kvp and layout.kvp_index == rank % kvp
        assert set(layout.merged_heads) <= set(layout.q_heads)
        counts = layout.exchange_head_counts()
        assert max(counts) - min(counts) <= 1 and sum(counts) == len(layout.q_heads)  # as even as possible
        merged += list(layout.merged_heads)
        tpa_heads |= set(layout.kv_heads)
    assert sorted(merged) == list(range(num_q_heads))
    assert tpa_heads == set(range(num_kv_heads))


def make_cache(kvp, kvp_index, lengths, new_tokens, block=4, layers=2):
    return HelixKVCache(num_layers=layers, batch=len(lengths), num_kv_heads=2, head_dim_k=8, head_dim_v=8,
                        block_size=block, kvp=kvp, kvp_index=kvp_index,
                        capacity_tokens=[n + new_tokens for n in lengths], dtype=torch.float32, device=torch.device("cpu"))


@pytest.mark.parametrize("kvp", [1, 2, 3, 5])
def test_round_robin_deal_and_appends_stay_balanced(kvp):
    block, lengths, steps = 4, [0, 3, 4, 17, 40], 23
    caches = [make_cache(kvp, i, lengths, steps, block) for i in range(kvp)]
    stored = {}  # (rank, layer, sequence, position) -> value written

    def make_block(rank):
        def fill(layer, sequence, index):
            count = min(block, lengths[sequence] - index * block)
            keys = torch.arange(count, dtype=torch.float32).add(index * block).view(count, 1, 1).expand(count, 2, 8)
            return keys + 1000 * sequence + 100000 * layer, keys
        return fill

    for rank, cache in enumerate(caches):
        cache.load_context(lengths, make_block(rank))
    positions = list(lengths)
    for step in range(steps):
        owners = [caches[0].owner(p) for p in positions]
        for rank, cache in enumerate(caches):
            slots = cache.begin_step(positions)
            assert slots.sequences == [b for b, o in enumerate(owners) if o == rank]
            # The device slots: owned tokens at their (block, offset), the rest in the trash block.
            for b, position in enumerate(positions):
                expected = cache._slot(b, position) if b in slots.sequences else (cache.trash_block,
                                                                                   position % block)
                assert (slots.physical[b].item(), slots.offset[b].item()) == expected
        positions = [p + 1 for p in positions]
        held = torch.tensor([c.tokens_held() for c in caches])  # [rank, sequence]
        assert torch.all(held.sum(0) == torch.tensor(positions))  # every token held exactly once
        assert torch.all(held.max(0).values - held.min(0).values <= block)  # at most one block apart
        for cache in caches:  # the device copies follow the host bookkeeping
            assert cache.seq_lens.tolist() == cache.tokens_held()
            assert cache.positions.tolist() == positions
    # The context entries went to the owners of their blocks, at the right offsets.
    for rank, cache in enumerate(caches):
        for sequence, length in enumerate(lengths):
            for position in range(length):
                if cache.owns(position):
                    physical, offset = cache._slot(sequence, position)
                    value = cache.keys[1][physical, offset, 0, 0].item()
                    assert value == position + 1000 * sequence + 100000


def test_owner_follows_blocks_of_tokens_per_block():
    cache = make_cache(3, 0, [0], 100, block=16)
    assert [cache.owner(p) for p in (0, 15, 16, 31, 32, 47, 48)] == [0, 0, 1, 1, 2, 2, 0]


def test_capacity_is_enforced():
    cache = make_cache(2, 0, [4], 0, block=4)
    cache.load_context([4], lambda layer, s, b: (torch.zeros(4, 2, 8), torch.zeros(4, 2, 8)))
    for position in range(4, 8):  # block 1 is rank 1's
        cache.begin_step([position])
    with pytest.raises(RuntimeError, match="outgrew its capacity"):
        cache.begin_step([8])  # block 2 belongs to rank 0 but was never provisioned
    # The refused step changed nothing, on the host or on the device.
    assert cache.tokens_held() == [4] and cache.seq_lens.tolist() == [4] and cache.positions.tolist() == [8]


def test_a_step_must_follow_the_previous_one():
    # Positions live on the device and advance there; the host's list must agree with them.
    lengths = [4, 9]
    cache = make_cache(2, 0, lengths, 4, block=4)

    def make_block(layer, sequence, block):
        count = min(4, lengths[sequence] - 4 * block)
        return torch.zeros(count, 2, 8), torch.zeros(count, 2, 8)

    cache.load_context(lengths, make_block)
    cache.begin_step([4, 9])
    with pytest.raises(ValueError, match=r"must decode the positions after the previous ones \(\[5, 10\]\)"):
        cache.begin_step([4, 9])
