"""Continuous batching: rows join and leave a decoding between steps and decode as they would alone."""

from __future__ import annotations

import pytest
import torch

from backbone import Backbone, Prompt
from backbone.decoding import Decoding, WholeBatchDecoding
from tests.backbone.test_lora import PASSAGES, ends_at_budget, load, with_adapters

QUESTIONS = [
    "what is the capital",
    "how does covid spread through droplets",
    "revenue",
    "who said we were on a break",
]


@pytest.fixture(scope="module")
def llama(tiny_root) -> Backbone:
    return with_adapters(tiny_root, seed=40)


def _rows(bb: Backbone) -> tuple[list[Prompt], list[str]]:
    """Sources of different lengths (so joining pads), each under its own adapter or the base."""
    generator = bb.generator
    sources = [generator.source(q, p) for q, p in zip(QUESTIONS, PASSAGES + PASSAGES[:1])]
    names = bb._names("generator", ["news", "covid", None, "news"])
    return sources, names


def _alone(bb: Backbone, source: Prompt, name: str, budget: int):
    with torch.inference_mode():
        return bb.generator.generate_whole([source], [name], budget)[0]


def _decode(bb: Backbone, sources: list[Prompt], names: list[str], budget: int) -> list:
    decoding = bb.generator.decoding()
    done = {}
    with torch.inference_mode():
        tickets = decoding.add(sources, names, [budget] * len(sources))
        while len(decoding):
            done.update(decoding.step())
    return [done[t] for t in tickets]


def test_rows_that_join_late_decode_as_if_alone_and_short_rows_leave_first(llama):
    sources, names = _rows(llama)
    budgets = [3, 9, 6, 5]
    generator = llama.generator
    decoding = generator.decoding()
    assert isinstance(decoding, Decoding)
    finished_at: dict[int, int] = {}
    results = {}
    with ends_at_budget(generator):
        with torch.inference_mode():
            first = decoding.add(sources[:2], names[:2], budgets[:2])
            for step in range(1, 20):
                if step == 2:  # two rows join a batch two tokens in, with prompts of other lengths
                    later = decoding.add(sources[2:], names[2:], budgets[2:])
                    assert decoding.rows == 4
                for ticket, generation in decoding.step():
                    finished_at[ticket] = step
                    results[ticket] = generation
                if not len(decoding):
                    break
        tickets = first + later
        expected = [_alone(llama, s, n, b) for s, n, b in zip(sources, names, budgets)]
    for ticket, alone in zip(tickets, expected):
        assert results[ticket].text == alone.text
        assert results[ticket].logprob == pytest.approx(alone.logprob, abs=1e-3)
    # The 3-token row was handed back after its own steps, not after the 9-token row's.
    assert finished_at[tickets[0]] < finished_at[tickets[1]]
    assert len({results[t].text for t in tickets}) > 1


def _greedy(bb: Backbone, source: Prompt, name: str, steps: int) -> tuple[list[int], list[float]]:
    """A plain greedy loop without a cache: the row's tokens and their log-probabilities."""
    generator = bb.generator
    (prefix,), (suffix,) = generator.prompt_ids([source])
    ids = torch.tensor([prefix + suffix])  # [1, length]
    tokens, logprobs = [], []
    with torch.inference_mode():
        for _ in range(steps):
            scores = torch.log_softmax(generator.host.forward([name], input_ids=ids).logits[0, -1], dim=-1)
            tokens.append(int(scores.argmax()))
            logprobs.append(float(scores.max()))
            ids = torch.cat([ids, scores.argmax().view(1, 1)], dim=1)
    return tokens, logprobs


def test_a_row_stops_at_its_end_token_and_scores_it(llama):
    sources, names = _rows(llama)
    # The end token: one the row first produces at some step after the first, so it stops right there.
    for source, name in zip(sources, names):
        tokens, logprobs = _greedy(llama, source, name, 8)
        stop_at = next((i for i in range(1, 8) if tokens[i] not in tokens[:i]), None)
        if stop_at is not None:
            break
    assert stop_at is not None
    generator = llama.generator
    saved, generator.eos_ids = generator.eos_ids, [tokens[stop_at]]
    try:
        expected = _alone(llama, source, name, 8)
        got = _decode(llama, [source], [name], 8)[0]
    finally:
        generator.eos_ids = saved
    assert got.text == generator.tokenizer.decode(tokens[:stop_at], skip_special_tokens=True).strip()
    assert got.text == expected.text
    assert got.logprob == pytest.approx(expected.logprob, abs=1e-3)
    assert got.logprob == pytest.approx(sum(logprobs[: stop_at + 1]), abs=1e-3)  # the end token counts


def test_dropped_rows_are_never_returned_and_the_rest_decode_unchanged(llama):
    sources, names = _rows(llama)
    decoding = llama.generator.decoding()
    results = {}
    with torch.inference_mode():
        tickets = decoding.add(sources, names, [6] * 4)
        decoding.step()
        decoding.drop({tickets[1], tickets[2]})
        assert decoding.rows == 2
        while len(decoding):
            results.update(decoding.step())
    assert set(results) == {tickets[0], tickets[3]}
    for i in (0, 3):
        assert results[tickets[i]].text == _alone(llama, sources[i], names[i], 6).text


def test_seq2seq_generators_decode_each_group_whole(tiny_root):
    bb = load(tiny_root, "bart", "dpr")
    decoding = bb.generator.decoding()
    assert isinstance(decoding, WholeBatchDecoding)
    sources = [bb.generator.source(q, p) for q, p in zip(QUESTIONS[:2], PASSAGES[:2])]
    names = bb._names("generator", [None, None])
    with torch.inference_mode():
        tickets = decoding.add(sources, names, [4, 2])
        done = dict(decoding.step())
        assert set(done) == set(tickets) and not len(decoding)
        assert done[tickets[1]].text == bb.generator.generate_whole(sources[1:], names[1:], 2)[0].text
