"""The frozen RAG End2End backbone: question and passage encoders and a generator, with named adapter sets."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from .config import COMPONENTS, AdapterSetConfig, BackboneConfig
from .decoding import PrefixCache, PrefixKey
from .encoders import EncoderTower, load_tower
from .errors import AdapterExists, UnknownAdapter
from .generator import TEMPLATE_VERSION, Generator, Passage, Prompt
from .lora import BASE, AdapterHost, peft_config
from .rag import fast_rag_sequence, rag_sequence_nll, rag_token_nll

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SupportingPassage:
    passage: Passage
    score: float  # retrieval score (dot product) of the passage for the question
    doc_logprob: float  # log p(doc | question) among the k passages


@dataclass(frozen=True)
class Answer:
    text: str
    logprob: float
    supporting: list[SupportingPassage]
    candidates: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class AdapterSetWeights:
    """An adapter set held in host memory (the warm tier): per component, PEFT config + tensors."""

    configs: dict[str, object]
    states: dict[str, dict[str, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.states.values() for t in s.values())


class Backbone:
    """Loaded once per process and never mutated: adapters attach beside the frozen weights.

    Adapter sets are addressed by a key (e.g. "news@20261121T..."); each set holds one adapter per component.
    Every call takes a per-row list of keys (None for the base backbone), so one forward serves many domains.
    """

    def __init__(
        self,
        config: BackboneConfig,
        question: EncoderTower,
        passage: EncoderTower,
        generator: Generator,
        fingerprint: str,
        load_seconds: float,
    ):
        self.config = config
        self.question = question
        self.passage = passage
        self.generator = generator
        self.fingerprint = fingerprint
        self.load_seconds = load_seconds
        self.shared_encoder = question.host is passage.host
        self._sets: dict[str, AdapterSetConfig | None] = {}

    # --- loading --------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, config: BackboneConfig) -> Backbone:
        from .loading import pick_device, pick_dtype

        started = time.perf_counter()
        device = pick_device(config.device)
        dtype = pick_dtype(config.dtype, device)
        q_model, q_tok, q_pool = load_tower(config.question_encoder, "question", config, dtype)
        question = EncoderTower(q_model.to(device), q_tok, q_pool, device)
        if config.passage_encoder == config.question_encoder:
            passage = question  # one frozen copy; roles differ only by adapter
        else:
            p_model, p_tok, p_pool = load_tower(config.passage_encoder, "passage", config, dtype)
            passage = EncoderTower(p_model.to(device), p_tok, p_pool, device)
        generator = Generator.load(config, dtype, device)
        fingerprint = _fingerprint(config, [question.host.base, passage.host.base, generator.host.base])
        elapsed = time.perf_counter() - started
        log.info("backbone loaded in %.1fs on %s (%s), fingerprint %s", elapsed, device, dtype, fingerprint)
        return cls(config, question, passage, generator, fingerprint, elapsed)

    @property
    def device(self) -> torch.device:
        return self.generator.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.generator.host.base.parameters()).dtype

    @property
    def embedding_dim(self) -> int:
        return self.passage.dim

    @property
    def score_scale(self) -> float:
        if self.config.score_scale is not None:
            return self.config.score_scale
        return 20.0 if self.passage.pooling.normalize else 1.0

    # --- adapter sets ---------------------------------------------------------------------------------------

    @property
    def adapter_sets(self) -> list[str]:
        return sorted(self._sets)

    def _hosts(self) -> dict[str, AdapterHost]:
        return {
            "question": self.question.host,
            "passage": self.passage.host,
            "generator": self.generator.host,
        }

    def _name(self, component: str, key: str) -> str:
        """The PEFT adapter name of one component of a set: module-safe and unique per role."""
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        return f"{component[0]}_{digest}"

    def _names(self, component: str, keys: list[str | None]) -> list[str]:
        unknown = sorted({k for k in keys if k is not None and k not in self._sets})
        if unknown:
            raise UnknownAdapter(f"adapter sets not loaded: {unknown}")
        return [BASE if k is None else self._name(component, k) for k in keys]

    def add_adapter_set(self, key: str, config: AdapterSetConfig | None = None) -> None:
        """Attach a fresh adapter set (LoRA A Gaussian/Kaiming, B zero: it starts as the base model)."""
        if key in self._sets:
            raise AdapterExists(f"adapter set {key!r} is already loaded")
        config = config or AdapterSetConfig()
        for component, host in self._hosts().items():
            host.add(
                self._name(component, key), peft_config(host.model_type, config.for_component(component))
            )
        self._sets[key] = config

    def reserve_adapter_slots(self, count: int, config: AdapterSetConfig | None = None) -> None:
        """Pre-inject `count` adapter slots of this shape in every component, so attaching a set of that shape
        later is a tensor copy rather than a module-tree rewrite (call at start-up, not per request)."""
        config = config or AdapterSetConfig()
        for component, host in self._hosts().items():
            # a shared encoder hosts both roles, so it needs slots for both
            host.reserve(count, peft_config(host.model_type, config.for_component(component)))

    def adapter_set_weights(self, key: str) -> AdapterSetWeights:
        self._names("question", [key])
        hosts = self._hosts()
        names = {c: self._name(c, key) for c in COMPONENTS}
        return AdapterSetWeights(
            configs={c: hosts[c].config(names[c]) for c in COMPONENTS},
            states={c: hosts[c].state(names[c]) for c in COMPONENTS},
        )

    def attach_adapter_set(self, key: str, weights: AdapterSetWeights) -> None:
        """Attach a set from host memory; a partial failure leaves nothing attached."""
        if key in self._sets:
            raise AdapterExists(f"adapter set {key!r} is already loaded")
        attached = []
        try:
            for component, host in self._hosts().items():
                name = self._name(component, key)
                host.load_state(name, weights.configs[component], weights.states[component])
                attached.append((host, name))
        except Exception:
            for host, name in attached:
                host.delete(name)
            raise
        self._sets[key] = None

    def remove_adapter_set(self, key: str) -> None:
        self._names("question", [key])
        for component, host in self._hosts().items():
            host.delete(self._name(component, key))
        del self._sets[key]

    def save_adapter_set(self, key: str, directory: Path) -> None:
        """Write question/, passage/ and generator/ PEFT adapters under `directory`."""
        self._names("question", [key])  # an unknown set fails here, before anything is written
        for component in COMPONENTS:
            target = Path(directory) / component
            target.mkdir(parents=True, exist_ok=True)
            self._hosts()[component].save(self._name(component, key), target)

    @staticmethod
    def read_adapter_set(directory: Path) -> AdapterSetWeights:
        configs, states = {}, {}
        for component in COMPONENTS:
            configs[component], states[component] = AdapterHost.read(Path(directory) / component)
        return AdapterSetWeights(configs, states)

    def load_adapter_set(self, key: str, directory: Path) -> None:
        self.attach_adapter_set(key, self.read_adapter_set(directory))

    def trainable_parameters(self, key: str) -> dict[str, list[torch.nn.Parameter]]:
        return {c: self._hosts()[c].parameters(self._name(c, key)) for c in COMPONENTS}

    # --- encoding -------------------------------------------------------------------------------------------

    def _keys(self, adapters: list[str | None] | str | None, n: int) -> list[str | None]:
        return list(adapters) if isinstance(adapters, list) else [adapters] * n

    def encode_questions(
        self, questions: list[str], adapters: list[str | None] | str | None = None
    ) -> torch.Tensor:
        """[n, dim] float32; no gradients unless called inside a training scope under grad mode."""
        keys = self._keys(adapters, len(questions))
        return self.question.encode(
            questions, None, self._names("question", keys), self.config.max_question_tokens
        )

    def encode_passages(
        self, passages: list[Passage], adapters: list[str | None] | str | None = None
    ) -> torch.Tensor:
        keys = self._keys(adapters, len(passages))
        return self.passage.encode(
            [p.title for p in passages],
            [p.text for p in passages],
            self._names("passage", keys),
            self.config.max_passage_tokens,
        )

    # --- RAG loss -------------------------------------------------------------------------------------------

    def rag_loss(
        self,
        questions: list[str | None],
        targets: list[str],
        passages: list[list[Passage]],
        key: str,
        *,
        kind: Literal["sequence", "token"] = "sequence",
        train: tuple[str, ...] = COMPONENTS,
        question_embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The RAG End2End marginal loss of n questions, k retrieved passages each, under adapter set `key`.

        The passages are re-encoded by the passage encoder here, so its LoRA receives gradients through the
        doc scores. A question None is a reconstruction example (control token instead of a question; the
        target is a domain sentence). `question_embeddings` [n, dim] stands in for the question encoder when
        given (reconstruction inputs have no question to encode). Call under a `training` scope.
        """
        n, k = len(questions), len(passages[0])
        flat = [p for row in passages for p in row]
        if question_embeddings is None:
            question_embeddings = self.encode_questions([q or "" for q in questions], key)  # [n, dim]
        passage_embeddings = self.encode_passages(flat, key).view(n, k, -1)  # [n, k, dim]
        if "passage" not in train:
            passage_embeddings = passage_embeddings.detach()
        scores = torch.einsum("nd,nkd->nk", question_embeddings, passage_embeddings) * self.score_scale
        doc_logprobs = torch.log_softmax(scores, dim=-1)  # [n, k]
        token_logprobs, mask = self.answer_logprobs(questions, targets, passages, key)  # [n, k, T] each
        if kind == "token":
            return rag_token_nll(doc_logprobs, token_logprobs, mask[:, 0])
        return rag_sequence_nll(doc_logprobs, token_logprobs)

    def answer_logprobs(
        self, questions: list[str | None], targets: list[str], passages: list[list[Passage]], key: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log p(target_i | question_i, passage_ij) under set `key`'s generator: ([n, k, T] log
        probabilities, zero where masked; [n, k, T] mask). Every row has the same number k of passages."""
        n, k = len(questions), len(passages[0])
        sources = [self.generator.source(questions[i], p) for i in range(n) for p in passages[i]]
        repeated = [targets[i] for i in range(n) for _ in range(k)]
        adapters = None if self._generator_training else [self._name("generator", key)] * len(sources)
        token_logprobs, mask = self.generator.target_logprobs(sources, repeated, adapters)
        return token_logprobs.view(n, k, -1), mask.view(n, k, -1)

    _generator_training = False

    def training(self, key: str, components: tuple[str, ...] = COMPONENTS, checkpointing: bool = False):
        """A scope in which the given components of set `key` get gradients. The encoders train through
        per-row adapter forwards; the generator trains as the active adapter (so checkpointing can apply)."""
        return _TrainingScope(self, key, components, checkpointing)

    # --- answering ------------------------------------------------------------------------------------------

    def answering(self, prefixes: PrefixCache | None = None, chunk_tokens: int = 0) -> Answering:
        """Questions answered together as they come and go (continuous batching), reusing the passage
        prefixes' KV states kept in `prefixes`, newcomers prefilled `chunk_tokens` at a time between
        decoding steps (0: at once); see `Answering`."""
        return Answering(self, prefixes, chunk_tokens)

    @torch.inference_mode()
    def answer(
        self,
        questions: list[str],
        passages: list[list[Passage]],
        scores: list[list[float]],
        adapters: list[str | None] | str | None = None,
        *,
        max_new_tokens: int = 32,
    ) -> list[Answer]:
        """Answer each question from its retrieved passages, rows possibly under different adapter sets,
        decoded together."""
        answering = self.answering()
        tickets = answering.add(
            questions,
            passages,
            scores,
            self._keys(adapters, len(questions)),
            [max_new_tokens] * len(questions),
        )
        done: dict[int, Answer] = {}
        while len(answering):
            done.update(answering.step())
        return [done[ticket] for ticket in tickets]

    @torch.inference_mode()
    def generate(
        self, prompts: list[str], adapters: list[str | None] | str | None = None, *, max_new_tokens: int = 32
    ) -> list[str]:
        """Greedy continuations of ready-made prompts (e.g. a generator writing training questions)."""
        return [g.text for g in self._decode([Prompt("", p) for p in prompts], adapters, max_new_tokens)]

    def _decode(self, sources: list[Prompt], adapters, max_new_tokens: int) -> list:
        decoding = self.generator.decoding()
        names = self._names("generator", self._keys(adapters, len(sources)))
        tickets = decoding.add(sources, names, [max_new_tokens] * len(sources))
        done = {}
        while len(done) < len(tickets):
            done.update(decoding.step())
        return [done[t] for t in tickets]

    @torch.inference_mode()
    def answer_closed_book(
        self,
        questions: list[str],
        adapters: list[str | None] | str | None = None,
        *,
        max_new_tokens: int = 32,
    ) -> list[Answer]:
        """Answer from the question alone, with no passage: what a fine-tuned generator has memorised (the
        closed-book baseline of Ovadia et al.)."""
        generations = self._decode(
            [self.generator.source(q, None) for q in questions], adapters, max_new_tokens
        )
        return [Answer(g.text, g.logprob, []) for g in generations]


class Answering:
    """RAG-sequence fast decoding of questions that join and finish at different times.

    Each question decodes one generator row per passage, under its own adapter set; when the last of its rows
    finishes, the passages' answers are pooled by p(doc | question) (`fast_rag_sequence`). A model server adds
    questions between steps as they arrive and hands back answers as they finish, so the batch stays full.
    """

    def __init__(self, backbone: Backbone, prefixes: PrefixCache | None = None, chunk_tokens: int = 0):
        self._backbone = backbone
        self._decoding = backbone.generator.decoding(prefixes, chunk_tokens)
        self._questions: dict[int, _Question] = {}
        self._row_owner: dict[int, tuple[int, int]] = {}  # decoding ticket -> (question ticket, passage)
        self._ready: list[int] = []  # questions whose rows are all done
        self._started: list[int] = []  # questions whose rows are all prefilled, since `started` was called
        self._prefill_seen = (0, 0)  # the decoding's prefill counts at the last `prefill_tokens` call
        self._next_ticket = 0

    def __len__(self) -> int:
        """Questions not yet returned by `step`."""
        return len(self._questions)

    @property
    def rows(self) -> int:
        """Generator rows the next step runs."""
        return self._decoding.rows

    def prefill_tokens(self) -> tuple[int, int] | None:
        """Prompt tokens prefilled since the last call, (padding, real); None where the decoding does not
        count them."""
        counted = getattr(self._decoding, "padding", None)
        if counted is None:
            return None
        new = (counted[0] - self._prefill_seen[0], counted[1] - self._prefill_seen[1])
        self._prefill_seen = tuple(counted)
        return new

    def started(self) -> list[int]:
        """Questions whose rows have all been prefilled (their first tokens are out) since the last call."""
        started, self._started = self._started, []
        return started

    def _note_prefilled(self) -> None:
        for row in self._decoding.prefilled():
            ticket, _ = self._row_owner[row]
            question = self._questions[ticket]
            question.prefilled += 1
            if question.prefilled == len(question.passages):
                self._started.append(ticket)

    def add(
        self,
        questions: list[str],
        passages: list[list[Passage]],
        scores: list[list[float]],
        adapters: list[str | None],
        max_new_tokens: list[int],
        collections: list[str | None] | None = None,
    ) -> list[int]:
        """Start answering these questions; returns their tickets. Their rows are prefilled now, or chunk by
        chunk in the next steps while other questions decode (`chunk_tokens`). If a prefill in `add` fails,
        nothing was added and the questions in flight go on; a chunk that fails raises from `step`.

        `collections[i]` names the version of the passage collection question i's passages come from (e.g.
        "<domain>/<index version>"), under which a passage id always means the same text; only then are its
        passages' prefixes cached (None, or no `collections`: prefilled whole)."""
        backbone = self._backbone
        generator = backbone.generator
        tickets = list(range(self._next_ticket, self._next_ticket + len(questions)))
        sources, names, budgets, owners = [], [], [], []
        for ticket, question, row, name, budget, collection in zip(
            tickets,
            questions,
            passages,
            backbone._names("generator", adapters),
            max_new_tokens,
            collections or [None] * len(questions),
        ):
            for p in row:
                prompt = generator.source(question, p)
                if collection is not None and prompt.prefix:
                    key = PrefixKey(backbone.fingerprint, collection, p.id, TEMPLATE_VERSION)
                    prompt = replace(prompt, key=key)
                sources.append(prompt)
            names += [name] * len(row)
            budgets += [budget] * len(row)
            owners += [(ticket, i) for i in range(len(row))]
        row_tickets = self._decoding.add(sources, names, budgets)
        self._next_ticket += len(questions)
        for ticket, row, row_scores in zip(tickets, passages, scores):
            self._questions[ticket] = _Question(row, row_scores, [None] * len(row))
            if not row:
                self._ready.append(ticket)
        self._row_owner.update(zip(row_tickets, owners))
        self._note_prefilled()
        return tickets

    def step(self) -> list[tuple[int, Answer]]:
        """One decoding step; returns the questions answered since the last call."""
        finished = self._decoding.step()
        self._note_prefilled()
        self._collect(finished)
        ready, self._ready = self._ready, []
        return [(ticket, self._questions.pop(ticket).answer(self._backbone.score_scale)) for ticket in ready]

    def drop(self, tickets: set[int]) -> None:
        """Stop answering these questions (abandoned by their askers)."""
        rows = {row for row, (owner, _) in self._row_owner.items() if owner in tickets}
        self._decoding.drop(rows)
        for row in rows:
            del self._row_owner[row]
        for ticket in tickets:
            self._questions.pop(ticket, None)
        self._ready = [t for t in self._ready if t not in tickets]
        self._started = [t for t in self._started if t not in tickets]

    def _collect(self, finished) -> None:
        for row_ticket, generation in finished:
            ticket, index = self._row_owner.pop(row_ticket)
            question = self._questions[ticket]
            question.generations[index] = generation
            if all(g is not None for g in question.generations):
                self._ready.append(ticket)


