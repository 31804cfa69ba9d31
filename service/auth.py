"""Guards: the admin bearer token on /admin/*, API keys on /ask when any are configured."""

from __future__ import annotations

import hmac

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from .errors import Unauthorized


def _settings(connection: ASGIConnection):
    return connection.app.state.runtime.settings.server


def admin_guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    token = _settings(connection).admin_token
    if token is None:
        raise Unauthorized("the admin API is disabled: set RAGADAPT_SERVER__ADMIN_TOKEN to enable it")
    scheme, _, given = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized("admin endpoints need 'Authorization: Bearer <admin token>'")
    if not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise Unauthorized("the admin token is wrong")


def api_key_guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    keys = _settings(connection).api_keys
    if not keys:
        return
    given = connection.headers.get("x-api-key", "").encode()
    # Compare against every key (no early exit), so timing does not tell which keys share a prefix.
    matches = [hmac.compare_digest(given, key.get_secret_value().encode()) for key in keys]
    if not given or not any(matches):
        raise Unauthorized("this endpoint needs a valid 'X-API-Key' header")
