"""Typed errors of the adapter registry, each with a stable ``code`` mapped to problem details."""

from __future__ import annotations


class AdapterError(Exception):
    """Base of every error raised by ``adapters``."""

    code = "adapter_error"
    status = 500


class AdapterIncompatible(AdapterError):
    """The adapter was trained on a different backbone than the one loaded."""

    code = "adapter_incompatible"
    status = 409


class AdapterVersionNotFound(AdapterError):
    """No complete adapter version with that id in the domain."""

    code = "adapter_version_not_found"
    status = 404


class InvalidAdapterSet(AdapterError):
    """A directory to publish lacks the question/, passage/ and generator/ PEFT adapters."""

    code = "invalid_adapter_set"
    status = 422
