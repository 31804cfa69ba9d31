"""The frozen RAG End2End backbone. Imports nothing else of ragadapt."""

from .config import COMPONENTS, AdapterSetConfig, BackboneConfig, LoraConfig
from .errors import AdapterExists, AdapterLoadError, BackboneError, ModelLoadError, UnknownAdapter
from .generator import Passage
from .loading import embedded_default_config
from .model import AdapterSetWeights, Answer, Answering, Backbone, SupportingPassage
from .rag import normalize_answer

__all__ = [
    "COMPONENTS",
    "AdapterExists",
    "AdapterLoadError",
    "AdapterSetConfig",
    "AdapterSetWeights",
    "Answer",
    "Answering",
    "Backbone",
    "BackboneConfig",
    "BackboneError",
    "LoraConfig",
    "ModelLoadError",
    "Passage",
    "SupportingPassage",
    "UnknownAdapter",
    "embedded_default_config",
    "normalize_answer",
]
