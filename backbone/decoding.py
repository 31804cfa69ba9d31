"""Greedy decoding of a changing set of rows: continuous batching (Orca's iteration-level scheduling) with a
LoRA adapter per row, the way LoRAX and S-LoRA serve many adapters on one model.

Rows join between steps with their own prefill and leave as soon as they finish, so a long answer never holds
a batch of short ones, and a new request does not wait for the batch in flight to end. A decoding step over 16
rows costs about twice a step over one (2 CPU cores, the embedded default), so a batch kept full is what makes
per-row adapters pay.

All rows share one left-padded KV cache. Joining left-pads the shorter side to the longer one; leaving drops
the rows, then the columns on the left that only padded them. Each layer appends into spare capacity rather
than concatenating the whole cache every token (what `DynamicCache` does: a quarter of a 16-row step on a
CPU).

Prefill is compute-bound on a CPU, and RAG-sequence prefills k (passage, question) rows per question whose
prompts start with the same (instruction + passage) prefix for every question that retrieves the passage. A
`PrefixCache` keeps those prefixes' KV states (RAGCache, TurboRAG; vLLM's and SGLang's prefix caching), and a
joining row prefills only its suffix on top of them. The reuse is exact: the prefix has the same token ids
(`Generator.prompt_ids` tokenizes prefix and suffix apart), its states were computed at the same position ids
(0 .. length-1: position ids count a row's real tokens, never its padding), and the suffix attends to them
under the row's own adapter, whose identity is part of the key.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict, deque
from collections.abc import Generator as Generator_
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs

if TYPE_CHECKING:
    from .generator import Generation, Generator, Prompt

# Room a layer grows by when it runs out: one reallocation per this many decoding steps.
_SPARE_TOKENS = 64


class _GrowingLayer(DynamicLayer):
    """A full-attention cache layer ([rows, heads, length, head_dim]) with spare capacity after `length`."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._reset(key_states, value_states)
            return self.keys, self.values
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            self._reset(self.keys, self.values, spare=end - self.length + _SPARE_TOKENS)
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def load(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Start from these keys and values (a past the next forward's inputs attend to)."""
        self.lazy_initialization(keys, values)
        self._reset(keys, values)

    def _reset(self, keys: torch.Tensor, values: torch.Tensor, spare: int = 0) -> None:
        """Hold exactly these keys and values (copied when `spare` asks for room after them)."""
        if spare:
            rows, heads, length, _ = keys.shape
            self._keys = keys.new_empty(rows, heads, length + spare, keys.shape[-1])
            self._values = values.new_empty(rows, heads, length + spare, values.shape[-1])
            self._keys[:, :, :length], self._values[:, :, :length] = keys, values
        else:
            self._keys, self._values = keys, values
        self.length = keys.shape[-2]
        self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]

    def select(self, rows: torch.Tensor, first_column: int) -> None:
        """Keep these rows and the columns from `first_column` on."""
        self._reset(self.keys[rows, :, first_column:], self.values[rows, :, first_column:])

    def join(self, other: _GrowingLayer, length: int) -> None:
        """Append `other`'s rows below these, both left-padded to `length` columns."""
        self._reset(
            torch.cat([_left_pad(self.keys, length), _left_pad(other.keys, length)]),
            torch.cat([_left_pad(self.values, length), _left_pad(other.values, length)]),
        )


def _left_pad(states: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - states.shape[-2]
    if missing == 0:
        return states
    return torch.cat([states.new_zeros(*states.shape[:2], missing, states.shape[-1]), states], dim=-2)


@dataclass(frozen=True)
class PrefixKey:
    """What a prompt prefix's KV states depend on besides the generator adapter (which `Decoding` adds
    itself, by the identity of the attached weights, never by name): the backbone, the passage by identity
    (the version of the collection it comes from and its id there) and the prompt template version."""

    backbone: str  # the backbone's fingerprint
    passages: str  # the passage collection's version, e.g. "<domain>/<index version>"
    passage: str  # the passage's id in that collection
    template: int  # the prompt template version (`TEMPLATE_VERSION`)


@dataclass(frozen=True)
class _Prefix:
    """The KV states of one prompt prefix, computed at position ids 0 .. len(ids)-1."""

    ids: tuple[int, ...]
    keys: list[torch.Tensor]  # per layer [kv heads, len(ids), head_dim]
    values: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.keys, *self.values])


