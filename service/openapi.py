"""The OpenAPI document the service serves at `/schema/openapi.json`: exactly what it accepts and answers.

Litestar writes the paths and operations; this module makes the document exact, as generated clients and
fuzzers (schemathesis) read it:

- every body schema is pydantic's own JSON Schema of the model the handler validates with (so
  `additionalProperties: false`, patterns, ranges, array bounds and defaults are the ones enforced), instead
  of Litestar's approximation of it;
- path and query parameters that name a domain, a run or a job state the pattern such names have;
- the admin token and the API key are security schemes, and each operation says which it needs;
- OpenAPI links connect the workflows: create a domain -> follow its job -> ask it; start a run -> follow it,
  read its events and checkpoints, cancel it; promote a version -> roll back.
"""

from __future__ import annotations

import copy
from typing import Any

from litestar import Request
from litestar.openapi.plugins import JsonRenderPlugin
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from adapters.spec import RunInfo, RunRequest
from storage.artifacts import VERSION_ID

from .gc import GcReport
from .routes.runs import RunCheckpoints, RunEvents, RunList
from .schemas import (
    DOMAIN_PATTERN,
    AskRequest,
    AskResponse,
    CreateDomainRequest,
    CreateDomainResponse,
    DomainInfo,
    DomainList,
    GcRequest,
    Health,
    JobInfo,
    Problem,
    PromoteRequest,
    Ready,
    RebuildRequest,
    RollbackRequest,
)

# What handlers validate request bodies with, and what they answer with.
REQUESTS: tuple[type[BaseModel], ...] = (
    AskRequest,
    CreateDomainRequest,
    PromoteRequest,
    RollbackRequest,
    RebuildRequest,
    GcRequest,
    RunRequest,
)
RESPONSES: tuple[type[BaseModel], ...] = (
    AskResponse,
    DomainInfo,
    DomainList,
    JobInfo,
    CreateDomainResponse,
    RunInfo,
    RunList,
    RunEvents,
    RunCheckpoints,
    Health,
    Ready,
    Problem,
    GcReport,
)
ID_PATTERN = f"^{VERSION_ID.pattern}$"
_PARAMETERS = {
    "name": {"type": "string", "pattern": DOMAIN_PATTERN},
    "domain": {"type": "string", "pattern": DOMAIN_PATTERN},
    "run_id": {"type": "string", "pattern": ID_PATTERN},
    "job_id": {"type": "string", "pattern": ID_PATTERN},
}
# Operations that take no body as well as a JSON one (Litestar marks every body required).
OPTIONAL_BODIES = {"rollback", "rebuildDomain", "collectGarbage"}
ADMIN_SECURITY = "adminToken"
API_KEY_SECURITY = "apiKey"


def _link(
    operation: str,
    description: str,
    parameters: dict[str, str] | None = None,
    body: dict[str, str] | None = None,
) -> dict[str, Any]:
    link: dict[str, Any] = {"operationId": operation, "description": description}
    if parameters:
        link["parameters"] = parameters
    if body:
        link["requestBody"] = body
    return link


