"""DPR-style bi-encoder: question and passage towers, each a frozen transformer plus per-row LoRA adapters.

When both towers name the same weights, one frozen copy serves both and each role gets its own adapter
(`q_<key>` / `p_<key>`), so the process holds the encoder once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, DPRContextEncoder, DPRQuestionEncoder

from .config import BackboneConfig
from .loading import hub_kwargs, resolve_reference
from .lora import AdapterHost

BASE = "__base__"


@dataclass(frozen=True)
class Pooling:
    mode: str  # "cls", "mean" or "pooler" (DPR's projection of CLS)
    normalize: bool


def _sentence_transformers_pooling(path: Path) -> Pooling | None:
    modules = path / "modules.json"
    if not modules.is_file():
        return None
    entries = json.loads(modules.read_text())
    normalize = any(e.get("type", "").endswith("Normalize") for e in entries)
    mode = "mean"
    for entry in entries:
        if entry.get("type", "").endswith("Pooling"):
            pooling_cfg = json.loads((path / entry["path"] / "config.json").read_text())
            mode = "cls" if pooling_cfg.get("pooling_mode_cls_token") else "mean"
    return Pooling(mode, normalize)


def load_tower(
    reference: str, role: str, config: BackboneConfig, dtype: torch.dtype
) -> tuple[nn.Module, object, Pooling]:
    """Load one encoder tower: DPR classes for DPR checkpoints, AutoModel (BERT-like) otherwise."""
    source = resolve_reference(reference, config.allow_hub)
    kwargs = hub_kwargs(config.allow_hub)
    model_config = AutoConfig.from_pretrained(source, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if model_config.model_type == "dpr":
        cls = DPRQuestionEncoder if role == "question" else DPRContextEncoder
        model = cls.from_pretrained(source, dtype=dtype, **kwargs)
        pooling = Pooling("pooler", normalize=False)
    else:
        model = AutoModel.from_pretrained(source, dtype=dtype, add_pooling_layer=False, **kwargs)
        found = _sentence_transformers_pooling(Path(source)) if Path(source).is_dir() else None
        pooling = found or Pooling("cls", normalize=False)
    if config.pooling != "auto":
        pooling = Pooling(config.pooling, pooling.normalize)
    if config.normalize is not None:
        pooling = Pooling(pooling.mode, config.normalize)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer, pooling


class EncoderTower:
    """One frozen encoder model (possibly shared by both roles) with its LoRA adapters."""

    def __init__(self, model: nn.Module, tokenizer, pooling: Pooling, device: torch.device):
        self.host = AdapterHost(model)
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.device = device

    @property
    def dim(self) -> int:
        cfg = self.host.base.config
        return getattr(cfg, "projection_dim", 0) or cfg.hidden_size

    def encode(
        self, first: list[str], second: list[str] | None, adapters: list[str], max_tokens: int
    ) -> torch.Tensor:
        """Embed a batch, row i through adapter `adapters[i]` (BASE for none). Returns [batch, dim] float32.

        Gradients flow into the LoRA weights when called under grad mode (RAG End2End re-encodes retrieved
        passages this way); the frozen base never receives any.
        """
        batch = self.tokenizer(
            first,
            second,
            padding=True,
            truncation="only_second" if second is not None else True,
            max_length=max_tokens,
            return_tensors="pt",
        ).to(self.device)
        model_inputs = {
            k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")
        }
        out = self.host.forward(adapters, **model_inputs)
        if self.pooling.mode == "pooler":
            pooled = out.pooler_output  # [batch, dim]
        else:
            hidden = out.last_hidden_state  # [batch, seq, dim]
            if self.pooling.mode == "cls":
                pooled = hidden[:, 0]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [batch, seq, 1]
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        pooled = pooled.float()
        if self.pooling.normalize:
            pooled = nn.functional.normalize(pooled, dim=-1)
        return pooled