class PrefixCache:
    """KV states of prompt prefixes, least recently used first out when over `budget_bytes` (0: off).

    Keys are (adapter identity, `PrefixKey`). An adapter identity belongs to one attachment of one set of
    weights, so entries of a detached or replaced adapter can never be hit again; `retain` frees them. An
    entry also keeps its token ids, and a lookup whose ids differ is a miss: reuse is exact or nothing.

    Not thread-safe: the thread that owns the model uses it. `hits`, `misses` and `evictions` count since
    creation (for metrics); a lookup is one distinct prefix of one prefill.
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = {"budget": 0, "adapter": 0}  # by reason: over budget, adapter detached
        self._entries: OrderedDict[tuple[str, PrefixKey], _Prefix] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, adapter: str, key: PrefixKey, ids: list[int]) -> _Prefix | None:
        entry = self._entries.get((adapter, key))
        if entry is None or entry.ids != tuple(ids):
            self.misses += 1
            return None
        self._entries.move_to_end((adapter, key))
        self.hits += 1
        return entry

    def put(self, adapter: str, key: PrefixKey, prefix: _Prefix) -> None:
        """Keep `prefix`, evicting the least recently used entries to stay within budget (a prefix larger
        than the whole budget is not kept)."""
        size = prefix.nbytes
        if size > self.budget_bytes:
            return
        self._remove((adapter, key))
        self._entries[(adapter, key)] = prefix
        self.nbytes += size
        while self.nbytes > self.budget_bytes:
            self._remove(next(iter(self._entries)))
            self.evictions["budget"] += 1

    def retain(self, adapters: set[str]) -> None:
        """Drop the entries of adapter identities not in `adapters` (those no longer attached)."""
        for entry in [e for e in self._entries if e[0] not in adapters]:
            self._remove(entry)
            self.evictions["adapter"] += 1

    def _remove(self, entry: tuple[str, PrefixKey]) -> None:
        prefix = self._entries.pop(entry, None)
        if prefix is not None:
            self.nbytes -= prefix.nbytes


def supports_continuous(config) -> bool:
    """Rows can share one growing cache only when every layer attends to the whole sequence (no sliding
    window, no linear attention state)."""
    layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    return all(kind == "full_attention" for kind in layer_types)


@dataclass
class _Row:
    ticket: int
    adapter: str
    budget: int  # new tokens it may still produce, in total
    position: int  # position id of its next input token
    tokens: list[int] = field(default_factory=list)
    logprob: float = 0.0
    dropped: bool = False  # abandoned while its prefill was in progress


class _Batch:
    """Rows in the cache, in cache order, with their attention mask and next input tokens."""

    def __init__(self, rows: list[_Row], cache: Cache, mask: torch.Tensor):
        self.rows, self.cache, self.mask = rows, cache, mask  # mask [n, length]
        self.next_tokens = torch.empty(0, dtype=torch.long)  # [n], set by each forward's greedy choice

    def keep(self, indices: list[int]) -> None:
        rows = torch.tensor(indices, dtype=torch.long, device=self.mask.device)
        mask = self.mask[rows]
        used = mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else mask.shape[1]
        self.rows = [self.rows[i] for i in indices]
        self.mask, self.next_tokens = mask[:, first:], self.next_tokens[rows]
        for layer in self.cache.layers:
            layer.select(rows, first)

    def join(self, other: _Batch) -> None:
        length = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.join(theirs, length)
        self.mask = torch.cat([_left_pad_mask(self.mask, length), _left_pad_mask(other.mask, length)])
        self.next_tokens = torch.cat([self.next_tokens, other.next_tokens])
        self.rows += other.rows


def _left_padded(ids: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of token ids left-padded to one width: (input ids, attention mask, position ids), each [n, width];
    position ids count each row's own tokens from 0."""
    width = max(map(len, ids))
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in ids], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], dtype=torch.long)
    return input_ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _left_pad_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    return torch.cat([mask.new_zeros(mask.shape[0], length - mask.shape[1]), mask], dim=1)


