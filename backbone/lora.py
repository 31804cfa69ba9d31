"""One frozen model with many named LoRA adapters, run with a per-row adapter choice (PEFT mixed batches)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel
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


def _signature(config: PeftLoraConfig) -> tuple:
    """What must match for an injected slot to take another adapter's tensors by plain copy."""
    return (
        config.r,
        tuple(sorted(config.target_modules)),
        bool(config.use_rslora),
        tuple(sorted((config.rank_pattern or {}).items())),
        tuple(sorted((config.alpha_pattern or {}).items())),
    )


class AdapterHost:
    """Owns a frozen base model and the adapters attached to it.

    The PeftModel wrapper is made lazily with the first adapter, so a backbone without adapters runs the plain
    model. Every forward names an adapter per row (BASE for none); the base weights never change.

    Adapters live in slots (physical PEFT adapters). Injecting a slot walks the whole module tree (about a
    second for the embedded default), so a removed adapter's slot is kept free and the next adapter of the
    same shape is attached by copying its tensors in (milliseconds), as S-LoRA and vLLM reuse LoRA slots.
    """

    def __init__(self, model: nn.Module):
        self.base = model
        self.peft: PeftModel | None = None
        self.model_type = model.config.model_type
        self._slots: dict[str, str] = {}  # adapter name -> slot
        # adapter name -> the identity of the weights attached under it, new with every attach and training
        self._identities: dict[str, str] = {}
        self._serials = itertools.count(1)
        self._free: list[str] = []
        self._tensors: dict[str, dict[str, nn.Parameter]] = {}  # slot -> {state-dict key: parameter}
        self._injected = 0
        self._rows = _RowAdapters()
        self._training = 0  # open training scopes: adapter weights may change at any step

    @property
    def names(self) -> set[str]:
        return set(self._slots)

    @property
    def model(self) -> nn.Module:
        return self.peft if self.peft is not None else self.base

    def _inject(self, config: PeftLoraConfig) -> str:
        slot = f"s{self._injected}"
        self._injected += 1
        if self.peft is None:
            self.peft = PeftModel(self.base, config, adapter_name=slot)
        else:
            self.peft.add_adapter(slot, config)
        # New LoRA dropout modules start in training mode; serving must be deterministic.
        self.peft.eval()
        marker = f".{slot}."
        self._tensors[slot] = {
            name.replace(marker, "."): param for name, param in self.peft.named_parameters() if marker in name
        }
        # PEFT marks new adapters trainable; adapters stay frozen until a training scope asks.
        for param in self._tensors[slot].values():
            param.requires_grad_(False)
        self._rows.hook(self.peft)
        return slot

    def reserve(self, count: int, config: PeftLoraConfig) -> None:
        """Inject `count` free slots of this shape ahead of time, so later attaches are copies."""
        for _ in range(count):
            self._free.append(self._inject(config))

    def add(self, name: str, config: PeftLoraConfig) -> None:
        """Attach a freshly initialised adapter (LoRA B zero: it starts as the base model)."""
        if name in self._slots:
            raise AdapterExists(f"adapter {name!r} is already attached")
        self._slots[name] = self._inject(config)
        self._renew(name)

    def load_state(self, name: str, config: PeftLoraConfig, state: dict[str, torch.Tensor]) -> None:
        """Attach an adapter from tensors already in host memory (the warm tier)."""
        if name in self._slots:
            raise AdapterExists(f"adapter {name!r} is already attached")
        wanted = _signature(config)
        slot = next((s for s in self._free if _signature(self.peft.peft_config[s]) == wanted), None)
        if slot is None:
            slot = self._inject(config)
        else:
            self._free.remove(slot)
        tensors = self._tensors[slot]
        missing, unexpected = tensors.keys() - state.keys(), state.keys() - tensors.keys()
        mismatched = [k for k in tensors.keys() & state.keys() if tensors[k].shape != state[k].shape]
        if missing or unexpected or mismatched:
            self._free.append(slot)
            raise AdapterLoadError(
                f"adapter {name!r} does not fit this model: {len(missing)} missing, "
                f"{len(unexpected)} unexpected and {len(mismatched)} mis-shaped tensors"
            )
        with torch.no_grad():
            for key, param in tensors.items():
                param.copy_(state[key])
        self.peft.peft_config[slot] = config
        scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
        for module in self.peft.modules():
            if isinstance(module, LoraLayer) and slot in module.scaling:
                module.scaling[slot] = scaling
        self._slots[name] = slot
        self._renew(name)

    def state(self, name: str) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu").clone() for k, v in self._tensors[self._slot(name)].items()}

    def config(self, name: str) -> PeftLoraConfig:
        return self.peft.peft_config[self._slot(name)]

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
        """Detach an adapter; its slot stays injected, free for the next adapter of the same shape."""
        slot = self._slot(name)
        del self._slots[name]
        del self._identities[name]
        self._free.append(slot)

    def identity(self, name: str) -> str:
        """The identity of the weights attached under `name` now (BASE for the base model): a new one with
        every attach and every training scope, so anything computed under an adapter (a cached prefix's KV
        states) is keyed by the very weights, never by a name that a later attach may reuse."""
        if name == BASE:
            return BASE
        self._require(name)
        return self._identities[name]

    def identities(self) -> set[str]:
        """The identities of the weights attached now, the base model's included."""
        return {BASE, *self._identities.values()}

    def _renew(self, name: str) -> None:
        self._identities[name] = f"{name}#{next(self._serials)}"
        self._rows.changed()

    def parameters(self, name: str) -> list[nn.Parameter]:
        slot = self._slots.get(name)
        return list(self._tensors[slot].values()) if slot is not None else []

    def _slot(self, name: str) -> str:
        self._require(name)
        return self._slots[name]

    def forward(self, adapters: list[str] | None, **inputs):
        """Run the model; `adapters[i]` picks row i's adapter. None: the active adapter (training scope)."""
        if adapters is None:
            return self.model(**inputs)
        slots = self.slots_of(adapters)
        if self.peft is None:
            return self.base(**inputs)
        if torch.is_grad_enabled() or self._training:
            # Training, or evaluating between steps: PEFT's own path, gradients and all, on live weights.
            return self.peft(**inputs, adapter_names=slots)
        with self._rows.planned(slots, self.peft.peft_config):
            # PEFT runs the base layers only; the hooks add every row's LoRA delta.
            return self.peft(**inputs, adapter_names=[BASE] * len(slots))

    def slots_of(self, adapters: list[str]) -> list[str]:
        """Per-row PEFT adapter names for per-row adapter names; raises for any that is not attached."""
        self._require(*(a for a in set(adapters) if a != BASE))
        return [BASE if a == BASE else self._slots[a] for a in adapters]

    @contextmanager
    def mixed_training(self, names: list[str]) -> Iterator[list[nn.Parameter]]:
        """Train adapters through mixed-batch forwards: the base stays in eval mode (PEFT's rule for per-row
        adapters); only the adapters' own dropout runs in training mode and only their weights get
        gradients."""
        self._require(*names)
        params = [p for name in names for p in self.parameters(name)]
        slots = self.slots_of(names)
        dropouts = [
            module.lora_dropout[slot]
            for module in self.peft.modules()
            if isinstance(module, LoraLayer)
            for slot in slots
            if slot in module.lora_dropout
        ]
        for p in params:
            p.requires_grad_(True)
        for d in dropouts:
            d.train()
        self._training += 1
        try:
            yield params
        finally:
            self._training -= 1
            for d in dropouts:
                d.eval()
            for p in params:
                p.requires_grad_(False)
            for name in names:
                self._renew(name)

    @contextmanager
    def single_training(self, name: str, checkpointing: bool = False) -> Iterator[list[nn.Parameter]]:
        """Train one adapter as the active one, with the whole model in training mode so activation
        checkpointing can apply. Only for a process that trains (a run worker), never while serving."""
        self.peft.set_adapter(self._slot(name))
        params = self.parameters(name)
        for p in params:
            p.requires_grad_(True)
        self.peft.train()
        if checkpointing:
            self.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._training += 1
        try:
            yield params
        finally:
            self._training -= 1
            if checkpointing:
                self.base.gradient_checkpointing_disable()
            self.peft.eval()
            for p in params:
                p.requires_grad_(False)
            self._renew(name)

    def _require(self, *names: str) -> None:
        missing = [n for n in names if n not in self.names]
        if missing:
            raise UnknownAdapter(f"adapters not loaded: {sorted(missing)}")


