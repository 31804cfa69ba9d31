"""Adapter registry (versions of a domain's adapter set) and, later, adaptation runs."""

from adapters.errors import AdapterError, AdapterIncompatible, AdapterVersionNotFound, InvalidAdapterSet
from adapters.registry import AdapterRef, AdapterRegistry

__all__ = [
    "AdapterError",
    "AdapterIncompatible",
    "AdapterRef",
    "AdapterRegistry",
    "AdapterVersionNotFound",
    "InvalidAdapterSet",
]