class _Forward:
    """One left-padded forward of new tokens on top of a past of cached prefixes (right-aligned, zeros where
    a row has none), run whole or a chunk of columns at a time; position ids count each row's real tokens,
    continuing from its prefix."""

    def __init__(
        self,
        generator: Generator,
        adapters: list[str],
        ids: list[list[int]],
        prefixes: list[_Prefix | None] | None = None,
    ):
        self._generator = generator
        self._adapters = adapters
        self._lengths = [len(row) for row in ids]
        prefixes = prefixes or [None] * len(ids)
        self.cache, self.mask = _past(generator, prefixes)  # mask grows with the columns fed
        self._ids, self._new_mask, positions = _left_padded(ids, generator.tokenizer.pad_token_id)
        offsets = torch.tensor([len(p.ids) if p is not None else 0 for p in prefixes]).unsqueeze(1)
        self._positions = positions + offsets
        self._fed = 0
        self.logits: torch.Tensor | None = None  # [rows, vocab] at the last column, once done

    @property
    def width(self) -> int:
        return len(self._lengths)

    @property
    def remaining(self) -> int:
        return self._ids.shape[1] - self._fed

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def run(self, columns: int) -> tuple[int, int]:
        """Feed the next `columns` columns; returns (padding, real) tokens fed."""
        start, end = self._fed, min(self._fed + columns, self._ids.shape[1])
        device = self._generator.device
        new_mask = self._new_mask[:, start:end]
        self.mask = torch.cat([self.mask, new_mask.to(self.mask.device)], dim=1)
        self._fed = end
        out = self._generator.host.forward(
            self._adapters,
            input_ids=self._ids[:, start:end].to(device),
            attention_mask=self.mask.to(device),
            position_ids=self._positions[:, start:end].to(device),
            cache=self.cache,
            use_cache=True,
            # Vocabulary logits of the last column only, and none before the last chunk.
            logits_to_keep=last_positions(end - start, 1 if self.done else 0, device),
        )
        if self.done:
            self.logits = out.logits[:, -1]
        real = int(new_mask.sum())
        return new_mask.numel() - real, real

    def prefixes(self) -> list[_Prefix]:
        """Each row's KV states, when the rows were whole prefixes computed from position 0."""
        width = self._ids.shape[1]
        return [
            _Prefix(
                tuple(self._ids[i, width - n :].tolist()),
                [layer.keys[i, :, -n:].clone() for layer in self.cache.layers],
                [layer.values[i, :, -n:].clone() for layer in self.cache.layers],
            )
            for i, n in enumerate(self._lengths)
        ]


def last_positions(length: int, count: int, device: torch.device) -> torch.Tensor:
    """`logits_to_keep` for the last `count` of `length` positions, as indices: an int there slices the
    hidden states, and a bfloat16 LM head on that strided slice takes a slow path on a CPU (about 100 ms
    for the embedded default's, a transposed copy of its weight), where indexing makes a fresh tensor."""
    return torch.arange(length - count, length, device=device)


def _past(generator: Generator, prefixes: list[_Prefix | None]) -> tuple[Cache, torch.Tensor]:
    """A cache holding each row's prefix right-aligned (zeros where it has none or a shorter one) and its
    attention mask [n, longest prefix]."""
    cache = Cache(layers=[_GrowingLayer() for _ in range(generator.host.base.config.num_hidden_layers)])
    lengths = [len(p.ids) if p is not None else 0 for p in prefixes]
    width = max(lengths)
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths], device=generator.device)
    if width:
        sample = next(p for p in prefixes if p is not None)
        for index, layer in enumerate(cache.layers):
            heads, _, dim = sample.keys[index].shape
            keys = sample.keys[index].new_zeros(len(prefixes), heads, width, dim)
            values = sample.values[index].new_zeros(len(prefixes), heads, width, dim)
            for row, prefix in enumerate(prefixes):
                if prefix is not None:
                    keys[row, :, width - len(prefix.ids) :] = prefix.keys[index]
                    values[row, :, width - len(prefix.ids) :] = prefix.values[index]
            layer.load(keys, values)
    return cache, mask


