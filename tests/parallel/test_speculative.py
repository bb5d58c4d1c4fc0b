"""Speculative decoding under Helix: prompt-lookup drafts, greedy verification, the KV cache's
multi-token steps and rollback, and the decode end to end on spawned CPU ranks against plain
Helix decoding (token for token, and the caches the rollbacks leave)."""

import pytest
import torch

from helix_ext.parallel.config import HelixConfig
from helix_ext.parallel.demo import DemoSpec
from helix_ext.parallel.kv_cache import HelixKVCache
from helix_ext.parallel.launch import spawn
from helix_ext.parallel.models import tiny_deepseek, tiny_llama
from helix_ext.parallel.speculative import accept_greedy, prompt_lookup_drafts, run_rank_speculative


def test_prompt_lookup_takes_the_longest_latest_ngram():
    history = [5, 6, 7, 8, 1, 2, 9, 6, 7, 3, 4, 6, 7]
    # The 2-gram (6, 7) occurs at 1 and 7: the latest (7) wins, followed by 3, 4.
    assert prompt_lookup_drafts(history, 3) == [3, 4, 6]
    # A 3-gram beats a 2-gram: (9, 6, 7) -> nothing else, (1, 6, 7) absent; (x, 6, 7) at 1 is (5, 6, 7).
    assert prompt_lookup_drafts([5, 6, 7, 0, 2, 6, 7, 1, 5, 6, 7], 2) == [0, 2]
    assert prompt_lookup_drafts([1, 2, 3], 4) == []       # no earlier occurrence
    assert prompt_lookup_drafts([4], 2) == []             # nothing before the last token
    assert prompt_lookup_drafts([4, 4], 3) == [4]         # the follower runs to the end of the history
    assert prompt_lookup_drafts(list(range(10)) + [3], 5, max_ngram=1) == [4, 5, 6, 7, 8]


def test_greedy_acceptance_keeps_the_matching_prefix_and_the_next_token():
    vocab = 10
    tokens = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    predicted = torch.tensor([[2, 3, 4, 7], [2, 9, 4, 7], [0, 3, 4, 7]])  # all, one, none accepted
    logits = torch.nn.functional.one_hot(predicted, vocab).float()
    new_tokens, kept = accept_greedy(tokens, logits)
    assert new_tokens == [[2, 3, 4, 7], [2, 9], [0]]
    assert kept == [4, 2, 1]


def make_cache(kvp, kvp_index, lengths, block=4):
    cache = HelixKVCache(num_layers=1, batch=len(lengths), num_kv_heads=1, head_dim_k=2, head_dim_v=2,
                         block_size=block, kvp=kvp, kvp_index=kvp_index, capacity_tokens=[n + 20 for n in lengths],
                         dtype=torch.float32, device=torch.device("cpu"))
    def make_block(layer, b, index):
        count = min(block, lengths[b] - index * block)
        return torch.ones(count, 1, 2), torch.ones(count, 1, 2)

    cache.load_context(lengths, make_block)
    return cache


@pytest.mark.parametrize("kvp", [1, 2, 3])
def test_cache_steps_of_several_tokens_and_rollback_across_owners(kvp):
    lengths, block, count = [6, 3, 0], 4, 4
    caches = [make_cache(kvp, r, lengths, block) for r in range(kvp)]
    positions = list(lengths)
    for kept in ([2, 4, 1], [1, 3, 4], [4, 1, 2]):
        for rank, cache in enumerate(caches):
            held = cache.tokens_held()
            cache.advance(positions, count)
            slots = cache.step_slots(count)
            # Token i sees the keys held before the step plus this rank's tokens 0..i.
            for b, start in enumerate(positions):
                owned = [cache.owns(p) for p in range(start, start + count)]
                expected = [held[b] + sum(owned[:i + 1]) for i in range(count)]
                assert slots.query_key_lens[b].tolist() == expected
                for i, mine in enumerate(owned):
                    physical = int(slots.physical[b * count + i])
                    assert (physical != cache.trash_block) == mine
            cache.rollback(kept)
        positions = [p + k for p, k in zip(positions, kept)]
        for rank, cache in enumerate(caches):  # what plain decoding of the kept tokens holds
            expected = [sum(1 for p in range(end) if cache.owns(p)) for end in positions]
            assert cache.tokens_held() == expected
            assert cache.seq_lens.tolist() == expected
            assert cache.positions.tolist() == positions
    with pytest.raises(ValueError, match="must decode the positions after the previous ones"):
        caches[0].advance([p + 1 for p in positions], count)
    caches[0].advance(positions, count)
    with pytest.raises(ValueError, match=r"kept must hold one count in \[1, 4\]"):
        caches[0].rollback([0, 1, 1])


# Lengths around block edges (tokens_per_block 4): with 3 drafts a step crosses a block, so its
# tokens have two owners, and rollbacks drop tokens on either.
LENGTHS = [37, 20, 5, 0]


def _run(model, helix, num_drafts, oracle=None, steps=12):
    spec = DemoSpec(model=model, helix=helix, context_lengths=LENGTHS, steps=steps)
    return spawn(run_rank_speculative, helix.world_size, (spec, num_drafts, oracle), timeout_s=180)


@pytest.mark.parametrize("model, helix", [
    (tiny_llama(), HelixConfig(kvp=2, tpa=1, tokens_per_block=4)),
    (tiny_llama(), HelixConfig(kvp=2, tpa=2, tokens_per_block=4, hopb_chunks=2)),
    (tiny_llama(), HelixConfig(kvp=4, tpa=1, tokens_per_block=4, exchange="fused")),
    (tiny_deepseek(), HelixConfig(kvp=2, tpa=1, tpf=1, ep=2, tokens_per_block=4)),
], ids=["llama-kvp2", "llama-kvp2-tpa2-hopb", "llama-kvp4-fused", "deepseek-mla-moe"])
def test_speculative_decode_equals_plain_decode(model, helix):
    plain = _run(model, helix, 0)
    oracle = plain[0]["tokens"]
    speculative = _run(model, helix, 3, oracle)
    for rank, (p, s) in enumerate(zip(plain, speculative)):
        assert s["tokens"] == p["tokens"], rank  # every rank decides the same
    steps, accepted = speculative[0]["steps"], speculative[0]["accepted_per_step"]
    assert steps < 12  # drafts were accepted...
    assert any(0 < a < 3 for row in accepted for a in row)  # ...and some rejected after a match
    compared = 0
    for p, s in zip(plain, speculative):
        # The cache the rollbacks leave: each rank holds exactly its owned positions before
        # the next one, and the entries it shares with plain decoding's cache agree.
        held = s["tokens_held"]
        assert s["seq_lens"] == held
        block, kvp, index = helix.tokens_per_block, helix.kvp, s["rank"] % helix.kvp
        assert held == [sum(1 for q in range(end) if (q // block) % kvp == index) for end in s["next_positions"]]
        for b in range(len(LENGTHS)):
            ours, theirs = s["keys"][0][b], p["keys"][0][b]
            common = min(len(ours), len(theirs))
            torch.testing.assert_close(ours[:common], theirs[:common], rtol=1e-5, atol=1e-5)
            compared += common
    assert compared > 0


def test_prompt_lookup_drafts_decode_equals_plain_decode():
    helix = HelixConfig(kvp=2, tpa=1, tokens_per_block=4)
    plain = _run(tiny_llama(), helix, 0, steps=10)
    lookup = _run(tiny_llama(), helix, 4, steps=10)
    assert lookup[0]["tokens"] == plain[0]["tokens"]
