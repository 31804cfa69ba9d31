"""QLoRA's frozen generator: its linear layers quantized to 4-bit NF4 (bitsandbytes, CUDA only)."""

from __future__ import annotations

import logging

import torch

from .errors import QuantizationUnavailable
from .model import Backbone

log = logging.getLogger(__name__)


def quantize_generator_4bit(backbone: Backbone) -> None:
    """QLoRA: replace the frozen generator's linear layers (not the LM head) by NF4 4-bit ones, in place.

    Only in a process that trains (a run worker's own backbone) and before any adapter is attached; LoRA
    then wraps the 4-bit layers (PEFT's bitsandbytes dispatch). The fingerprint is unchanged: adapters
    trained this way serve on the unquantized generator, as QLoRA adapters do.
    """
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise QuantizationUnavailable("a 4-bit generator needs the bitsandbytes package") from exc
    if backbone.device.type != "cuda":
        raise QuantizationUnavailable("a 4-bit generator needs the backbone on a CUDA device")
    host = backbone.generator.host
    if host.peft is not None:
        raise QuantizationUnavailable("the generator must be quantized before adapters are attached")
    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    swaps = [
        (parent, name, child)
        for parent in host.base.modules()
        for name, child in parent.named_children()
        if isinstance(child, torch.nn.Linear) and name != "lm_head"
    ]
    for parent, name, child in swaps:
        layer = bnb.nn.Linear4bit(
            child.in_features,
            child.out_features,
            bias=child.bias is not None,
            compute_dtype=compute,
            quant_type="nf4",
        )
        layer.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
        if child.bias is not None:
            layer.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
        setattr(parent, name, layer.to(backbone.device))  # quantized on the move to the GPU
    log.info("generator quantized to NF4: %d linear layers", len(swaps))
