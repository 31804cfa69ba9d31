"""Weight-only int8/int4 copies of the generator's linear layers: used for forwards of a few rows only, exact
everywhere else, under LoRA adapters, with the tied output head still tied."""

from __future__ import annotations

import pytest
import torch

from backbone import Backbone
from backbone.weight_only import SMALL, PackedLinear
from tests.backbone.test_lora import PASSAGES, randomize
from tests.models import tiny_backbone_config


def _load(tiny_root, weight_only: str) -> Backbone:
    bb = Backbone.load(tiny_backbone_config(tiny_root, dtype="bfloat16", weight_only=weight_only))
    bb.add_adapter_set("news")
    randomize(bb, "news", seed=80)
    return bb


def _logits(bb: Backbone, rows: int, adapter: str | None) -> torch.Tensor:
    """Next-token logits of `rows` rows of one token each, in one forward (a forward of `rows` tokens)."""
    generator = bb.generator
    _, suffix = generator.prompt_ids([generator.source("what is the capital", PASSAGES[0])])
    ids = torch.tensor([suffix[0][-1:]] * rows)
    names = bb._names("generator", [adapter] * rows)
    with torch.inference_mode():
        return generator.host.forward(names, input_ids=ids).logits[:, -1].float()


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_small_forwards_use_packed_weights_and_large_ones_stay_exact(tiny_root, bits):
    plain, packed = _load(tiny_root, "none"), _load(tiny_root, bits)
    model = packed.generator.host.base
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert layers and all(isinstance(m.get_base_layer(), PackedLinear) for m in _qkv(packed))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    assert model.get_output_embeddings().bits == 8  # the head is never int4
    for adapter in (None, "news"):
        # More rows than SMALL: the bfloat16 weights, bit for bit.
        torch.testing.assert_close(
            _logits(packed, SMALL + 1, adapter), _logits(plain, SMALL + 1, adapter), rtol=0, atol=0
        )
        # One row: the packed kernels, not bit for bit (int4 of random weights is far off: see below).
        assert not torch.equal(_logits(packed, 1, adapter), _logits(plain, 1, adapter))
    if bits == "int8":  # close, and the adapter still changes the output by far more than packing does
        small, exact = _logits(packed, 1, "news"), _logits(plain, 1, "news")
        assert (small - exact).norm() <= 0.05 * exact.norm()
        assert (small - _logits(packed, 1, None)).norm() > 4 * (small - exact).norm()


def test_int4_holds_weights_of_16_levels_per_group_of_32_exactly():
    """As a Q4_1 GGUF's blocks: then the int4 copy is the same weights, up to bfloat16 rounding."""
    torch.manual_seed(0)
    levels = torch.randint(0, 16, (48, 64)).float()
    low, step = torch.randn(48, 2, 1), torch.rand(48, 2, 1) * 0.1
    linear = torch.nn.Linear(64, 48, bias=True).to(torch.bfloat16).requires_grad_(False)
    linear.weight.copy_((levels.reshape(48, 2, 32) * step + low).reshape(48, 64))
    x = torch.randn(SMALL, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        exact = linear(x).float()
        for bits, tolerance in ((4, 0.01), (8, 0.02)):
            assert (PackedLinear(linear, bits)(x).float() - exact).norm() <= tolerance * exact.norm()


def test_float32_models_are_served_unpacked(tiny_root):
    bb = Backbone.load(tiny_backbone_config(tiny_root, dtype="float32", weight_only="int4"))
    assert not any(isinstance(m, PackedLinear) for m in bb.generator.host.base.modules())


def _qkv(bb: Backbone) -> list:
    return [
        m for n, m in bb.generator.host.peft.named_modules() if hasattr(m, "lora_A") and n.endswith("q_proj")
    ]
