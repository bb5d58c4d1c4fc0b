"""Speculative decoding under Helix: a step verifies K drafted tokens per sequence at once.

Each step feeds every sequence its last accepted token and K drafts (T = K + 1 tokens at
consecutive positions); their KV is appended on the owner ranks (round-robin by block, so a
step may touch two owners) and every token attends causally to the ones before it, so one read
of the KV cache serves all of them. Greedy verification keeps the longest drafted prefix that
matches the model's argmax, plus the model's next token; the rejected drafts' KV is rolled back
on their owners. The tokens are those of plain greedy decoding.

Drafts come from prompt lookup (no second model): the longest recent n-gram of the sequence
(n = 4 down to 1) found earlier in its prompt + generated text proposes the tokens that
followed it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def prompt_lookup_drafts(history: list[int], count: int, max_ngram: int = 4) -> list[int]:
    """Up to `count` drafts for the token after `history`: for n = max_ngram down to 1, the
    latest earlier occurrence of history's last n tokens, and the tokens that followed it (the
    first n-gram with any follower wins). [] when nothing matches."""
    length = len(history)
    for n in range(min(max_ngram, length - 1), 0, -1):
        tail = history[length - n:]
        for start in range(length - n - 1, -1, -1):  # latest first; the tail itself excluded
            if history[start:start + n] == tail:
                return history[start + n:start + n + count]
    return []


def accept_greedy(tokens: torch.Tensor, logits: torch.Tensor) -> tuple[list[list[int]], list[int]]:
    """Greedy verification of one step. tokens [B, T] (the last accepted token, then T - 1
    drafts), logits [B, T, vocab]. For each sequence: the new tokens (the accepted drafts,
    then the model's token after them) and kept, the step's tokens whose KV stays (1 + the
    accepted drafts)."""
    new_tokens, kept = [], []
    for row, choices in zip(tokens.tolist(), logits.argmax(dim=-1).tolist()):
        accepted = 0
        while accepted + 1 < len(row) and row[accepted + 1] == choices[accepted]:
            accepted += 1
        new_tokens.append(row[1:accepted + 1] + [choices[accepted]])
        kept.append(accepted + 1)
    return new_tokens, kept


@dataclass
class SpeculativeResult:
    tokens: list[list[int]]                       # per sequence: the generated tokens
    accepted_per_step: list[list[int]] = field(default_factory=list)  # per step, per sequence: drafts accepted
    steps: int = 0
    logits: list[list[torch.Tensor]] | None = None  # keep_logits: per sequence, [kept, vocab] per step


def speculative_generate(decoder, first_tokens: list[int], positions: list[int], max_new_tokens: int,
                         num_drafts: int, histories: list[list[int]] | None = None,
                         draft_fn=None, keep_logits: bool = False) -> SpeculativeResult:
    """Greedy generation of max_new_tokens per sequence with num_drafts drafts a step.

    decoder: a HelixDecoder with max_step_tokens >= num_drafts + 1 whose cache holds each
    sequence's context; first_tokens[b], at positions[b], is the token to decode first (not
    in the cache yet). histories[b]: the sequence's tokens so far, first_tokens[b] last (the
    drafts' source; default: only the generated ones). draft_fn(sequence, history, count) ->
    drafts (default: prompt_lookup_drafts on the history); missing drafts are padded (verified like any other, and
    rejected unless the model agrees). Every rank runs this with the same inputs and gets the
    same logits, so every rank makes the same decisions. keep_logits: the logits that chose
    each generated token (on the device)."""
    draft_fn = draft_fn or (lambda sequence, history, count: prompt_lookup_drafts(history, count))
    batch = len(first_tokens)
    histories = [list(h) for h in histories] if histories is not None else [[t] for t in first_tokens]
    positions, last = list(positions), list(first_tokens)
    result = SpeculativeResult(tokens=[[] for _ in range(batch)],
                               logits=[[] for _ in range(batch)] if keep_logits else None)
    while min(len(t) for t in result.tokens) < max_new_tokens:
        rows = []
        for b in range(batch):
            drafts = list(draft_fn(b, histories[b], num_drafts))[:num_drafts]
            drafts += [last[b]] * (num_drafts - len(drafts))  # padding: any token is a valid draft
            rows.append([last[b]] + drafts)
        step_tokens = torch.tensor(rows, dtype=torch.int64).to(decoder.device)
        logits = decoder.step(step_tokens, positions)
        new_tokens, kept = accept_greedy(step_tokens, logits)
        decoder.rollback(kept)
        result.steps += 1
        result.accepted_per_step.append([k - 1 for k in kept])
        for b in range(batch):
            histories[b].extend(new_tokens[b])
            result.tokens[b].extend(new_tokens[b])
            positions[b] += kept[b]
            last[b] = new_tokens[b][-1]
            if keep_logits:
                result.logits[b].append(logits[b, :kept[b]])
    result.tokens = [t[:max_new_tokens] for t in result.tokens]
    return result


def _oracle_drafts(oracle: list[list[int]], vocab_size: int):
    """Tests: drafts from the tokens plain decoding produced, every third one from the fourth on
    made wrong (so steps accept 0 to K drafts and roll back the rest)."""
    def drafts(sequence: int, history: list[int], count: int) -> list[int]:
        generated = len(history) - 1  # history: the first token, then the generated ones
        out = []
        for index in range(generated, generated + count):
            if index >= len(oracle[sequence]):
                break
            token = oracle[sequence][index]
            out.append((token + 1) % vocab_size if index % 3 == 2 and index > 2 else token)
        return out
    return drafts


def run_rank_speculative(rank: int, backend: str, spec, num_drafts: int, oracle: list[list[int]] | None = None,
                         layers: tuple[int, ...] = (0,)) -> dict:
    """A DemoSpec's decode with num_drafts drafts a step (0: plain decoding, one token a step),
    drafted by prompt lookup over the generated tokens or, given `oracle` (plain decoding's
    tokens), from it with some made wrong. Returns the tokens, the steps and drafts accepted,
    and the rank's cache: tokens held, seq_lens, the next positions and the held K entries of
    `layers` per sequence (in the shard's order)."""
    from helix_ext.parallel.decoder import HelixDecoder, HelixGroups
    from helix_ext.parallel.launch import rank_device

    device = rank_device(backend, rank)
    groups = HelixGroups(spec.helix, rank)
    decoder = HelixDecoder(spec.model, spec.helix, rank, groups, spec.context_lengths, spec.steps, device,
                           max_step_tokens=num_drafts + 1)
    first = [int(t) for t in spec.first_tokens()]
    positions = list(spec.context_lengths)
    if num_drafts == 0:
        tokens, current = [[] for _ in first], torch.tensor(first).to(device)
        for _ in range(spec.steps):
            current = decoder.step(current, positions).argmax(dim=-1)
            for b, token in enumerate(current.cpu().tolist()):
                tokens[b].append(token)
            positions = [p + 1 for p in positions]
        steps, accepted = spec.steps, []
    else:
        draft_fn = None if oracle is None else _oracle_drafts(oracle, spec.model.vocab_size)
        result = speculative_generate(decoder, first, positions, spec.steps, num_drafts, draft_fn=draft_fn)
        tokens, steps, accepted = result.tokens, result.steps, result.accepted_per_step
    cache = decoder.cache
    entries = {layer: [cache.held_keys(layer, b).cpu() for b in range(len(first))] for layer in layers}
    return {"rank": rank, "tokens": tokens, "steps": steps, "accepted_per_step": accepted,
            "tokens_held": cache.tokens_held(), "seq_lens": cache.seq_lens.cpu().tolist(),
            "next_positions": list(cache._next_positions), "keys": entries}
