"""async_client.py is generated from client.py (generate_async.py): regenerating it changes nothing, and the
generator's rules, shown on a small client, turn I/O into awaits and nothing else."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_SCRIPT = Path(__file__).resolve().parents[1] / "generate_async.py"
_spec = importlib.util.spec_from_file_location("generate_async", _SCRIPT)
generate_async = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate_async)

SYNC = '''"""A client."""

from __future__ import annotations

import time
from collections.abc import Iterator


class Client:
    """Talks to one ragadapt server."""

    def __init__(self, http):
        self._http = http
        self.pages = Pages(self)

    def _send(self, path: str) -> dict:
        return self._http.send(path).json()

    def size(self) -> int:
        return len(self.pages.get("/size"))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Pages:
    def __init__(self, client: Client):
        self._client = client

    def get(self, path: str) -> dict:
        return self._client._send(path)

    def follow(self, path: str) -> Iterator[dict]:
        while True:
            yield self.get(path)
            time.sleep(1.0)  # time.sleep stays in comments
'''

# Its module docstring is the generator's own (DOCSTRING), whatever client.py's says.
ASYNC = (
    generate_async.DOCSTRING
    + '''

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator


class AsyncClient:
    """Talks to one ragadapt server from asyncio code."""

    def __init__(self, http):
        self._http = http
        self.pages = AsyncPages(self)

    async def _send(self, path: str) -> dict:
        return (await self._http.send(path)).json()

    async def size(self) -> int:
        return len(await self.pages.get("/size"))

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class AsyncPages:
    def __init__(self, client: AsyncClient):
        self._client = client

    async def get(self, path: str) -> dict:
        return await self._client._send(path)

    async def follow(self, path: str) -> AsyncIterator[dict]:
        while True:
            yield await self.get(path)
            await asyncio.sleep(1.0)  # time.sleep stays in comments
'''
)


def test_regenerating_the_async_client_changes_nothing():
    generated = generate_async.generate(generate_async.SOURCE.read_text())
    assert generated == generate_async.TARGET.read_text(), (
        "async_client.py is not what client.py generates: edit client.py, then run "
        "`python clients/python/generate_async.py`"
    )


def test_io_becomes_awaits_through_the_methods_that_reach_it():
    assert generate_async.generate(SYNC) == ASYNC