# operationId -> status -> link name -> link
LINKS: dict[str, dict[str, dict[str, dict[str, Any]]]] = {
    "createDomain": {
        "202": {
            "GetJob": _link("getJob", "Follow the ingest job", {"job_id": "$response.body#/job/id"}),
            "GetDomain": _link("getDomain", "The new domain", {"name": "$response.body#/domain"}),
            "Ask": _link(
                "ask",
                "Ask the new domain (503 index_not_ready until its job succeeded)",
                {"domain": "$response.body#/domain"},
            ),
            "Adapt": _link(
                "adapt",
                "Start an adaptation run on the new domain",
                body={"domain": "$response.body#/domain"},
            ),
            "Rebuild": _link("rebuildDomain", "Build its index again", {"name": "$response.body#/domain"}),
            "Delete": _link("deleteDomain", "Delete the new domain", {"name": "$response.body#/domain"}),
        }
    },
    "rebuildDomain": {
        "202": {
            "GetJob": _link("getJob", "Follow the rebuild", {"job_id": "$response.body#/id"}),
        }
    },
    "getJob": {
        "200": {
            "Ask": _link("ask", "Ask the job's domain", {"domain": "$response.body#/domain"}),
            "GetDomain": _link("getDomain", "The job's domain", {"name": "$response.body#/domain"}),
        }
    },
    "adapt": {
        "202": {
            "GetRun": _link("getRun", "Follow the run", {"run_id": "$response.body#/id"}),
            "GetRunEvents": _link("getRunEvents", "The run's events", {"run_id": "$response.body#/id"}),
            "GetRunCheckpoints": _link(
                "getRunCheckpoints", "The run's checkpoints", {"run_id": "$response.body#/id"}
            ),
            "CancelRun": _link("cancelRun", "Cancel the run", {"run_id": "$response.body#/id"}),
        }
    },
    "getRun": {
        "200": {
            "GetRunEvents": _link("getRunEvents", "The run's events", {"run_id": "$response.body#/id"}),
            "CancelRun": _link("cancelRun", "Cancel the run", {"run_id": "$response.body#/id"}),
        }
    },
    "getRunEvents": {
        "200": {
            "NextPage": _link(
                "getRunEvents",
                "The page that follows",
                {"run_id": "$request.path.run_id", "after": "$response.body#/next"},
            ),
        }
    },
    "promote": {
        "200": {
            "Rollback": _link("rollback", "Return to what served before", {"name": "$request.path.name"}),
            "GetDomain": _link("getDomain", "The domain now", {"name": "$request.path.name"}),
        }
    },
    "deleteDomain": {
        "204": {
            "GetDomain": _link(
                "getDomain", "The deleted domain (404 from then on)", {"name": "$request.path.name"}
            ),
        }
    },
}


class ContractJsonPlugin(JsonRenderPlugin):
    """Serves the exact document (built once, from Litestar's, on the first request)."""

    def __init__(self, *, api_keys: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._api_keys = api_keys
        self._document: dict[str, Any] | None = None

    def render(self, request: Request, openapi_schema: dict[str, Any]) -> bytes:
        if self._document is None:
            self._document = exact(openapi_schema, api_keys=self._api_keys)
        return self.render_json(request, self._document)


def exact(document: dict[str, Any], *, api_keys: bool) -> dict[str, Any]:
    """`document` (Litestar's) with pydantic's schemas, stated parameter patterns, security and links."""
    document = copy.deepcopy(document)
    components = document.setdefault("components", {})
    components["schemas"] = _schemas()
    components["securitySchemes"] = {
        ADMIN_SECURITY: {
            "type": "http",
            "scheme": "bearer",
            "description": "the admin token (RAGADAPT_SERVER__ADMIN_TOKEN)",
        },
        API_KEY_SECURITY: {
            "type": "apiKey",
            "in": "header",
            "name": "X-API-Key",
            "description": "one of RAGADAPT_SERVER__API_KEYS, when any are configured",
        },
    }
    for path, operations in document["paths"].items():
        for _method, operation in operations.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            for parameter in operation.get("parameters", []):
                if parameter["name"] in _PARAMETERS and parameter["in"] in ("path", "query"):
                    parameter["schema"] = {**_PARAMETERS[parameter["name"]], **_bounds(parameter["schema"])}
            if path.startswith("/admin/"):
                operation["security"] = [{ADMIN_SECURITY: []}]
            elif path == "/ask" and api_keys:
                operation["security"] = [{API_KEY_SECURITY: []}]
            else:
                operation["security"] = []
            if operation.get("operationId") in OPTIONAL_BODIES:
                operation["requestBody"]["required"] = False
            for status, links in LINKS.get(operation.get("operationId", ""), {}).items():
                operation["responses"][status]["links"] = copy.deepcopy(links)
    return document


def _bounds(schema: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in schema.items() if key in ("minLength", "maxLength")}


def _schemas() -> dict[str, Any]:
    """Components from pydantic: validation schemas for request bodies, serialization ones for responses."""
    models = [(model, "validation") for model in REQUESTS] + [(model, "serialization") for model in RESPONSES]
    _, top = models_json_schema(models, ref_template="#/components/schemas/{model}")
    schemas = top["$defs"]
    clashes = sorted(name for name in schemas if name.endswith(("-Input", "-Output")))
    if clashes:  # a model used both ways with two shapes would need two names the handlers do not use
        raise RuntimeError(f"models whose request and response schemas differ: {clashes}")
    return schemas
