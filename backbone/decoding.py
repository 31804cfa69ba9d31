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
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs

if TYPE_CHECKING:
    from .generator import Generation, Generator

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


def _left_pad_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    return torch.cat([mask.new_zeros(mask.shape[0], length - mask.shape[1]), mask], dim=1)


class Decoding:
    """Greedy decoding of rows that join (`add`) and finish (`step`) at different times, under per-row
    adapters.

    Not thread-safe: the thread that owns the model drives it. Adapter names are resolved on every forward, so
    a row fails loudly (UnknownAdapter) rather than run under another adapter if its own was detached mid-way.
    """

    def __init__(self, generator: Generator):
        self._generator = generator
        self._batch: _Batch | None = None
        self._finished: list[tuple[int, Generation]] = []
        self._tickets = itertools.count()

    def __len__(self) -> int:
        """Rows not yet returned by `step`."""
        return self.rows + len(self._finished)

    @property
    def rows(self) -> int:
        """Rows the next step runs."""
        return len(self._batch.rows) if self._batch else 0

    def add(self, sources: list[str], adapters: list[str], max_new_tokens: list[int]) -> list[int]:
        """Prefill new rows (one forward for all) and pick their first tokens; returns their tickets."""
        if not sources:
            return []
        generator = self._generator
        tokenizer = generator.tokenizer
        tokenizer.padding_side = "left"
        enc = tokenizer(sources, padding=True, add_special_tokens=False, return_tensors="pt")
        enc = enc.to(generator.device)
        positions = (enc.attention_mask.cumsum(-1) - 1).clamp(min=0)  # [n, length]
        cache = Cache(layers=[_GrowingLayer() for _ in range(generator.host.base.config.num_hidden_layers)])
        out = generator.host.forward(
            adapters,
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        lengths = enc.attention_mask.sum(-1).tolist()
        rows = [
            _Row(next(self._tickets), adapter, budget, int(length))
            for adapter, budget, length in zip(adapters, max_new_tokens, lengths)
        ]
        batch = _Batch(rows, cache, enc.attention_mask)
        self._advance(batch, out.logits[:, -1])
        if batch.rows:
            if self._batch is None:
                self._batch = batch
            else:
                self._batch.join(batch)
        return [row.ticket for row in rows]

    def step(self) -> list[tuple[int, Generation]]:
        """One decoding step for every row; returns the rows that finished since the last call."""
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
        finished, self._finished = self._finished, []
        return finished

    def drop(self, tickets: set[int]) -> None:
        """Stop decoding these rows (their requests were abandoned); they are never returned."""
        self._finished = [(t, g) for t, g in self._finished if t not in tickets]
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
        self._tickets = itertools.count()
        self.rows = 0  # rows are never in flight between calls

    def __len__(self) -> int:
        return len(self._finished)

    def add(self, sources: list[str], adapters: list[str], max_new_tokens: list[int]) -> list[int]:
        tickets = [next(self._tickets) for _ in sources]
        groups: dict[int, list[int]] = {}
        for i, budget in enumerate(max_new_tokens):
            groups.setdefault(budget, []).append(i)
        for budget, rows in groups.items():
            generations = self._generator.generate_whole(
                [sources[i] for i in rows], [adapters[i] for i in rows], budget
            )
            self._finished += [(tickets[i], g) for i, g in zip(rows, generations)]
        return tickets

    def step(self) -> list[tuple[int, Generation]]:
        finished, self._finished = self._finished, []
        return finished

    def drop(self, tickets: set[int]) -> None:
        self._finished = [(t, g) for t, g in self._finished if t not in tickets]
