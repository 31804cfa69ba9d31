"""Per-object configuration of the backbone: which weights to load and how LoRA attaches to them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# Attention Q/K/V projection names per architecture family, as the RAG End2End + LoRA work targets them.
QKV_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "key", "value"),
    "dpr": ("query", "key", "value"),
    "roberta": ("query", "key", "value"),
    "xlm-roberta": ("query", "key", "value"),
    "electra": ("query", "key", "value"),
    "mpnet": ("q", "k", "v"),
    "bart": ("q_proj", "k_proj", "v_proj"),
    "mbart": ("q_proj", "k_proj", "v_proj"),
    "t5": ("q", "k", "v"),
    "llama": ("q_proj", "k_proj", "v_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj"),
    "gemma": ("q_proj", "k_proj", "v_proj"),
}

COMPONENTS = ("question", "passage", "generator")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA on one component: rank, scaling and the modules it wraps (None: that architecture's Q/K/V)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class AdapterSetConfig:
    """The three LoRA adapters of one domain version: question encoder, passage encoder, generator."""

    question: LoraConfig = field(default_factory=LoraConfig)
    passage: LoraConfig = field(default_factory=LoraConfig)
    generator: LoraConfig = field(default_factory=LoraConfig)

    def for_component(self, component: str) -> LoraConfig:
        return getattr(self, component)


@dataclass(frozen=True)
class BackboneConfig:
    """Where the frozen backbone comes from and how it runs.

    Model references are HF model ids or local directories; `generator_gguf_file` names a GGUF file inside the
    generator directory, converted once to safetensors under `cache_dir`. `allow_hub=False` (the default)
    makes every load local-only, so no code path reaches a model hub.
    """

    question_encoder: str
    passage_encoder: str
    generator: str
    generator_gguf_file: str | None = None
    cache_dir: Path = Path.home() / ".cache" / "ragadapt"
    dtype: Literal["float32", "bfloat16", "auto"] = "auto"
    device: str = "auto"
    pooling: Literal["auto", "cls", "mean", "pooler"] = "auto"
    normalize: bool | None = None  # None: as the encoder's sentence-transformers config says
    # Dot products of unit vectors live in [-1, 1]; RAG's doc posterior needs a sharper softmax.
    score_scale: float | None = None  # None: 20 for normalised embeddings, 1 for raw (DPR) scores
    max_question_tokens: int = 64
    max_passage_tokens: int = 192
    max_answer_tokens: int = 48
    allow_hub: bool = False
