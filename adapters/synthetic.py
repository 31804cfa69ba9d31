"""Training data made from a domain's own passages, for domains with documents but few or no QA pairs.

Facts are learned when seen in many forms (Ovadia et al.), and a retriever adapts to a domain from its passages
alone when it is given queries for them (ORQA's inverse cloze task, Promptagator, GPL). Two kinds:

- Inverse-cloze pairs (`ict_pairs`): a sentence of a passage is the query and the passage is its positive,
  with the sentence left in it with probability `keep_sentence` (ORQA removes it 90% of the time; on these
  domains, where questions share words with their passages, keeping it trained a better retriever). Cheap: no
  generation. They train the retriever only (no answer).
- Generated questions (`generate_questions`): the generator, prompted with a few of the domain's examples (or a
  built-in one), writes a question about a passage and the short answer to it. A question is kept only when it
  is round-trip consistent: its answer is a span of the passage, and BM25 or the base retriever finds the
  passage among the top k for it. They are QA examples with a gold passage, so they train both the retriever
  and the generator. Generating is slow on a CPU, so they are cached in the store per passages version and
  settings (`SyntheticCache`).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from backbone import Passage, normalize_answer

from adapters.qa import QaExample, parse_qa_jsonl, to_jsonl
from storage import artifacts
from storage.store import ObjectStore

if TYPE_CHECKING:
    from backbone import Backbone
    from indexing import IndexHandle

SYNTHETIC_SPLIT = "synthetic"
GENERATED_FILE = "generated.jsonl"
# A sentence ends at . ! ? before a capital, a digit or a quote, or at a line break (tables, dialogue lines).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])|\n+")
_GENERATED = re.compile(r"Question:\s*(?P<question>.+?\?)\s*Answer:\s*(?P<answer>.+)", re.DOTALL)


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
    found = sorted({s for passage in passages for s in sentences(passage.text, min_words=min_words,
                                                                 max_words=max_words)})
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


def qa_pairs(examples: Sequence[QaExample], passages: Sequence[Passage], kind: str = "qa") -> list[RetrievalPair]:
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
    "Write one question about the passage that is answered by a short phrase copied word for word from the "
    "passage. Reply exactly as:\nQuestion: <question>\nAnswer: <short phrase>"
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


@dataclass(frozen=True)
class GenerationConfig:
    """How questions are generated and filtered; part of the cache key."""

    max_passages: int = 500  # passages (a seeded sample) a question is generated for
    shots: int = 2  # domain examples shown to the generator (the built-in one when there are none)
    shot_tokens: int = 96  # passage tokens of each shown example
    max_new_tokens: int = 48
    round_trip_k: int = 20  # the source passage must be in the top k of BM25 or of the base retriever
    max_answer_words: int = 12
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()[:12]


def _shots(examples: Sequence[QaExample], passages_by_id: dict[str, Passage], count: int, seed: int):
    """Up to `count` (passage, question, answer) demonstrations from the domain's examples with a gold passage
    that holds the answer."""
    rng = random.Random(f"{seed}:shots")
    usable = []
    for example in examples:
        for pid in example.passage_ids:
            passage = passages_by_id.get(pid)
            answer = next((a for a in example.answers if _is_span(a, passage.text)), None) if passage else None
            if answer is not None and len(answer.split()) <= 12:
                usable.append((passage, example.question, answer))
                break
    rng.shuffle(usable)
    return usable[:count] or [BUILT_IN_EXAMPLE]


def _is_span(answer: str, text: str) -> bool:
    wanted = normalize_answer(answer)
    return bool(wanted) and f" {wanted} " in f" {normalize_answer(text)} "


def parse_generation(text: str, passage: Passage, max_answer_words: int) -> tuple[str, str] | None:
    """(question, answer) from a generation, when it has both and the answer is a short span of the passage."""
    match = _GENERATED.search(text)
    if match is None:
        return None
    question = " ".join(match.group("question").split())
    answer = " ".join(match.group("answer").strip().splitlines()[0].split()).strip(" .")
    if not question or not answer or len(answer.split()) > max_answer_words:
        return None
    if normalize_answer(answer) in normalize_answer(question) or not _is_span(answer, passage.text):
        return None
    return question, answer


def generate_questions(
    backbone: "Backbone",
    passages: Sequence[Passage],
    examples: Sequence[QaExample],
    index: "IndexHandle",
    config: GenerationConfig = GenerationConfig(),
    *,
    batch_size: int = 16,
    tick: Callable[[], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[QaExample]:
    """Generate, parse and round-trip filter one question per passage of a seeded sample; deterministic for
    the same backbone, passages, examples and config. `index` is the domain's base index (BM25 and the base
    retriever's vectors) the round trip searches."""
    import torch

    by_id = {p.id: p for p in passages}
    rng = random.Random(f"{config.seed}:generate")
    chosen = list(passages)
    if len(chosen) > config.max_passages:
        chosen = rng.sample(chosen, config.max_passages)
    shots = _shots(examples, by_id, config.shots, config.seed)
    generator = backbone.generator
    demonstrations = [
        (f"Passage ({p.title}): {generator.clip(p.text, config.shot_tokens)}", f"Question: {q}\nAnswer: {a}")
        for p, q, a in shots
    ]
    kept: list[QaExample] = []
    for start in range(0, len(chosen), batch_size):
        batch = chosen[start : start + batch_size]
        prompts = [generator.chat(GENERATION_INSTRUCTION, demonstrations, generator.passage_text(p)) for p in batch]
        with torch.inference_mode():
            outputs = backbone.generate(prompts, max_new_tokens=config.max_new_tokens)
        candidates = [(p, parse_generation(text, p, config.max_answer_words)) for p, text in zip(batch, outputs)]
        candidates = [(p, qa) for p, qa in candidates if qa is not None]
        if candidates:
            questions = [qa[0] for _, qa in candidates]
            with torch.inference_mode():
                embeddings = backbone.encode_questions(questions)  # [n, dim]
            found = [
                index.search(embeddings, questions, k=config.round_trip_k, mode=mode)
                for mode in ("dense", "bm25")
                if mode in index.modes
            ]  # [modes][n][k]
            for i, (passage, (question, answer)) in enumerate(candidates):
                if any(passage.id in {h.passage.id for h in rows[i]} for rows in found):
                    kept.append(
                        QaExample(question, (answer,), (passage.id,), SYNTHETIC_SPLIT, f"generated-{passage.id}")
                    )
        if tick:
            tick()
        if progress:
            progress(min(start + batch_size, len(chosen)), len(chosen))
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
    def identity(passages: Sequence[Passage], examples: Sequence[QaExample], fingerprint: str,
                 config: GenerationConfig) -> dict:
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
            artifacts.publish(self._store, self.prefix(domain), {GENERATED_FILE: path},
                              {"identity": identity, "count": len(examples)})
