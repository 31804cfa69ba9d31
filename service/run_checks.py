"""Checks of an adaptation run against what this server loaded and what its host can hold, made before the
run is queued (`adapters.validation.prepare` checks the request against the store). A run that fails them
would only fail later, in its worker: LoRA targets naming no module of the backbone, or more generator rows
per step than fit in memory."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from adapters.errors import InvalidRun
from adapters.spec import RunRequest
from backbone import Backbone

# Linear-like layers PEFT's LoRA wraps (transformers' GPT-2 style Conv1D included, by name).
_LORA_LAYERS = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Activations autograd keeps per token per decoder layer, in elements: the inputs of the q/k/v/o
# projections, the norms and residuals (about 6 x hidden) and of the MLP's gate/up/activation/down (about
# 4 x intermediate). Frozen weights do not shorten this: gradients reach the LoRA of the first layers through
# every later one.
_HIDDEN_FACTOR, _INTERMEDIATE_FACTOR = 6, 4


def check_lora_targets(backbone: Backbone, request: RunRequest) -> None:
    """Every explicitly named LoRA target must name a layer LoRA can wrap in its component."""
    lora = request.hyperparameters.lora
    if lora is None:
        return
    models = {
        "question": backbone.question.host.base,
        "passage": backbone.passage.host.base,
        "generator": backbone.generator.host.base,
    }
    for component, model in models.items():
        targets = getattr(lora, component).targets
        if not targets:
            continue
        modules = [(name, module) for name, module in model.named_modules() if name]
        for target in targets:
            matched = [m for name, m in modules if name == target or name.endswith(f".{target}")]
            if not matched:
                known = sorted({name.rsplit(".", 1)[-1] for name, m in modules if _wrappable(m)})
                raise InvalidRun(
                    f"hyperparameters.lora.{component}.targets: {target!r} names no module of "
                    f"the {component} model; LoRA can wrap {', '.join(known)}"
                )
            if not any(_wrappable(m) for m in matched):
                raise InvalidRun(
                    f"hyperparameters.lora.{component}.targets: {target!r} names "
                    f"{type(matched[0]).__name__} modules, which LoRA cannot wrap"
                )


def _wrappable(module: nn.Module) -> bool:
    return isinstance(module, _LORA_LAYERS) or type(module).__name__ == "Conv1D"


def batch_passage_limit(backbone: Backbone, memory_bytes: int, workers: int) -> int:
    """How many generator rows (examples x retrieved passages) one training step of a run worker may hold:
    half the host's memory shared by its workers, over what autograd keeps per row of the longest input."""
    config = backbone.generator.host.base.config
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    tokens = (
        backbone.config.max_question_tokens
        + backbone.config.max_passage_tokens
        + backbone.config.max_answer_tokens
    )
    element = _BYTES.get(str(backbone.dtype).removeprefix("torch."), 4)
    per_token = _HIDDEN_FACTOR * hidden + _INTERMEDIATE_FACTOR * intermediate
    per_row = config.num_hidden_layers * tokens * per_token
    return max(1, memory_bytes // 2 // max(workers, 1) // (per_row * element))


def check_batch_fits(request: RunRequest, limit: int) -> None:
    hp = request.hyperparameters
    rows = hp.batch_size * hp.top_k
    if rows > limit:
        raise InvalidRun(
            f"batch_size x top_k = {hp.batch_size} x {hp.top_k} = {rows} generator rows a step, "
            f"more than this host holds ({limit}); lower them and raise grad_accumulation"
        )


def host_memory() -> int:
    """Bytes of memory this process may use: the cgroup limit when there is one, else the physical memory."""
    limit = Path("/sys/fs/cgroup/memory.max")
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        text = limit.read_text().strip()
    except OSError:
        return physical
    return min(int(text), physical) if text.isdigit() else physical
