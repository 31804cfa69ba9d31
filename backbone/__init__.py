"""The frozen RAG End2End backbone. Imports nothing else of ragadapt.

Its names are exported lazily (PEP 562): `from backbone import COMPONENTS, LoraConfig` reads the torch-free
`backbone.config` only, so the store-side modules (the run queue, the HTTP contract) can use them without
loading torch; `Backbone` and the rest import their modules, and torch, when first asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers see; `as` re-exports them
    from .config import COMPONENTS as COMPONENTS
    from .config import AdapterSetConfig as AdapterSetConfig
    from .config import BackboneConfig as BackboneConfig
    from .config import LoraConfig as LoraConfig
    from .decoding import PrefixCache as PrefixCache
    from .decoding import PrefixKey as PrefixKey
    from .errors import AdapterExists as AdapterExists
    from .errors import AdapterLoadError as AdapterLoadError
    from .errors import BackboneError as BackboneError
    from .errors import ModelLoadError as ModelLoadError
    from .errors import QuantizationUnavailable as QuantizationUnavailable
    from .errors import UnknownAdapter as UnknownAdapter
    from .generator import Passage as Passage
    from .generator import Prompt as Prompt
    from .loading import embedded_default_config as embedded_default_config
    from .model import AdapterSetWeights as AdapterSetWeights
    from .model import Answer as Answer
    from .model import Answering as Answering
    from .model import Backbone as Backbone
    from .model import SupportingPassage as SupportingPassage
    from .rag import normalize_answer as normalize_answer

# Exported name -> the module of this package that defines it.
_MODULES = {
    "COMPONENTS": "config",
    "AdapterSetConfig": "config",
    "BackboneConfig": "config",
    "LoraConfig": "config",
    "PrefixCache": "decoding",
    "PrefixKey": "decoding",
    "AdapterExists": "errors",
    "AdapterLoadError": "errors",
    "BackboneError": "errors",
    "ModelLoadError": "errors",
    "QuantizationUnavailable": "errors",
    "UnknownAdapter": "errors",
    "Passage": "generator",
    "Prompt": "generator",
    "embedded_default_config": "loading",
    "AdapterSetWeights": "model",
    "Answer": "model",
    "Answering": "model",
    "Backbone": "model",
    "SupportingPassage": "model",
    "normalize_answer": "rag",
}
__all__ = sorted(_MODULES)


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
