"""The generator: a decoder-only LLM or a seq2seq model, with prompts, answer log-likelihoods and decoding."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GenerationConfig,
)

from .config import BackboneConfig
from .decoding import (
    Decoding,
    PrefixCache,
    PrefixKey,
    WholeBatchDecoding,
    last_positions,
    supports_continuous,
)
from .loading import converted_gguf_dir, hub_kwargs, resolve_reference
from .lora import AdapterHost
from .weight_only import pack_linears

SYSTEM_PROMPT = (
    "Answer the question from the passage. "
    "Reply with the shortest exact phrase from the passage, nothing else."
)
RECONSTRUCT_PROMPT = "Reconstruct a sentence stated in the passage."
CLOSED_BOOK_PROMPT = "Answer the question. Reply with the shortest exact phrase, nothing else."
# The control token of RAG End2End's input reconstruction: it replaces the question.
RECONSTRUCT_TOKEN = "<reconstruct>"
# The version of the prompt layout and of how it becomes token ids. A cached prefix is only valid under the
# version it was computed with, and an adapter is trained on the ids of one version. Version 2 tokenizes the
# (instruction + passage) prefix and the (question + rest of the template) suffix apart, so that a passage's
# prefix has the same ids in every prompt and its KV states can be reused.
TEMPLATE_VERSION = 2


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    """A generator input: a prefix that many prompts share (instruction + passage) and the suffix of this one
    (question + the rest of the template), tokenized apart and concatenated. `key` names the prefix's KV
    states for a `PrefixCache` (None: not cached, e.g. a prompt without a passage, whose prefix is empty)."""

    prefix: str
    suffix: str
    key: PrefixKey | None = None

    @property
    def text(self) -> str:
        return self.prefix + self.suffix


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str


@dataclass(frozen=True)
class Generation:
    text: str
    logprob: (
        float  # log p(text, end | source): over the new tokens, the end token included if it stopped there
    )


class Generator:
    def __init__(
        self,
        model,
        tokenizer,
        kind: Literal["causal", "seq2seq"],
        device: torch.device,
        config: BackboneConfig,
    ):
        self.host = AdapterHost(model)
        self.tokenizer = tokenizer
        self.kind = kind
        self.device = device
        self.config = config
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.eos_ids = self._eos_ids()

    @classmethod
    def load(cls, config: BackboneConfig, dtype: torch.dtype, device: torch.device) -> Generator:
        if config.generator_gguf_file:
            source, kwargs = str(converted_gguf_dir(config)), {"local_files_only": True}
        else:
            source, kwargs = (
                resolve_reference(config.generator, config.allow_hub),
                hub_kwargs(config.allow_hub),
            )
        model_config = AutoConfig.from_pretrained(source, **kwargs)
        kind = "seq2seq" if model_config.is_encoder_decoder else "causal"
        auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
        model = auto.from_pretrained(source, dtype=dtype, **kwargs).to(device)
        model.eval()
        model.requires_grad_(False)
        if config.weight_only != "none":
            packed = pack_linears(model, 8 if config.weight_only == "int8" else 4)
            log.info("generator: %d linear layers with weight-only %s copies", packed, config.weight_only)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        return cls(model, tokenizer, kind, device, config)

    def _eos_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        end_of_turn = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(end_of_turn, int) and end_of_turn != self.tokenizer.unk_token_id:
            ids.add(end_of_turn)
        return sorted(i for i in ids if i is not None)

    # --- prompts --------------------------------------------------------------------------------------------

    def clip(self, text: str, max_tokens: int) -> str:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        return text if len(ids) <= max_tokens else self.tokenizer.decode(ids[:max_tokens])

    def source(self, question: str | None, passage: Passage | None) -> Prompt:
        """The generator input for one (question, passage) pair; question None is a reconstruction input,
        passage None a closed-book question (the generator's own knowledge).

        A decoder-only prompt is cut after the passage: everything before the cut is the same for every
        question that retrieved the passage. Seq2seq inputs are not cut (an encoder reads them whole)."""
        query = (
            RECONSTRUCT_TOKEN if question is None else self.clip(question, self.config.max_question_tokens)
        )
        if passage is None:
            if self.kind == "seq2seq":
                return Prompt("", query)
            instruction, shared, user = CLOSED_BOOK_PROMPT, "", f"Question: {query}"
        else:
            if self.kind == "seq2seq":
                # RAG's layout: title / text // question
                clipped = self.clip(passage.text, self.config.max_passage_tokens)
                return Prompt("", f"{passage.title} / {clipped} // {query}")
            instruction = RECONSTRUCT_PROMPT if question is None else SYSTEM_PROMPT
            shared = self.passage_text(passage)
            user = f"{shared}\n\nQuestion: {query}"
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "system", "content": instruction}, {"role": "user", "content": user}],
                tokenize=False,
                add_generation_prompt=True,
            )
        else:
            text = f"{instruction}\n\n{user}\nAnswer:"
        # The template renders the user message verbatim; a template that rewrites it gets no cut.
        start = text.rfind(user)
        cut = start + len(shared) if shared and start >= 0 else 0
        return Prompt(text[:cut], text[cut:])

    def passage_text(self, passage: Passage) -> str:
        return f"Passage ({passage.title}): {self.clip(passage.text, self.config.max_passage_tokens)}"

    def chat(self, instruction: str, turns: list[tuple[str, str]], user: str) -> str:
        """A prompt of an instruction, demonstration turns (user, assistant) and the user's message."""
        if self.kind == "causal" and self.tokenizer.chat_template:
            messages = [{"role": "system", "content": instruction}]
            for shown, reply in turns:
                messages += [{"role": "user", "content": shown}, {"role": "assistant", "content": reply}]
            messages.append({"role": "user", "content": user})
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        shown = "".join(f"{u}\n{a}\n\n" for u, a in turns)
        return f"{instruction}\n\n{shown}{user}\n"

    def prompt_ids(self, prompts: list[Prompt]) -> tuple[list[list[int]], list[list[int]]]:
        """(prefix ids, suffix ids) per prompt: the two parts tokenized apart, so that a prefix has the same
        ids in every prompt (training and serving alike; a joint tokenization could merge tokens across the
        cut)."""
        return self._ids([p.prefix for p in prompts]), self._ids([p.suffix for p in prompts])

    def _ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text; an empty text (no prefix) has none."""
        filled = [t for t in texts if t]
        ids = iter(self.tokenizer(filled, add_special_tokens=False).input_ids if filled else [])
        return [next(ids) if t else [] for t in texts]

    # --- likelihood -----------------------------------------------------------------------------------------

    def target_logprobs(self, sources: list[Prompt], targets: list[str], adapters: list[str] | None):
        """Per-token log p(target | source) -> (logprobs [batch, T], mask [batch, T]).

        Rows sharing a target are token-aligned, as RAG-token marginalisation needs. `adapters` None runs the
        active adapter (a single-adapter training scope).
        """
        if self.kind == "seq2seq":
            return self._seq2seq_logprobs(sources, targets, adapters)
        return self._causal_logprobs(sources, targets, adapters)

    def _target_ids(self, targets: list[str]) -> list[list[int]]:
        max_len = self.config.max_answer_tokens
        return [
            [*self.tokenizer(t, add_special_tokens=False).input_ids[: max_len - 1], self.eos_ids[-1]]
            for t in targets
        ]

    def _causal_logprobs(self, sources, targets, adapters):
        prefixes, suffixes = self.prompt_ids(sources)
        prompts = [p + s for p, s in zip(prefixes, suffixes)]
        answers = self._target_ids(targets)
        rows = [p + a for p, a in zip(prompts, answers)]
        width = max(map(len, rows))
        span = max(map(len, answers))
        pad = self.tokenizer.pad_token_id
        # Left padding puts every answer at the end, so only the last `span` positions need vocabulary logits.
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        out = self.host.forward(
            adapters,
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            logits_to_keep=last_positions(width, span + 1, self.device),
        )
        logits = out.logits[:, :-1].float()  # [batch, span, vocab]
        wanted = input_ids[:, -span:]  # [batch, span]
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, wanted.unsqueeze(-1)).squeeze(-1)
        lengths = torch.tensor([len(a) for a in answers], device=self.device)
        mask = torch.arange(span, device=self.device).unsqueeze(0) >= (span - lengths).unsqueeze(1)
        return logprobs * mask, mask

    def _seq2seq_logprobs(self, sources, targets, adapters):
        enc = self.tokenizer(
            [s.text for s in sources], padding=True, truncation=True, max_length=512, return_tensors="pt"
        ).to(self.device)
        answers = self._target_ids(targets)
        span = max(map(len, answers))
        labels = torch.tensor([a + [-100] * (span - len(a)) for a in answers], device=self.device)
        out = self.host.forward(
            adapters, input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels
        )
        mask = labels != -100
        logprobs = (
            torch.log_softmax(out.logits.float(), dim=-1)
            .gather(-1, labels.clamp(min=0).unsqueeze(-1))
            .squeeze(-1)
        )
        return logprobs * mask, mask

    # --- decoding -------------------------------------------------------------------------------------------

    def decoding(
        self, prefixes: PrefixCache | None = None, chunk_tokens: int = 0
    ) -> Decoding | WholeBatchDecoding:
        """A greedy decoding that rows can join and leave between steps (continuous batching) where the
        model's cache allows it, reusing the KV states of cached prompt prefixes and prefilling newcomers
        in chunks of `chunk_tokens` between steps (0: at once); otherwise one that decodes each added group
        to the end at once (and caches nothing)."""
        if self.kind == "causal" and supports_continuous(self.host.base.config):
            return Decoding(self, prefixes, chunk_tokens)
        return WholeBatchDecoding(self)

    def finish(self, tokens: list[int], logprob: float) -> Generation:
        """A finished row: its new tokens (without the end token) and log p(tokens, end | source)."""
        return Generation(
            text=self.tokenizer.decode(tokens, skip_special_tokens=True).strip(), logprob=logprob
        )

    def generate_whole(
        self, sources: list[Prompt], adapters: list[str], max_new_tokens: int
    ) -> list[Generation]:
        """Greedy answers through transformers' `generate` (seq2seq models, caches rows cannot share)."""
        if self.kind == "causal":
            prefixes, suffixes = self.prompt_ids(sources)
            enc = self.tokenizer.pad(
                {"input_ids": [p + s for p, s in zip(prefixes, suffixes)]},
                padding_side="left",
                return_tensors="pt",
            ).to(self.device)
        else:
            self.tokenizer.padding_side = "right"
            enc = self.tokenizer(
                [s.text for s in sources], padding=True, add_special_tokens=True, return_tensors="pt"
            ).to(self.device)
        generation_config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            decoder_start_token_id=getattr(self.host.base.config, "decoder_start_token_id", None),
            return_dict_in_generate=True,
            output_scores=True,
        )
        slots = self.host.slots_of(adapters)
        extra = {"adapter_names": slots} if self.host.peft is not None else {}
        out = self.host.model.generate(
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask,
            generation_config=generation_config,
            **extra,
        )
        scores = self.host.base.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
        new_tokens = (
            out.sequences[:, enc.input_ids.shape[1] :] if self.kind == "causal" else out.sequences[:, 1:]
        )
        new_tokens = new_tokens[:, -scores.shape[1] :]  # [batch, steps]
        eos = set(self.eos_ids)
        results = []
        for row_tokens, row_scores in zip(new_tokens.tolist(), scores.tolist()):
            tokens, logprob = [], 0.0
            for token, score in zip(row_tokens, row_scores):
                logprob += score
                if token in eos:
                    break  # what follows is padding
                tokens.append(token)
            results.append(self.finish(tokens, logprob))
        return results
