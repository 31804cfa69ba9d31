"""Training data made from a domain's own passages, for domains with documents but few or no QA pairs.

Facts are learned when seen in many forms (Ovadia et al.), and a retriever adapts to a domain from its
passages alone when it is given queries for them (ORQA's inverse cloze task, Promptagator, GPL). Two kinds:

- Inverse-cloze pairs (`ict_pairs`): a sentence of a passage is the query and the passage is its positive,
  with the sentence left in it with probability `keep_sentence` (ORQA removes it 90% of the time; on these
  domains, where questions share words with their passages, keeping it trained a better retriever). Cheap: no
  generation. They train the retriever only (no answer).
- Generated questions (`generate_questions`), answer first: a short span of a passage (an amount, a date, a
  name) is the answer, and the generator, prompted with a few of the domain's examples (or a built-in one),
  writes a question it answers. Asked for question and answer together, the 135M generator copied its
  demonstrations and answered with sentences that were no span. A question is kept only when it is round-trip
  consistent: BM25 or the base retriever finds its passage among the top k for it. They are QA examples with a
  gold passage, so they train both the retriever and the generator. Generating is slow on a CPU, so they are
  cached in the store per passages, examples, backbone and settings (`SyntheticCache`).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from adapters.qa import QaExample, parse_qa_jsonl, to_jsonl
from backbone import Passage, normalize_answer
from storage import artifacts
from storage.store import ObjectStore

if TYPE_CHECKING:
    from backbone import Backbone
    from indexing import IndexHandle

SYNTHETIC_SPLIT = "synthetic"
GENERATED_FILE = "generated.jsonl"
# A sentence ends at . ! ? before a capital, a digit or a quote, or at a line break (tables, dialogue lines).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])|\n+")


@dataclass(frozen=True)
class RetrievalPair:
    """A query and the passages that answer it: what the contrastive loss trains the retriever on.

    `positive` is the passage as the passage encoder sees it in training (for an inverse-cloze pair, possibly
    without the query sentence); `gold` are the ids of every passage that counts as a hit for the query."""

    query: str
    positive: Passage
    gold: tuple[str, ...]
    kind: str  # "qa" (a real question), "generated" or "ict"


def sentences(text: str, *, min_words: int, max_words: int) -> list[str]:
    """The sentences of a passage text with `min_words`..`max_words` words, in order."""
    found = []
    for piece in _SENTENCE_END.split(text):
        words = piece.split()
        if min_words <= len(words) <= max_words:
            found.append(" ".join(words))
    return found


def reconstruction_sentences(
    passages: Sequence[Passage], *, min_words: int, max_words: int, limit: int, seed: int
) -> list[str]:
    """Domain sentences to reconstruct (RAG End2End's auxiliary signal): a deterministic sample of at most
    `limit` distinct sentences of the passages."""
    found = sorted(
        {s for passage in passages for s in sentences(passage.text, min_words=min_words, max_words=max_words)}
    )
    if len(found) > limit:
        found = random.Random(seed).sample(found, limit)
    return found


def ict_pairs(
    passages: Sequence[Passage],
    *,
    seed: int,
    keep_sentence: float = 1.0,
    min_words: int = 5,
    max_words: int = 64,
    limit: int | None = None,
) -> list[RetrievalPair]:
    """One inverse-cloze pair per passage that has a sentence of `min_words`..`max_words` words and text
    besides it: a deterministic function of (passages, seed). `limit` keeps a seeded sample of that many."""
    rng = random.Random(f"{seed}:ict")
    pairs = []
    for passage in passages:
        found = sentences(passage.text, min_words=min_words, max_words=max_words)
        if not found:
            continue
        query = rng.choice(found)
        rest = " ".join(passage.text.replace(query, " ").split()) if rng.random() >= keep_sentence else ""
        if rng.random() >= keep_sentence and not rest:
            continue  # the sentence is the whole passage: nothing would be left to find
        text = rest or passage.text
        pairs.append(RetrievalPair(query, Passage(passage.id, passage.title, text), (passage.id,), "ict"))
    if limit is not None and len(pairs) > limit:
        pairs = rng.sample(pairs, limit)
    return pairs


def qa_pairs(
    examples: Sequence[QaExample], passages: Sequence[Passage], kind: str = "qa"
) -> list[RetrievalPair]:
    """A pair for every example with gold passages in the knowledge base; its positive is the first gold."""
    by_id = {p.id: p for p in passages}
    pairs = []
    for example in examples:
        gold = tuple(pid for pid in example.passage_ids if pid in by_id)
        if gold:
            pairs.append(RetrievalPair(example.question, by_id[gold[0]], gold, kind))
    return pairs


# --- generated questions ------------------------------------------------------------------------------------

GENERATION_INSTRUCTION = (
    "Write one question about the passage whose answer is the given phrase from the passage. "
    "The question must name what it asks about, so that it could be understood without the passage. "
    "Reply with the question only."
)
# Used when a domain has no QA examples to show the generator.
BUILT_IN_EXAMPLE = (
    Passage(
        "example",
        "Port Elm harbour",
        "The harbour of Port Elm was dredged in 1932 so that steamships could dock at the north pier. "
        "Its lighthouse, painted red and white, can be seen 18 miles out to sea.",
    ),
    "How far out to sea can the Port Elm lighthouse be seen?",
    "18 miles",
)
# Answer candidates: amounts, dates and numbers (with a unit word), and capitalised names of up to four words.
_NUMBER = re.compile(
    r"[$€£]?\d+(?:,\d{3})*(?:\.\d+)?%?(?:\s(?:million|billion|thousand|percent|days|weeks|months|years|hours|"
    r"minutes|miles|km|kg|mg|people|patients|cases))?"
)
_NAME = re.compile(r"\b[A-Z][a-z]+(?:\s(?:of\s)?[A-Z][a-z]+){0,3}\b")
_QUESTION = re.compile(r"[^\n?]{8,300}\?")


@dataclass(frozen=True)
class GenerationConfig:
    """How questions are generated and filtered; part of the cache key."""

    max_passages: int = 500  # passages (a seeded sample) a question is generated for
    shots: int = 2  # domain examples shown to the generator (the built-in one when there are none)
    shot_words: int = 60  # words of each shown example's passage, around its answer
    max_new_tokens: int = 48
    round_trip_k: int = 20  # the source passage must be in the top k of BM25 or of the base retriever
    max_answer_words: int = 8
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()[:12]


def answer_candidates(text: str, max_words: int = 8) -> list[str]:
    """Short spans of a passage that make good answers: amounts, dates, numbers and names, in order, once
    each."""
    found = [m.group(0).strip() for pattern in (_NUMBER, _NAME) for m in pattern.finditer(text)]
    return [c for c in dict.fromkeys(found) if 1 <= len(c.split()) <= max_words and len(c) >= 2]


def _shots(examples: Sequence[QaExample], passages_by_id: dict[str, Passage], seed: int):
    """Demonstrations (passage, question, answer) from the domain's examples whose answer is a short span of
    a gold passage, shuffled by seed; the built-in one when there are none."""
    usable = []
    for example in examples:
        for pid in example.passage_ids:
            passage = passages_by_id.get(pid)
            answer = (
                next((a for a in example.answers if _is_span(a, passage.text)), None) if passage else None
            )
            if answer is not None and len(answer.split()) <= 8:
                usable.append((passage, example.question, answer))
                break
    random.Random(f"{seed}:shots").shuffle(usable)
    return usable[:64] or [BUILT_IN_EXAMPLE]


def _window(text: str, answer: str, words: int) -> str:
    """At most `words` words of `text`, centred on the first occurrence of `answer` when there is one."""
    tokens = text.split()
    if len(tokens) <= words:
        return " ".join(tokens)
    start = text.lower().find(answer.lower())
    middle = len(text[:start].split()) if start >= 0 else 0
    first = min(max(middle - words // 2, 0), len(tokens) - words)
    return " ".join(tokens[first : first + words])


def _is_span(answer: str, text: str) -> bool:
    wanted = normalize_answer(answer)
    return bool(wanted) and f" {wanted} " in f" {normalize_answer(text)} "


def parse_question(text: str, answer: str) -> str | None:
    """The first question in a generation, unless it gives its own answer away."""
    match = _QUESTION.search(text)
    if match is None:
        return None
    question = " ".join(match.group(0).replace("Question:", " ").split())
    if normalize_answer(answer) in normalize_answer(question):
        return None
    return question


def generate_questions(
    backbone: Backbone,
    passages: Sequence[Passage],
    examples: Sequence[QaExample],
    index: IndexHandle,
    config: GenerationConfig = GenerationConfig(),
    *,
    batch_size: int = 8,
    tick: Callable[[], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[QaExample]:
    """Questions about a seeded sample of passages, answer first: a short span of the passage (an amount, a
    date, a name) is picked, and the base generator, shown `shots` of the domain's own examples (a different
    seeded choice per passage), writes a question it answers. Kept when round-trip consistent: BM25 or the
    base retriever of `index` (the domain's base index) finds the passage among the top `round_trip_k`.
    Deterministic for the same backbone, passages, examples and config."""
    import torch

    by_id = {p.id: p for p in passages}
    rng = random.Random(f"{config.seed}:generate")
    chosen = (
        list(passages)
        if len(passages) <= config.max_passages
        else rng.sample(list(passages), config.max_passages)
    )
    shots = _shots(examples, by_id, config.seed)
    generator = backbone.generator
    jobs = []  # (passage, answer, prompt)
    for passage in chosen:
        candidates = answer_candidates(passage.text, config.max_answer_words)
        if not candidates:
            continue
        answer = rng.choice(candidates)
        shown = rng.sample(shots, min(config.shots, len(shots)))
        turns = [
            (f"Passage ({p.title}): {_window(p.text, a, config.shot_words)}\nAnswer: {a}", q)
            for p, q, a in shown
        ]
        prompt = generator.chat(
            GENERATION_INSTRUCTION, turns, f"{generator.passage_text(passage)}\nAnswer: {answer}"
        )
        jobs.append((passage, answer, prompt))
    kept: list[QaExample] = []
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        with torch.inference_mode():
            outputs = backbone.generate(
                [prompt for _, _, prompt in batch], max_new_tokens=config.max_new_tokens
            )
        candidates = [(p, parse_question(text, a), a) for (p, a, _), text in zip(batch, outputs)]
        candidates = [(p, q, a) for p, q, a in candidates if q is not None]
        if candidates:
            questions = [q for _, q, _ in candidates]
            with torch.inference_mode():
                embeddings = backbone.encode_questions(questions)  # [n, dim]
            found = [
                index.search(embeddings, questions, k=config.round_trip_k, mode=mode)
                for mode in ("dense", "bm25")
                if mode in index.modes
            ]  # [modes][n][k]
            for i, (passage, question, answer) in enumerate(candidates):
                if any(passage.id in {h.passage.id for h in rows[i]} for rows in found):
                    kept.append(
                        QaExample(
                            question, (answer,), (passage.id,), SYNTHETIC_SPLIT, f"generated-{passage.id}"
                        )
                    )
        if tick:
            tick()
        if progress:
            progress(min(start + batch_size, len(jobs)), len(jobs))
    return kept


class SyntheticCache:
    """Generated questions in the store, one version per identity (passages, the domain examples shown, the
    backbone and the settings):

        domains/<domain>/synthetic/<version>/generated.jsonl   manifest metadata: identity, count

    Generating is the slow part of a passages-only run; a later run over the same passages reuses it."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store

    @staticmethod
    def prefix(domain: str) -> str:
        return f"domains/{domain}/synthetic"

    @staticmethod
    def identity(
        passages: Sequence[Passage], examples: Sequence[QaExample], fingerprint: str, config: GenerationConfig
    ) -> dict:
        """Everything the generated questions depend on."""
        digest = hashlib.sha256()
        for passage in passages:
            digest.update(json.dumps([passage.id, passage.title, passage.text]).encode())
        return {
            "passages": digest.hexdigest()[:16],
            "examples": hashlib.sha256(to_jsonl(examples)).hexdigest()[:16],
            "fingerprint": fingerprint,
            "config": config.key(),
        }

    def find(self, domain: str, identity: dict) -> list[QaExample] | None:
        for manifest in reversed(artifacts.list_versions(self._store, self.prefix(domain))):
            if manifest.metadata.get("identity") == identity:
                key = f"{self.prefix(domain)}/{manifest.version}/{GENERATED_FILE}"
                return parse_qa_jsonl(self._store.get_bytes(key))
        return None

    def put(self, domain: str, identity: dict, examples: list[QaExample]) -> None:
        with tempfile.TemporaryDirectory(prefix="ragadapt-synthetic-") as scratch:
            path = Path(scratch) / GENERATED_FILE
            path.write_bytes(to_jsonl(examples))
            artifacts.publish(
                self._store,
                self.prefix(domain),
                {GENERATED_FILE: path},
                {"identity": identity, "count": len(examples)},
            )
