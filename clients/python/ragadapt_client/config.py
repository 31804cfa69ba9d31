"""Client configuration from arguments, falling back to ``RAGADAPT_*`` environment variables.

The environment is read when a client is built, never at import time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx

from ragadapt_client.retries import RetryPolicy

if TYPE_CHECKING:
    from ragadapt_client.endpoints import Call

DEFAULT_URL = "http://localhost:8080"
# Answers on a CPU backbone take seconds; connecting to a healthy server does not.
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=5.0)
VERSION = "0.1.0"


@dataclass(frozen=True)
class ClientConfig:
    base_url: str
    admin_token: str | None
    api_key: str | None
    timeout: httpx.Timeout
    retry: RetryPolicy
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def resolve(
        cls,
        base_url: str | None,
        admin_token: str | None,
        api_key: str | None,
        timeout: float | httpx.Timeout | None,
        max_retries: int | None,
        retry: RetryPolicy | None,
        headers: Mapping[str, str] | None,
        environ: Mapping[str, str] | None = None,
    ) -> ClientConfig:
        """Arguments win over ``RAGADAPT_URL``, ``RAGADAPT_ADMIN_TOKEN``, ``RAGADAPT_API_KEY``,
        ``RAGADAPT_TIMEOUT`` (seconds) and ``RAGADAPT_MAX_RETRIES``."""
        env = os.environ if environ is None else environ
        url = base_url or env.get("RAGADAPT_URL") or DEFAULT_URL
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {url!r}")
        if timeout is None and env.get("RAGADAPT_TIMEOUT"):
            timeout = float(env["RAGADAPT_TIMEOUT"])
        if timeout is None:
            resolved_timeout = DEFAULT_TIMEOUT
        elif isinstance(timeout, httpx.Timeout):
            resolved_timeout = timeout
        else:
            resolved_timeout = httpx.Timeout(float(timeout))
        policy = retry or RetryPolicy()
        if max_retries is None and env.get("RAGADAPT_MAX_RETRIES"):
            max_retries = int(env["RAGADAPT_MAX_RETRIES"])
        if max_retries is not None:
            policy = policy.with_max_retries(max_retries)
        return cls(
            base_url=url.rstrip("/"),
            admin_token=admin_token or env.get("RAGADAPT_ADMIN_TOKEN") or None,
            api_key=api_key or env.get("RAGADAPT_API_KEY") or None,
            timeout=resolved_timeout,
            retry=policy,
            headers=dict(headers or {}),
        )

    def headers_for(self, call: Call[object]) -> dict[str, str]:
        """Admin calls carry the admin token, the others the API key; neither leaks to the other's calls."""
        headers = {"User-Agent": f"ragadapt-client/{VERSION}", "Accept": "application/json", **self.headers}
        if call.admin and self.admin_token:
            headers["Authorization"] = f"Bearer {self.admin_token}"
        elif not call.admin and self.api_key:
            headers["X-API-Key"] = self.api_key
        return headers
