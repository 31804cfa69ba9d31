"""Which index version answers each domain right now: one reference per domain, swapped atomically.

Writers replace the whole mapping (copy-on-write under a lock); readers take the current mapping without a
lock, so a search never waits for a swap and always gets one complete handle. An old handle stays usable for
as long as a reader holds it; it is dropped when the last one lets go.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from types import MappingProxyType

from .errors import IndexNotReady
from .searcher import IndexHandle


class LiveIndexes:
    def __init__(self) -> None:
        self._handles: Mapping[str, IndexHandle] = MappingProxyType({})
        self._write_lock = threading.Lock()

    def get(self, domain: str) -> IndexHandle:
        """The live handle of `domain`; IndexNotReady (503) when none has been installed yet."""
        handle = self._handles.get(domain)
        if handle is None:
            raise IndexNotReady(f"no index is live for domain {domain!r} yet")
        return handle

    def find(self, domain: str) -> IndexHandle | None:
        return self._handles.get(domain)

    def install(self, handle: IndexHandle, *, replacing: str | None = None) -> bool:
        """Make `handle` live for its domain. With `replacing`, only if that version is the live one now
        (compare-and-swap: a slower rebuild cannot undo a newer one). Returns whether the swap happened."""
        with self._write_lock:
            current = self._handles.get(handle.domain)
            if replacing is not None and (current is None or current.version != replacing):
                return False
            self._handles = MappingProxyType({**self._handles, handle.domain: handle})
            return True

    def remove(self, domain: str) -> IndexHandle | None:
        with self._write_lock:
            handles = dict(self._handles)
            removed = handles.pop(domain, None)
            self._handles = MappingProxyType(handles)
            return removed

    def snapshot(self) -> Mapping[str, IndexHandle]:
        """The live handles at one instant (an immutable mapping)."""
        return self._handles

    def versions(self) -> dict[str, str]:
        return {domain: handle.version for domain, handle in self._handles.items()}

    def __contains__(self, domain: object) -> bool:
        return domain in self._handles

    def __len__(self) -> int:
        return len(self._handles)