class Decoding:
    """Greedy decoding of rows that join (`add`) and finish (`step`) at different times, under per-row
    adapters, reusing prompt prefixes' KV states from `prefixes` where given.

    Prefill: newcomers are grouped by the length of what they prefill, so that a group pads its rows by at
    most an eighth of its tokens (padding them all to the longest, as one forward would, costs about a fifth
    of prefill on RAG prompts), and each group is one forward. With `chunk_tokens` (Sarathi-Serve's chunked
    prefill), newcomers that arrive while rows are decoding are prefilled a chunk of about that many tokens
    per step, between decoding steps, so a long prompt delays the rows in flight by one chunk per token, not
    by its whole prefill; with nothing in flight, or without `chunk_tokens`, `add` prefills at once.

    Not thread-safe: the thread that owns the model drives it. Adapter names are resolved on every forward, so
    a row fails loudly (UnknownAdapter) rather than run under another adapter if its own was detached mid-way.
    A forward that fails in `add` adds nothing; one that fails in `step` (a chunk) raises from `step`.
    """

    # A length group's padding stays within this share of its real tokens.
    PADDING = 1 / 8

    def __init__(self, generator: Generator, prefixes: PrefixCache | None = None, chunk_tokens: int = 0):
        self._generator = generator
        self._prefixes = prefixes
        self.chunk_tokens = chunk_tokens
        self._batch: _Batch | None = None
        # prefills in progress, oldest first: (their rows, the coroutine feeding them)
        self._admissions: deque[tuple[list[_Row], Generator_[int | None, float, None]]] = deque()
        self._waiting: dict[int, _Row] = {}  # ticket -> row of an admission in progress
        self._finished: list[tuple[int, Generation]] = []
        self._prefilled: list[int] = []  # rows whose first token is out, since the last `prefilled` call
        self._tickets = itertools.count()
        self.padding = [0, 0]  # prefill tokens fed: [padding, real], since creation

    def __len__(self) -> int:
        """Rows not yet returned by `step`."""
        return self.rows + len(self._waiting) + len(self._finished)

    @property
    def rows(self) -> int:
        """Rows the next step decodes."""
        return len(self._batch.rows) if self._batch else 0

    @property
    def prefilling(self) -> int:
        """Rows still being prefilled (in chunks, between steps)."""
        return len(self._waiting)

    def add(self, prompts: list[Prompt], adapters: list[str], max_new_tokens: list[int]) -> list[int]:
        """Admit new rows; returns their tickets. Prefilled at once (and their first tokens picked) unless
        rows are decoding and `chunk_tokens` is set: then `step` prefills them chunk by chunk, and a failed
        prefill there raises from `step`."""
        if not prompts:
            return []
        rows = [
            _Row(next(self._tickets), adapter, budget, 0) for adapter, budget in zip(adapters, max_new_tokens)
        ]
        admission = self._admission(prompts, rows)
        next(admission)  # tokenize and look up the cache now; forwards run when given tokens to spend
        if self._batch is None or not self.chunk_tokens:
            try:
                for _ in iter(lambda: admission.send(math.inf), None):
                    pass
            except BaseException:  # groups that joined before the failure leave again: nothing was added
                self.drop({row.ticket for row in rows})
                raise
        else:
            self._admissions.append((rows, admission))
            self._waiting.update((row.ticket, row) for row in rows)
        return [row.ticket for row in rows]

    def _admission(self, prompts: list[Prompt], rows: list[_Row]) -> Generator_[int | None, float, None]:
        """Prefill `rows` as a coroutine: sent a token budget, it runs one forward (a chunk of columns that
        fits the budget) and yields the tokens it fed; it yields None when its rows have joined the batch.

        A row whose prefix is cached prefills only its suffix. Its cache row holds [padding, prefix,
        padding, suffix]: the prefix right-aligned in the past columns, the suffix left-padded after them,
        the padding masked out, and the suffix's position ids continuing from the prefix's length, so every
        token attends to exactly what it would in a single forward of the whole prompt. Prefixes the cache
        lacks are computed first, once each, and kept."""
        generator = self._generator
        adapters = [row.adapter for row in rows]
        prefix_ids, suffix_ids = generator.prompt_ids(prompts)
        entries, found, missing = self._lookup(prompts, adapters, prefix_ids, suffix_ids)
        budget = yield 0
        if missing:
            firsts = list(missing.values())
            for group in self._groups([prefix_ids[i] for i in firsts]):
                forward = _Forward(
                    generator, [adapters[firsts[i]] for i in group], [prefix_ids[firsts[i]] for i in group]
                )
                while not forward.done:
                    budget = yield self._feed(forward, budget)
                for i, prefix in zip(group, forward.prefixes()):
                    entry = list(missing)[i]
                    found[entry] = prefix
                    self._prefixes.put(*entry, prefix)
        prefixes = [found[entries[i]] if i in entries else None for i in range(len(rows))]
        # Rows without a cached prefix prefill their whole prompt as the "suffix" of an empty past.
        new_ids = [s if c is not None else p + s for p, s, c in zip(prefix_ids, suffix_ids, prefixes)]
        for group in self._groups(new_ids):
            forward = _Forward(
                generator,
                [adapters[i] for i in group],
                [new_ids[i] for i in group],
                [prefixes[i] for i in group],
            )
            while not forward.done:
                budget = yield self._feed(forward, budget)
            joined = [rows[i] for i in group]
            for row, i in zip(joined, group):
                row.position = (len(prefixes[i].ids) if prefixes[i] is not None else 0) + len(new_ids[i])
                self._waiting.pop(row.ticket, None)
            batch = _Batch(joined, forward.cache, forward.mask)
            self._advance(batch, forward.logits)
            self._prefilled += [row.ticket for row in joined if not row.dropped]
            dropped = {row.ticket for row in joined if row.dropped}
            if dropped:
                self._finished = [(t, g) for t, g in self._finished if t not in dropped]
                kept = [i for i, row in enumerate(batch.rows) if not row.dropped]
                if not kept:
                    batch.rows = []
                elif len(kept) < len(batch.rows):
                    batch.keep(kept)
            if batch.rows:
                if self._batch is None:
                    self._batch = batch
                else:
                    self._batch.join(batch)
        yield None

    def prefilled(self) -> list[int]:
        """Rows whose prefill ended (their first token picked) since the last call."""
        done, self._prefilled = self._prefilled, []
        return done

    def _feed(self, forward: _Forward, budget: float) -> int:
        """Run `forward`'s next chunk within `budget` tokens (at least one column); returns tokens fed."""
        columns = forward.remaining if budget == math.inf else max(1, int(budget) // forward.width)
        padding, real = forward.run(columns)
        self.padding[0] += padding
        self.padding[1] += real
        return padding + real

    def _groups(self, ids: list[list[int]]) -> list[list[int]]:
        """Row indices grouped by length, longest first: a group's rows are padded to its first row's
        length by at most `PADDING` of its real tokens."""
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        groups: list[list[int]] = []
        for i in order:
            group = groups[-1] if groups else None
            if group is not None:
                width, real = len(ids[group[0]]), sum(len(ids[j]) for j in group) + len(ids[i])
                if width * (len(group) + 1) - real <= self.PADDING * real:
                    group.append(i)
                    continue
            groups.append([i])
        return groups

    def _lookup(
        self,
        prompts: list[Prompt],
        adapters: list[str],
        prefix_ids: list[list[int]],
        suffix_ids: list[list[int]],
    ) -> tuple[dict[int, tuple[str, PrefixKey]], dict[tuple[str, PrefixKey], _Prefix | None], dict]:
        """Rows' prefix cache entries (row -> entry), the entries found (entry -> states, None if missing)
        and the missing ones (entry -> the first row with it)."""
        entries: dict[int, tuple[str, PrefixKey]] = {}
        found: dict[tuple[str, PrefixKey], _Prefix | None] = {}
        missing: dict[tuple[str, PrefixKey], int] = {}
        cache = self._prefixes
        if cache is None or not cache.budget_bytes:
            return entries, found, missing
        host = self._generator.host
        cache.retain(host.identities())
        for i, (prompt, adapter) in enumerate(zip(prompts, adapters)):
            # A row needs a suffix of its own: its first token's logits come from the suffix's forward.
            if prompt.key is None or not prefix_ids[i] or not suffix_ids[i]:
                continue
            entries[i] = entry = (host.identity(adapter), prompt.key)
            if entry not in found:
                found[entry] = cache.get(*entry, prefix_ids[i])
                if found[entry] is None:
                    missing[entry] = i
        return entries, found, missing

    def step(self) -> list[tuple[int, Generation]]:
        """One decoding step for every row, then a chunk of `chunk_tokens` for the prefills waiting (all of
        them when no row is decoding); returns the rows that finished since the last call."""
        self._decode()
        budget = self.chunk_tokens if self._batch is not None else math.inf
        while self._admissions and budget > 0:
            rows, admission = self._admissions[0]
            try:
                spent = admission.send(budget)
            except BaseException:  # its rows are lost (those of its groups that joined too); the rest go on
                self._admissions.popleft()
                self.drop({row.ticket for row in rows})
                raise
            if spent is None:
                self._admissions.popleft()
            else:
                budget -= spent
        finished, self._finished = self._finished, []
        return finished

    def _decode(self) -> None:
        batch = self._batch
        if batch is not None:
            batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
            positions = torch.tensor([[row.position] for row in batch.rows], device=batch.mask.device)
            out = self._generator.host.forward(
                [row.adapter for row in batch.rows],
                input_ids=batch.next_tokens.unsqueeze(1),
                attention_mask=batch.mask,
                position_ids=positions,
                cache=batch.cache,
                use_cache=True,
            )
            for row in batch.rows:
                row.position += 1
            self._advance(batch, out.logits[:, -1])
            if not batch.rows:
                self._batch = None

    def drop(self, tickets: set[int]) -> None:
        """Stop decoding these rows (their requests were abandoned); they are never returned. Rows still
        waiting for their prefill are dropped when it ends, and a prefill left with no rows stops."""
        for ticket in tickets & self._waiting.keys():
            self._waiting.pop(ticket).dropped = True
        self._admissions = deque(
            (rows, admission) for rows, admission in self._admissions if not all(r.dropped for r in rows)
        )
        self._finished = [(t, g) for t, g in self._finished if t not in tickets]
        self._prefilled = [t for t in self._prefilled if t not in tickets]
        if self._batch is not None:
            keep = [i for i, row in enumerate(self._batch.rows) if row.ticket not in tickets]
            if not keep:
                self._batch = None
            elif len(keep) < len(self._batch.rows):
                self._batch.keep(keep)

    def _advance(self, batch: _Batch, logits: torch.Tensor) -> None:
        """Take each row's greedy token from `logits` ([n, vocab]); finished rows leave the batch."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        chosen = logprobs.argmax(dim=-1)  # [n]
        chosen_logprobs = logprobs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1).tolist()
        eos = set(self._generator.eos_ids)
        keep = []
        for i, (row, token, logprob) in enumerate(zip(batch.rows, chosen.tolist(), chosen_logprobs)):
            # The end token's probability counts: log p(answer, then stop | source) is RAG's sequence score.
            row.logprob += logprob
            if token not in eos:
                row.tokens.append(token)
            if token in eos or len(row.tokens) >= row.budget:
                self._finished.append((row.ticket, self._generator.finish(row.tokens, row.logprob)))
            else:
                keep.append(i)
        batch.next_tokens = chosen
        if len(keep) < len(batch.rows):
            if keep:
                batch.keep(keep)
            else:
                batch.rows = []


class WholeBatchDecoding:
    """`Decoding`'s interface over transformers' `generate`, for models whose cache rows cannot be joined
    (seq2seq, sliding-window or linear attention): each `add` decodes its rows to the end at once."""

    def __init__(self, generator: Generator):
        self._generator = generator
        self._finished: list[tuple[int, Generation]] = []
        self._prefilled: list[int] = []
        self._tickets = itertools.count()
        self.rows = 0  # rows are never in flight between calls
        self.prefilling = 0

    def __len__(self) -> int:
        return len(self._finished)

    def add(self, sources: list[Prompt], adapters: list[str], max_new_tokens: list[int]) -> list[int]:
        tickets = [next(self._tickets) for _ in sources]
        groups: dict[int, list[int]] = {}
        for i, budget in enumerate(max_new_tokens):
            groups.setdefault(budget, []).append(i)
        for budget, rows in groups.items():
            generations = self._generator.generate_whole(
                [sources[i] for i in rows], [adapters[i] for i in rows], budget
            )
            self._finished += [(tickets[i], g) for i, g in zip(rows, generations)]
        self._prefilled += tickets
        return tickets

    def prefilled(self) -> list[int]:
        """Rows added since the last call: decoded whole, their first token came with their last."""
        done, self._prefilled = self._prefilled, []
        return done

    def step(self) -> list[tuple[int, Generation]]:
        finished, self._finished = self._finished, []
        return finished

    def drop(self, tickets: set[int]) -> None:
        self._finished = [(t, g) for t, g in self._finished if t not in tickets]
