"""Typed errors of the backbone, each with a stable `code` the HTTP layer maps to problem details."""

from __future__ import annotations


class BackboneError(Exception):
    code = "backbone_error"
    status = 500


class ModelLoadError(BackboneError):
    code = "model_load_failed"
    status = 500


class UnknownAdapter(BackboneError):
    code = "adapter_not_loaded"
    status = 404


class AdapterExists(BackboneError):
    code = "adapter_exists"
    status = 409


class AdapterLoadError(BackboneError):
    code = "adapter_invalid"
    status = 422


class QuantizationUnavailable(BackboneError):
    """A 4-bit generator cannot be had here: no CUDA device, no bitsandbytes, or adapters already attached."""

    code = "quantization_unavailable"
    status = 422
