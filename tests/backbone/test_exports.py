"""`backbone` exports lazily: its configuration is importable without torch, and every export resolves."""

from __future__ import annotations

import subprocess
import sys

import backbone

TORCH_FREE = """
import sys
from backbone import COMPONENTS, AdapterSetConfig, BackboneConfig, LoraConfig
import adapters.queue, adapters.records, adapters.spec, adapters.supervisor, adapters.validation
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))[:5]
"""


def test_the_configuration_and_the_run_queue_import_without_torch():
    done = subprocess.run([sys.executable, "-c", TORCH_FREE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_every_export_resolves_to_its_definition():
    for name in backbone.__all__:
        value = getattr(backbone, name)
        assert getattr(value, "__name__", name) == name, name  # COMPONENTS, a tuple, has no name
    assert backbone.COMPONENTS == ("question", "passage", "generator")
    assert "Backbone" in dir(backbone)
