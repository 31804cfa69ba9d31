"""One frozen model with many named LoRA adapters, run with a per-row adapter choice (PEFT mixed batches)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

from .config import QKV_TARGETS, LoraConfig
from .errors import AdapterExists, AdapterLoadError, UnknownAdapter

BASE = "__base__"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


def qkv_targets(model_type: str, lora: LoraConfig) -> list[str]:
    if lora.targets:
        return list(lora.targets)
    try:
        return list(QKV_TARGETS[model_type])
    except KeyError:
        raise AdapterLoadError(
            f"no default Q/K/V projection names for model type {model_type!r}; set LoRA targets explicitly"
        ) from None


def peft_config(model_type: str, lora: LoraConfig) -> PeftLoraConfig:
    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=qkv_targets(model_type, lora),
        bias="none",
    )


class AdapterHost:
    """Owns a frozen base model and the adapters attached to it.

    The PeftModel wrapper is made lazily with the first adapter, so a backbone without adapters runs the plain
    model. Every forward names an adapter per row (BASE for none); the base weights never change.
    """

    def __init__(self, model: nn.Module):
        self.base = model
        self.peft: PeftModel | None = None
        self.model_type = model.config.model_type

    @property
    def names(self) -> set[str]:
        return set(self.peft.peft_config) if self.peft is not None else set()

    @property
    def model(self) -> nn.Module:
        return self.peft if self.peft is not None else self.base

    def add(self, name: str, config: PeftLoraConfig) -> None:
        if name in self.names:
            raise AdapterExists(f"adapter {name!r} is already attached")
        if self.peft is None:
            self.peft = PeftModel(self.base, config, adapter_name=name)
        else:
            self.peft.add_adapter(name, config)
        # New LoRA dropout modules start in training mode; serving must be deterministic.
        self.peft.eval()
        # PEFT marks new adapters trainable; serving adapters stay frozen until a training scope asks.
        for param in self.parameters(name):
            param.requires_grad_(False)

    def load_state(self, name: str, config: PeftLoraConfig, state: dict[str, torch.Tensor]) -> None:
        """Attach an adapter from tensors already in host memory (the warm tier)."""
        self.add(name, config)
        result = set_peft_model_state_dict(self.peft, state, adapter_name=name)
        missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
        if result.unexpected_keys or missing:
            self.delete(name)
            raise AdapterLoadError(
                f"adapter {name!r} does not fit this model: {len(missing)} missing and "
                f"{len(result.unexpected_keys)} unexpected tensors"
            )

    def state(self, name: str) -> dict[str, torch.Tensor]:
        self._require(name)
        return {k: v.detach().to("cpu").clone() for k, v in get_peft_model_state_dict(self.peft, adapter_name=name).items()}

    def config(self, name: str) -> PeftLoraConfig:
        self._require(name)
        return self.peft.peft_config[name]

    def save(self, name: str, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.state(name), str(directory / WEIGHTS_FILE))
        self.config(name).save_pretrained(str(directory))

    @staticmethod
    def read(directory: Path) -> tuple[PeftLoraConfig, dict[str, torch.Tensor]]:
        """Read a saved adapter into host memory without attaching it."""
        try:
            config = PeftLoraConfig.from_pretrained(str(directory))
            state = load_file(str(directory / WEIGHTS_FILE))
        except (OSError, ValueError) as exc:
            raise AdapterLoadError(f"cannot read adapter from {directory}: {exc}") from exc
        return config, state

    def delete(self, name: str) -> None:
        self._require(name)
        if len(self.names) == 1:
            # PEFT cannot delete its last adapter; unwrapping restores the untouched base layers.
            self.base = self.peft.unload()
            self.peft = None
        else:
            self.peft.delete_adapter(name)

    def parameters(self, name: str) -> list[nn.Parameter]:
        if self.peft is None:
            return []
        return [p for n, p in self.peft.named_parameters() if "lora_" in n and f".{name}." in f"{n}."]

    def forward(self, adapters: list[str] | None, **inputs):
        """Run the model; `adapters[i]` picks row i's adapter. None: the active adapter (training scope)."""
        if self.peft is None:
            unknown = {a for a in adapters or [] if a != BASE}
            if unknown:
                raise UnknownAdapter(f"adapters not loaded: {sorted(unknown)}")
            return self.base(**inputs)
        if adapters is None:
            return self.peft(**inputs)
        self._require(*(a for a in set(adapters) if a != BASE))
        return self.peft(**inputs, adapter_names=list(adapters))

    @contextmanager
    def mixed_training(self, names: list[str]) -> Iterator[list[nn.Parameter]]:
        """Train adapters through mixed-batch forwards: the base stays in eval mode (PEFT's rule for per-row
        adapters); only the adapters' own dropout runs in training mode and only their weights get gradients."""
        self._require(*names)
        params = [p for name in names for p in self.parameters(name)]
        dropouts = [
            module.lora_dropout[name]
            for module in self.peft.modules()
            if isinstance(module, LoraLayer)
            for name in names
            if name in module.lora_dropout
        ]
        for p in params:
            p.requires_grad_(True)
        for d in dropouts:
            d.train()
        try:
            yield params
        finally:
            for d in dropouts:
                d.eval()
            for p in params:
                p.requires_grad_(False)

    @contextmanager
    def single_training(self, name: str, checkpointing: bool = False) -> Iterator[list[nn.Parameter]]:
        """Train one adapter as the active one, with the whole model in training mode so activation
        checkpointing can apply. Only for a process that trains (a run worker), never while serving."""
        self._require(name)
        self.peft.set_adapter(name)
        params = self.parameters(name)
        for p in params:
            p.requires_grad_(True)
        self.peft.train()
        if checkpointing:
            self.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        try:
            yield params
        finally:
            if checkpointing:
                self.base.gradient_checkpointing_disable()
            self.peft.eval()
            for p in params:
                p.requires_grad_(False)

    def _require(self, *names: str) -> None:
        missing = [n for n in names if n not in self.names]
        if missing:
            raise UnknownAdapter(f"adapters not loaded: {sorted(missing)}")
