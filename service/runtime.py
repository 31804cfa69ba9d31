"""What one app holds: built by `service.app.create_app`, kept on `app.state.runtime`, injected into handlers.

The store side (registries, index versions) exists from the start; everything that needs the weights (adapter
cache, catalog, model worker, jobs, runs) appears once the backbone has loaded off the event loop. Until then
`serving()` raises `NotReady` (503), which is also what `/readyz` reports.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from adapters import AdapterRegistry
from adapters.frontend import RunFrontend
from backbone import Backbone
from indexing.ray_encoding import RayEncoding
from indexing.versions import IndexVersions
from storage import DomainRegistry, ObjectStore

from .adapter_cache import AdapterCache
from .domains import DomainCatalog
from .errors import NotReady
from .jobs import Jobs
from .metrics import Metrics
from .settings import Settings
from .worker import ModelWorker


@dataclass
class Loaded:
    """The parts that exist once the backbone is loaded."""

    backbone: Backbone
    cache: AdapterCache
    catalog: DomainCatalog
    worker: ModelWorker
    jobs: Jobs
    max_batch_passages: int  # generator rows a run's training step may hold on this host


@dataclass
class Runtime:
    settings: Settings
    metrics: Metrics
    store: ObjectStore
    registry: DomainRegistry
    adapters: AdapterRegistry
    versions: IndexVersions
    loader: ThreadPoolExecutor  # store I/O off the event loop and the model thread (adapter loads)
    # Submitting and reading runs needs only the store; training happens in local workers or on Ray.
    runs: RunFrontend  # a RunManager (local worker processes) or a RayRunManager
    ray_encoding: RayEncoding | None = None  # passages encode on Ray Data (None: in local build processes)
    loaded: Loaded | None = None
    load_error: BaseException | None = None
    background: list = field(default_factory=list)  # asyncio tasks started by the lifespan

    def serving(self) -> Loaded:
        if self.loaded is None:
            if self.load_error is not None:
                raise NotReady(f"the backbone failed to load: {self.load_error}")
            raise NotReady("the backbone is still loading")
        return self.loaded
