"""The passage prefix KV cache: prompts cut after the passage, exact reuse of a prefix's KV states under the
adapter weights it was computed with, and the byte budget's LRU eviction."""

from __future__ import annotations

import pytest
import torch

from backbone import Backbone, Passage, PrefixCache, PrefixKey
from backbone.decoding import _Prefix
from tests.backbone.test_lora import PASSAGES, ends_at_budget, load, randomize, with_adapters

QUESTIONS = [
    "what is the capital",
    "how does covid spread through droplets",
    "revenue",
    "who said we were on a break",
    "when was it",
]
# A chat template of the ChatML kind the embedded default's generator uses (the tiny tokenizer has none).
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def llama(tiny_root) -> Backbone:
    return with_adapters(tiny_root, seed=60)


@pytest.fixture
def until_budget(llama):
    """Rows end at their budgets, whatever the model says, so every answer is several tokens long."""
    with ends_at_budget(llama.generator):
        yield


def _answer(bb: Backbone, batches, prefixes: PrefixCache | None) -> list:
    """Answers of question batches that join one answering a step apart: each batch is (questions, their
    passages, adapter set keys); every question's passages come from collection "news/v1"."""
    answering = bb.answering(prefixes)
    tickets, done = [], {}
    with torch.inference_mode():
        for questions, passages, keys in batches:
            tickets += answering.add(
                questions,
                passages,
                [[1.0] * len(row) for row in passages],
                keys,
                [5] * len(questions),
                ["news/v1"] * len(questions),
            )
            done.update(answering.step())
        while len(answering):
            done.update(answering.step())
    return [done[t] for t in tickets]


def _same(got: list, expected: list) -> None:
    for a, b in zip(got, expected, strict=True):
        assert [c for c, _ in a.candidates] == [c for c, _ in b.candidates]
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)


def test_a_prompt_is_cut_after_its_passage_and_the_cut_keeps_the_tokens(llama):
    generator = llama.generator
    prompts = [generator.source(q, PASSAGES[1]) for q in QUESTIONS[:2]]
    assert prompts[0].prefix == prompts[1].prefix
    assert prompts[0].prefix.endswith(PASSAGES[1].text)
    assert QUESTIONS[0] in prompts[0].suffix and PASSAGES[1].text not in prompts[0].suffix
    prefixes, _ = generator.prompt_ids(prompts)
    assert prefixes[0] == prefixes[1] and prefixes[0]
    # A closed-book prompt shares nothing: it has no prefix to cache.
    assert generator.source(QUESTIONS[0], None).prefix == ""
    saved, generator.tokenizer.chat_template = generator.tokenizer.chat_template, CHATML
    try:
        chat = generator.source(QUESTIONS[0], PASSAGES[1])
    finally:
        generator.tokenizer.chat_template = saved
    assert chat.prefix.startswith("<|im_start|>system\n") and chat.prefix.endswith(PASSAGES[1].text)
    assert chat.suffix.startswith("\n\nQuestion: ") and chat.suffix.endswith("<|im_start|>assistant\n")


def test_cached_prefixes_answer_exactly_as_whole_prefills(llama, until_budget):
    # Questions of other lengths share passages under mixed adapters; the second batch joins a step later
    # with a prefix it finds (news on PASSAGES[0]) and ones it does not (covid on PASSAGES[0], PASSAGES[2]).
    batches = [
        (QUESTIONS[:3], [PASSAGES[:2], PASSAGES[:2], PASSAGES[1:2]], ["news", "news", None]),
        (QUESTIONS[3:], [PASSAGES[:1], [PASSAGES[0], PASSAGES[2]]], ["news", "covid"]),
    ]
    expected = _answer(llama, batches, None)
    cache = PrefixCache(budget_bytes=1 << 30)
    first = _answer(llama, batches, cache)
    # distinct (adapter, passage) prefixes: news p1, news p2, base p2, then covid p1, covid p3; news p1 reused
    assert (cache.hits, cache.misses, len(cache)) == (1, 5, 5)
    second = _answer(llama, batches, cache)
    assert (cache.hits, cache.misses) == (1 + 6, 5)
    _same(first, expected)
    _same(second, expected)
    assert len({a.text for a in expected}) > 1  # the adapters make a difference the test could miss


