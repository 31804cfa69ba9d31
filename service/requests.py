"""The app's request class: a JSON body that cannot be decoded is the client's mistake, however it fails."""

from __future__ import annotations

from typing import Any

from litestar import Request

from .errors import InvalidRequest


class ServiceRequest(Request):
    async def json(self) -> Any:
        """The decoded JSON body. msgspec decodes nested arrays and objects recursively, so a body nested
        deeper than the interpreter's recursion limit raises RecursionError (else a 500)."""
        try:
            return await super().json()
        except RecursionError:
            raise InvalidRequest("the JSON body is nested too deeply") from None
