"""``Client`` and ``AsyncClient`` offer the same calls with the same parameters."""

from __future__ import annotations

import asyncio
import inspect

import pytest

import ragadapt_client
from ragadapt_client import AsyncClient, Client
from ragadapt_client.async_client import AsyncDomains, AsyncJob, AsyncJobs, AsyncRun, AsyncRuns
from ragadapt_client.client import Domains, Job, Jobs, Run, Runs

PAIRS = [
    (Client, AsyncClient),
    (Domains, AsyncDomains),
    (Jobs, AsyncJobs),
    (Runs, AsyncRuns),
    (Job, AsyncJob),
    (Run, AsyncRun),
]


def _public(cls: type) -> dict[str, object]:
    return {
        name: member
        for name, member in inspect.getmembers(cls)
        if not name.startswith("_") and (inspect.isfunction(member) or isinstance(member, property))
    }


@pytest.mark.parametrize(("sync", "async_"), PAIRS, ids=[pair[0].__name__ for pair in PAIRS])
def test_same_methods_and_parameters(sync, async_):
    sync_members, async_members = _public(sync), _public(async_)
    assert sorted(sync_members) == sorted(async_members)
    for name, member in sync_members.items():
        other = async_members[name]
        if isinstance(member, property):
            assert isinstance(other, property), name
            continue
        assert list(inspect.signature(member).parameters) == list(inspect.signature(other).parameters), name
        defaults = [p.default for p in inspect.signature(member).parameters.values()]
        assert defaults == [p.default for p in inspect.signature(other).parameters.values()], name
        awaitable = inspect.iscoroutinefunction(other) or inspect.isasyncgenfunction(other)
        assert awaitable, f"{async_.__name__}.{name} must be awaited or iterated with async for"


def test_resources_are_reachable_the_same_way():
    sync = Client("http://127.0.0.1:1")
    async_ = AsyncClient("http://127.0.0.1:1")
    try:
        resources = {"domains": (Domains, AsyncDomains), "jobs": (Jobs, AsyncJobs), "runs": (Runs, AsyncRuns)}
        for attribute, (sync_cls, async_cls) in resources.items():
            assert isinstance(getattr(sync, attribute), sync_cls)
            assert isinstance(getattr(async_, attribute), async_cls)
    finally:
        sync.close()
        asyncio.run(async_.close())


def test_events_iterate_synchronously_and_asynchronously():
    assert inspect.isgeneratorfunction(Run.events)
    assert inspect.isasyncgenfunction(AsyncRun.events)


def test_everything_exported_exists():
    for name in ragadapt_client.__all__:
        assert hasattr(ragadapt_client, name), name
