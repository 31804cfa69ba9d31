"""Per-object configuration of the backbone: which weights to load, how LoRA attaches to them. Torch-free."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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


def integral_floats(cls: type[BaseModel], data: Any) -> Any:
    """A JSON number with a zero fraction is an integer (JSON Schema says so, and clients send 5.0): turn
    those of int fields into ints before strict validation, which takes only ints there."""
    if not isinstance(data, dict):
        return data
    fields = cls.model_fields
    return {
        name: int(value)
        if isinstance(value, float) and value.is_integer() and name in fields and _takes_int(fields[name])
        else value
        for name, value in data.items()
    }


def _takes_int(field: Any) -> bool:
    kinds = typing.get_args(field.annotation) or (field.annotation,)
    return int in kinds and float not in kinds


class LoraConfig(BaseModel):
    """LoRA on one component: rank, scaling, dropout and the modules it wraps (None: that architecture's
    attention Q/K/V projections, `QKV_TARGETS`). PEFT's own config is derived from it (`backbone.lora`)."""

    # Read from JSON (a run request, an adapter version's manifest): unknown fields and values of another JSON
    # type ("8" for 8) are errors; a number with a zero fraction is an integer.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    _integral = model_validator(mode="before")(integral_floats)

    r: int = Field(8, ge=1, le=256)
    alpha: int = Field(16, ge=1, le=4096)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    targets: list[str] | None = Field(None, strict=False)  # a tuple from Python code is taken too


class AdapterSetConfig(BaseModel):
    """The LoRA configuration of one adapter set: its question encoder, passage encoder and generator. The
    one shape of it: a run request's `hyperparameters.lora`, what `Backbone.add_adapter_set` attaches, and
    what every adapter version records whole in its manifest (read back by `adapters.registry.lora_config`).
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    question: LoraConfig = LoraConfig()
    passage: LoraConfig = LoraConfig()
    generator: LoraConfig = LoraConfig()

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
    # Weight-only int8/int4 copies of the generator's linear layers for decoding steps of a few rows
    # (bfloat16 on a CPU; `weight_only.py`); "none" keeps one bfloat16 (or float32) weight per layer.
    weight_only: Literal["none", "int8", "int4"] = "none"
