"""Prefill of newcomers: grouped by length rather than padded to the longest, and chunked between decoding
steps (Sarathi-Serve) so that the rows in flight keep decoding while a long prompt joins."""

from __future__ import annotations

import pytest
import torch

from backbone import Backbone, PrefixCache, Prompt
from backbone.decoding import Decoding
from tests.backbone.test_lora import PASSAGES, ends_at_budget, with_adapters

QUESTIONS = ["what is the capital", "how does covid spread through droplets", "revenue", "who said it"]
# A prompt several times longer than the others: what a chunk budget has to split.
LONG = Prompt(
    "Passage (Long): " + " ".join(["the company revenue was 42 million dollars"] * 40), "\nQ: why?\nA:"
)


@pytest.fixture(scope="module")
def llama(tiny_root) -> Backbone:
    bb = with_adapters(tiny_root, seed=70)
    with ends_at_budget(bb.generator):  # rows end at their budgets: long enough to overlap
        yield bb


def _prompts(bb: Backbone) -> tuple[list[Prompt], list[str]]:
    prompts = [bb.generator.source(q, p) for q, p in zip(QUESTIONS, PASSAGES + PASSAGES[:1])]
    return prompts, bb._names("generator", ["news", "covid", None, "news"])


def _run(decoding, first, later, budget: int = 8) -> tuple[list, list[int]]:
    """`first` rows start; `later` rows join after one step. Returns the generations in order of the rows,
    and how many rows were still prefilling after each step."""
    done, prefilling = {}, []
    with torch.inference_mode():
        tickets = decoding.add(*first, [budget] * len(first[0]))
        done.update(decoding.step())
        tickets += decoding.add(*later, [budget] * len(later[0]))
        while len(decoding):
            done.update(decoding.step())
            prefilling.append(decoding.prefilling)
    return [done[t] for t in tickets], prefilling


def _same(got: list, expected: list) -> None:
    for a, b in zip(got, expected, strict=True):
        assert a.text == b.text
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)


@pytest.mark.parametrize("cached", [False, True])
def test_a_long_prompt_joins_in_chunks_while_the_rows_in_flight_keep_decoding(llama, cached):
    prompts, names = _prompts(llama)
    first = (prompts[:2], names[:2])
    later = ([LONG, *prompts[2:]], [names[0], *names[2:]])
    expected, _ = _run(llama.generator.decoding(), first, later)

    cache = PrefixCache(1 << 30) if cached else None
    decoding = llama.generator.decoding(cache, chunk_tokens=16)
    got, prefilling = _run(decoding, first, later)
    _same(got, expected)
    # The newcomers took several steps to prefill, and the first rows decoded a token in each of them.
    steps = prefilling.index(0) + 1
    assert steps >= 4
    assert decoding.padding[1] >= 16 * (steps - 1)
    assert len({g.text for g in expected}) > 1


def test_without_rows_in_flight_or_a_chunk_budget_newcomers_prefill_at_once(llama):
    prompts, names = _prompts(llama)
    decoding = llama.generator.decoding(chunk_tokens=16)
    with torch.inference_mode():
        decoding.add([LONG, *prompts], [names[0], *names], [4] * 5)
    assert (decoding.prefilling, decoding.rows) == (0, 5)  # nothing decoding yet: no one to keep waiting
    unchunked = llama.generator.decoding()
    with torch.inference_mode():
        unchunked.add(prompts[:1], names[:1], [4])
        unchunked.add([LONG], names[:1], [4])
    assert (unchunked.prefilling, unchunked.rows) == (0, 2)


def test_newcomers_of_different_lengths_are_prefilled_in_groups_with_little_padding(llama):
    prompts, names = _prompts(llama)
    mixed = [LONG, prompts[0], LONG, prompts[1], prompts[2]]
    adapters = [names[0], names[0], names[1], names[1], names[2]]
    decoding = llama.generator.decoding()
    assert isinstance(decoding, Decoding)
    with torch.inference_mode():
        tickets = decoding.add(mixed, adapters, [5] * 5)
        done = {}
        while len(decoding):
            done.update(decoding.step())
    padding, real = decoding.padding
    assert padding <= Decoding.PADDING * real
    # One forward of all five would pad the short prompts to the long one's length.
    lengths = [sum(map(len, ids)) for ids in zip(*llama.generator.prompt_ids(mixed))]
    assert max(lengths) * len(lengths) - sum(lengths) > 2 * real / 3
    for ticket, prompt, adapter in zip(tickets, mixed, adapters):
        with torch.inference_mode():
            alone = llama.generator.generate_whole([prompt], [adapter], 5)[0]
        assert done[ticket].text == alone.text


def test_a_row_dropped_while_its_prompt_prefills_is_never_returned(llama):
    prompts, names = _prompts(llama)
    decoding = llama.generator.decoding(chunk_tokens=8)
    with torch.inference_mode():
        first = decoding.add(prompts[:1], names[:1], [12])
        decoding.step()
        long_ticket, short_ticket = decoding.add([LONG, prompts[1]], [names[0], names[1]], [12, 12])
        decoding.step()
        assert decoding.prefilling == 2
        decoding.drop({long_ticket})
        done = {}
        while len(decoding):
            done.update(decoding.step())
    assert set(done) == {*first, short_ticket}
    with torch.inference_mode():
        alone = llama.generator.generate_whole([prompts[1]], names[1:2], 12)[0]
    assert done[short_ticket].text == alone.text


@pytest.mark.parametrize("chunk", [0, 16])
def test_a_prefill_that_fails_part_way_leaves_none_of_its_rows_behind(llama, monkeypatch, chunk):
    """Newcomers of two lengths are two groups; the second group's first forward fails after the first group
    joined the batch. None of the newcomers decode on; the row in flight does. `add` raises where it
    prefills at once, `step` where it prefills in chunks."""
    prompts, names = _prompts(llama)
    decoding = llama.generator.decoding(chunk_tokens=chunk)
    host = llama.generator.host
    forward, starts = host.forward, []

    def fail_second_group(adapters, **inputs):
        if inputs["input_ids"].shape[1] > 1 and int(inputs["position_ids"].min()) == 0:
            starts.append(inputs["input_ids"].shape)  # a group's first forward
            if len(starts) == 3:  # the in-flight row's, then the long group's, then the short one's
                raise RuntimeError("the forward failed")
        return forward(adapters, **inputs)

    monkeypatch.setattr(host, "forward", fail_second_group)
    done = {}
    with torch.inference_mode():
        (first,) = decoding.add(prompts[:1], names[:1], [120])  # long enough to outlast the chunks
        done.update(decoding.step())
        with pytest.raises(RuntimeError, match="the forward failed"):
            decoding.add([LONG, prompts[1]], names[:2], [12, 12])
            while decoding.prefilling:
                done.update(decoding.step())
        assert (decoding.rows, decoding.prefilling) == (1, 0)
        while len(decoding):
            done.update(decoding.step())
    assert set(done) == {first}
    with torch.inference_mode():
        alone = llama.generator.generate_whole(prompts[:1], names[:1], 120)[0]
    assert done[first].text == alone.text
