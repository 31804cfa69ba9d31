"""Weight-only int8/int4 copies of the frozen generator's linear layers, for the small matmuls of decoding.

Decoding a few rows on a CPU reads every weight for a handful of tokens, so it is bound by the bytes read, not
by arithmetic, and 4-bit weights read a quarter of bfloat16's (what lets llama.cpp decode a GGUF model several
times faster at batch 1). PyTorch's CPU weight-only kernels (`_weight_int8pack_mm`, per-channel scales;
`_weight_int4pack_mm_for_cpu`, asymmetric groups of 32) beat a bfloat16 matmul by about 2.8x and 3.4x for one
row of the embedded default's layers, break even near 8 rows and lose badly on prefill (10x at 256 rows). So a
layer keeps its bfloat16 weight and takes the packed copy only for forwards of at most `SMALL` rows without
gradients: decoding steps of a few rows. The base stays frozen and shared; LoRA deltas stay in the
activations' dtype (QLoRA's split, at serving time).

The embedded default's generator comes from a Q4_1 GGUF file: each block of 32 weights holds at most 16
levels, which int4 groups of 32 represent exactly (up to bfloat16 rounding of scales), so `int4` serves the
very weights the file holds. Its LM head, tied to the embeddings, is 8-bit in the file; int4 would lose a
tenth of it, so under `int4` the LM head goes int8. Other models are quantized as they come: `int4` is lossy
in general.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

# Forwards of at most this many rows (tokens) take the packed weights (measured break-even: about 8).
SMALL = 4
GROUP = 32  # int4 group size along the input dimension


class PackedLinear(nn.Linear):
    """A frozen `nn.Linear` with a weight-only int8 or int4 copy of its weight for small forwards. It is still
    an `nn.Linear` (the same weight and bias parameters), so PEFT wraps it as the base of a LoRA layer."""

    def __init__(self, linear: nn.Linear, bits: int):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.bits = bits
        weight = linear.weight.detach()
        if bits == 8:
            scales = weight.float().abs().amax(dim=1).clamp(min=1e-12) / 127
            packed = (weight.float() / scales[:, None]).round().clamp(-128, 127).to(torch.int8)
            self.register_buffer("packed", packed, persistent=False)
            self.register_buffer("scales", scales.to(weight.dtype), persistent=False)
        else:
            rows, columns = weight.shape
            groups = weight.float().reshape(rows, columns // GROUP, GROUP)
            low = groups.amin(-1, keepdim=True)
            step = ((groups.amax(-1, keepdim=True) - low) / 15).clamp(min=1e-12)
            levels = ((groups - low) / step).round().clamp(0, 15).to(torch.int32).reshape(rows, columns)
            # The kernel computes (level - 8) * scale + zero per group: zero = low + 8 * step.
            scales_zeros = torch.stack([step.squeeze(-1), (low + 8 * step).squeeze(-1)], dim=-1)
            self.register_buffer(
                "packed", torch._convert_weight_to_int4pack_for_cpu(levels, 2), persistent=False
            )
            self.register_buffer(
                "scales", scales_zeros.transpose(0, 1).contiguous().to(weight.dtype), persistent=False
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > SMALL or torch.is_grad_enabled() or x.dtype != self.scales.dtype:
            return super().forward(x)
        flat = x.reshape(rows, x.shape[-1])
        if self.bits == 8:
            out = torch._weight_int8pack_mm(flat, self.packed, self.scales)
        else:
            out = torch._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP, self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def pack_linears(model: nn.Module, bits: int) -> int:
    """Give `model`'s linear layers packed copies (int4: int8 for the output head, and for any layer whose
    input size is not a multiple of the group); returns how many layers were packed. CPU and bfloat16 only:
    the kernels are CPU kernels, and float32 runs are kept exact."""
    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
        log.warning(
            "weight-only int%d needs a bfloat16 model on a CPU; serving %s unpacked", bits, weight.dtype
        )
        return 0
    head = model.get_output_embeddings()
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            layer_bits = 8 if bits == 8 or child is head or child.in_features % GROUP else 4
            setattr(parent, name, PackedLinear(child, layer_bits))
            replaced += 1
    return replaced