@dataclass
class _Question:
    passages: list[Passage]
    scores: list[float]
    generations: list  # per passage: its Generation once its row is done
    prefilled: int = 0  # rows whose first token is out

    def answer(self, score_scale: float) -> Answer:
        if not self.passages:
            return Answer("", float("-inf"), [])
        doc_logprobs = torch.log_softmax(torch.tensor(self.scores) * score_scale, dim=0).tolist()
        candidates = fast_rag_sequence(
            [g.text for g in self.generations], [g.logprob for g in self.generations], doc_logprobs
        )
        best = candidates[0]
        supporting = [
            SupportingPassage(self.passages[i], self.scores[i], doc_logprobs[i]) for i in best.supporting
        ]
        return Answer(best.text, best.logprob, supporting, [(c.text, c.logprob) for c in candidates])


class _TrainingScope:
    def __init__(self, backbone: Backbone, key: str, components: tuple[str, ...], checkpointing: bool):
        self.backbone, self.key, self.components, self.checkpointing = (
            backbone,
            key,
            components,
            checkpointing,
        )
        self._scopes = []

    def __enter__(self) -> list[torch.nn.Parameter]:
        bb = self.backbone
        bb._names("question", [self.key])
        params = []
        encoder_names = {}
        for component in ("question", "passage"):
            if component in self.components:
                host = bb._hosts()[component]
                encoder_names.setdefault(id(host), (host, []))[1].append(bb._name(component, self.key))
        for host, names in encoder_names.values():
            scope = host.mixed_training(names)
            params += scope.__enter__()
            self._scopes.append(scope)
        if "generator" in self.components:
            scope = bb.generator.host.single_training(bb._name("generator", self.key), self.checkpointing)
            params += scope.__enter__()
            self._scopes.append(scope)
            bb._generator_training = True
        return params

    def __exit__(self, *exc) -> None:
        self.backbone._generator_training = False
        for scope in reversed(self._scopes):
            scope.__exit__(*exc)


def _fingerprint(config: BackboneConfig, models: list[torch.nn.Module]) -> str:
    """Identifies the frozen weights adapters were trained on: model configs plus a sample of each tensor."""
    digest = hashlib.sha256()
    for model in models:
        # Paths, dtypes and library versions vary between hosts loading the same weights; leave them out.
        settings = {
            k: v
            for k, v in model.config.to_dict().items()
            if not k.startswith("_") and k not in {"dtype", "torch_dtype", "transformers_version"}
        }
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
        for name, tensor in sorted(model.state_dict().items())[:64]:
            digest.update(name.encode())
            sample = tensor.detach().flatten()[:256].to(torch.bfloat16).float()
            digest.update(sample.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