class _RowAdapters:
    """Per-row LoRA deltas of a mixed batch at inference, a few wide matmuls per layer.

    PEFT's mixed batches gather each adapter's rows, run its two small matmuls and scatter the result back:
    about seven small ops per adapter per layer, plus float32 casts when the base is bfloat16 (PEFT keeps
    adapter weights in float32). A decoding step is hundreds of such layers, so on a CPU these per-op costs,
    not arithmetic, are what mixing adapters adds. Instead each layer holds the A matrices of the batch's
    adapters side by side ([in, n_adapters * rank], in the activations' dtype) and their B matrices stacked
    with the scaling folded in: one matmul gives every row every adapter's low-rank projection, a mask keeps
    each row's own adapter's columns (zeros for base rows), and one more matmul adds the deltas to the base
    output. That costs n_adapters times a single adapter's LoRA arithmetic (a few percent of the layer at
    rank 8 and a handful of hot adapters) and four ops whatever the mix. The stacks are built once per set of
    adapters and reused until any adapter's weights change.
    """

    def __init__(self):
        self._layers: set[int] = set()
        self._plan: _Plan | None = None
        self._version = 0  # bumped whenever adapter weights change: stale stacks are rebuilt
        self._stacks: dict[int, tuple[tuple, torch.Tensor, torch.Tensor]] = {}  # layer -> (key, A, B)

    def hook(self, model: nn.Module) -> None:
        """Hook every LoRA layer of `model` not hooked yet (a new adapter may target new modules)."""
        for module in model.modules():
            if isinstance(module, LoraLayer) and id(module) not in self._layers:
                self._layers.add(id(module))
                module.register_forward_hook(self._add_deltas)

    def changed(self) -> None:
        self._version += 1
        self._stacks.clear()

    @contextmanager
    def planned(self, slots: list[str], configs: dict) -> Iterator[None]:
        """Within: LoRA layers add the deltas of `slots[i]`'s adapter to row i (BASE: none)."""
        used = tuple(sorted(set(slots) - {BASE}))
        if used:
            rank = max(configs[s].r for s in used)  # smaller ranks are padded with zero columns
            mask = torch.zeros(len(slots), 1, len(used) * rank)
            for row, slot in enumerate(slots):
                if slot != BASE:
                    at = used.index(slot) * rank
                    mask[row, :, at : at + rank] = 1
            whole = len(used) == 1 and BASE not in slots
            self._plan = _Plan(used, rank, None if whole else mask)
        try:
            yield
        finally:
            self._plan = None

    def _add_deltas(self, module: LoraLayer, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        plan = self._plan
        if plan is None:
            return None
        x = args[0]
        a, b = self._stack(module, plan, x.dtype)
        projected = x @ a  # [rows, tokens, adapters * rank]
        if plan.mask is not None:
            if plan.mask.dtype != x.dtype or plan.mask.device != x.device:
                plan.mask = plan.mask.to(x.device, x.dtype)  # once per forward
            projected = projected * plan.mask
        return output + projected @ b

    def _stack(self, module: LoraLayer, plan: _Plan, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (self._version, plan.slots, plan.rank, dtype)
        held = self._stacks.get(id(module))
        if held is not None and held[0] == key:
            return held[1], held[2]
        a_parts, b_parts = [], []
        weight = module.get_base_layer().weight
        for slot in plan.slots:
            if slot in module.lora_A:
                a = module.lora_A[slot].weight  # [rank, in]
                b = module.lora_B[slot].weight * module.scaling[slot]  # [out, rank]
            else:  # an adapter that does not target this layer
                a, b = weight.new_zeros(0, weight.shape[1]), weight.new_zeros(weight.shape[0], 0)
            missing = plan.rank - a.shape[0]
            a_parts.append(torch.cat([a, a.new_zeros(missing, a.shape[1])]) if missing else a)
            b_parts.append(torch.cat([b, b.new_zeros(b.shape[0], missing)], dim=1) if missing else b)
        a_wide = torch.cat(a_parts).t().to(dtype).contiguous()  # [in, adapters * rank]
        b_tall = torch.cat(b_parts, dim=1).t().to(dtype).contiguous()  # [adapters * rank, out]
        self._stacks[id(module)] = (key, a_wide, b_tall)
        return a_wide, b_tall


@dataclass
class _Plan:
    slots: tuple[str, ...]  # the batch's adapters (PEFT slots), in their column order
    rank: int  # columns per adapter
    mask: torch.Tensor | None  # [rows, 1, adapters * rank]: each row's own columns; None: every row, all
