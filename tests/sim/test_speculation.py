"""The simulator's speculative-decoding option: K drafts per step, A tokens accepted per step."""

import numpy as np
import pytest

from helix_ext.sim import DEEPSEEK_R1, GB200_NVL72, LLAMA_405B, ModelingOptions, evaluate, make_configs
from helix_ext.sim.__main__ import main
from helix_ext.sim.strategies import STRATEGIES

BATCHES = [1, 4, 32]


@pytest.mark.parametrize("model", [LLAMA_405B, DEEPSEEK_R1], ids=["llama", "deepseek"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_speculation_costs_more_per_step_and_divides_by_the_accepted_tokens(model, strategy):
    configs = make_configs(strategy, model, 64)
    plain = evaluate(model, GB200_NVL72, configs, BATCHES, 1e6)
    none_accepted = evaluate(model, GB200_NVL72, configs, BATCHES, 1e6, ModelingOptions(draft_tokens=3))
    accepted = evaluate(model, GB200_NVL72, configs, BATCHES, 1e6,
                        ModelingOptions(draft_tokens=3, accepted_per_step=2.5))
    # 4 tokens a step through every layer: never cheaper than one; at a 1M context the KV read
    # (once for all 4) dominates attention, so a step costs well under 4 plain ones.
    assert np.all(none_accepted.ttl_s >= plain.ttl_s)
    assert np.all(none_accepted.ttl_s < 4 * plain.ttl_s)
    np.testing.assert_allclose(accepted.ttl_s, none_accepted.ttl_s / 2.5, rtol=1e-12)
    np.testing.assert_array_equal(accepted.memory_bytes, plain.memory_bytes)


def test_no_drafts_is_plain_decoding_exactly():
    configs = make_configs("Helix", DEEPSEEK_R1, 64)
    plain = evaluate(DEEPSEEK_R1, GB200_NVL72, configs, BATCHES, 1e6)
    same = evaluate(DEEPSEEK_R1, GB200_NVL72, configs, BATCHES, 1e6, ModelingOptions(draft_tokens=0,
                                                                                    accepted_per_step=1.0))
    np.testing.assert_array_equal(plain.ttl_s, same.ttl_s)


@pytest.mark.parametrize("drafts, accepted, message", [
    (-1, 1.0, "draft_tokens: expected >= 0"),
    (3, 4.5, r"accepted_per_step: expected in \[1, 1 \+ draft_tokens = 4\]"),
    (0, 0.5, r"accepted_per_step: expected in \[1, 1 \+ draft_tokens = 1\]"),
])
def test_bad_speculation_options(drafts, accepted, message):
    with pytest.raises(ValueError, match=message):
        ModelingOptions(draft_tokens=drafts, accepted_per_step=accepted)


def test_cli_speculation(capsys):
    assert main(["plan", "--model", "deepseek-r1", "--context", "1M", "--gpus", "64", "--ttl-ms", "5",
                 "--speculate", "3", "--accepted", "2.5"]) == 0
    assert main(["reproduce", "--json", "--speculate", "3", "--accepted", "2.5"]) == 0
    capsys.readouterr()
    assert main(["plan", "--model", "deepseek-r1", "--context", "1M", "--gpus", "64", "--ttl-ms", "5",
                 "--speculate", "3"]) == 2
    assert "--speculate K needs --accepted A" in capsys.readouterr().err