def test_an_evicted_prefix_is_computed_again_and_answers_the_same(llama, until_budget):
    batch = [(QUESTIONS[:1], [PASSAGES[:1]], ["news"])]
    size = _prefix_bytes(llama, batch)
    cache = PrefixCache(budget_bytes=size + size // 2)  # room for one prefix of this size
    expected = _answer(llama, batch, None)
    _same(_answer(llama, batch, cache), expected)
    _answer(llama, [(QUESTIONS[:1], [PASSAGES[:1]], ["covid"])], cache)  # pushes the first one out
    assert cache.evictions["budget"] == 1 and len(cache) == 1
    _same(_answer(llama, batch, cache), expected)
    assert (cache.hits, cache.misses, cache.evictions["budget"]) == (0, 3, 2)
    assert cache.nbytes <= cache.budget_bytes


def _prefix_bytes(bb: Backbone, batch) -> int:
    probe = PrefixCache(budget_bytes=1 << 30)
    _answer(bb, batch, probe)
    return probe.nbytes


def test_a_reattached_adapter_of_the_same_name_never_hits_the_old_weights_prefixes(tiny_root, until_budget):
    bb = load(tiny_root, "llama", "bert")
    bb.add_adapter_set("news@v1")
    randomize(bb, "news@v1", seed=1)
    batch = [(QUESTIONS[:2], [PASSAGES[:2], PASSAGES[:1]], ["news@v1", "news@v1"])]
    cache = PrefixCache(budget_bytes=1 << 30)
    _answer(bb, batch, cache)
    name = bb._names("generator", ["news@v1"])[0]
    before = bb.generator.host.identity(name)
    # The same name, other weights (a set re-published under the same version, a slot reused).
    bb.remove_adapter_set("news@v1")
    bb.add_adapter_set("news@v1")
    randomize(bb, "news@v1", seed=2)
    assert bb.generator.host.identity(name) != before
    expected = _answer(bb, batch, None)
    got = _answer(bb, batch, cache)
    _same(got, expected)
    assert (cache.hits, cache.misses) == (0, 4)
    assert cache.evictions["adapter"] == 2  # the old weights' prefixes were dropped, not kept around


def test_a_training_scope_gives_the_adapter_a_new_identity(tiny_root):
    bb = load(tiny_root, "llama", "bert")
    bb.add_adapter_set("news")
    host = bb.generator.host
    name = bb._names("generator", ["news"])[0]
    before = host.identity(name)
    with bb.training("news", ("generator",)):
        pass
    assert host.identity(name) != before and host.identities() == {"__base__", host.identity(name)}


def _prefix(length: int) -> _Prefix:
    """A fake prefix of `length` tokens: one layer, one head of dim 4, float32 (32 bytes a token)."""
    return _Prefix(tuple(range(length)), [torch.zeros(1, length, 4)], [torch.zeros(1, length, 4)])


def _key(passage: str, passages: str = "news/v1") -> PrefixKey:
    return PrefixKey("fp", passages, passage, 2)


def test_the_budget_evicts_least_recently_used_first_and_counts():
    cache = PrefixCache(budget_bytes=3 * 320)  # three prefixes of 10 tokens
    for passage in ("a", "b", "c"):
        cache.put("base", _key(passage), _prefix(10))
    assert cache.get("base", _key("a"), list(range(10))) is not None  # a is now the most recent
    cache.put("base", _key("d"), _prefix(10))
    assert cache.get("base", _key("b"), list(range(10))) is None
    assert all(cache.get("base", _key(p), list(range(10))) for p in ("a", "c", "d"))
    assert (cache.hits, cache.misses, cache.evictions["budget"]) == (4, 1, 1)
    assert cache.nbytes == 3 * 320 and len(cache) == 3
    cache.put("base", _key("e"), _prefix(20))  # twice as large: two go
    assert len(cache) == 2 and cache.evictions["budget"] == 3
    cache.put("base", _key("huge"), _prefix(100))  # larger than the whole budget: not kept, nothing lost
    assert len(cache) == 2 and cache.get("base", _key("huge"), list(range(100))) is None


def test_keys_tell_adapters_collections_and_token_ids_apart():
    cache = PrefixCache(budget_bytes=1 << 20)
    cache.put("s0_news#1", _key("a"), _prefix(10))
    assert cache.get("s0_news#1", _key("a"), list(range(10))) is not None
    assert cache.get("s0_news#2", _key("a"), list(range(10))) is None  # the same name, other weights
    assert cache.get("s0_news#1", _key("a", "news/v2"), list(range(10))) is None  # another index version
    assert cache.get("s0_news#1", _key("a"), list(range(1, 11))) is None  # other ids: never reused
    cache.put("base", _key("a"), _prefix(10))
    cache.retain({"base"})
    assert len(cache) == 1 and cache.evictions["adapter"] == 1 and cache.nbytes == 320


def test_a_zero_budget_caches_nothing(llama):
    cache = PrefixCache(budget_bytes=0)
    _answer(llama, [(QUESTIONS[:2], [PASSAGES[:1], PASSAGES[:1]], ["news", "news"])], cache)
    assert (len(cache), cache.hits, cache.misses) == (0, 0, 0)


def test_a_passage_whose_text_changed_under_the_same_key_is_not_reused(llama, until_budget):
    # Cannot happen while index versions are immutable; if it did, the token ids tell.
    changed = Passage(PASSAGES[0].id, PASSAGES[0].title, "the capital of france is lyon")
    cache = PrefixCache(budget_bytes=1 << 30)
    _answer(llama, [(QUESTIONS[:1], [PASSAGES[:1]], ["news"])], cache)
    batch = [(QUESTIONS[:1], [[changed]], ["news"])]
    _same(_answer(llama, batch, cache), _answer(llama, batch, None))
    assert (cache.hits, cache.misses, len(cache)) == (0, 2, 1)
