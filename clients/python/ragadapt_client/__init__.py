"""Python client for ragadapt: ask a domain, create domains, run and promote adaptations.

    from ragadapt_client import Client

    with Client() as client:                       # RAGADAPT_URL, default http://localhost:8080
        print(client.ask("covid", "How long is the incubation period?").answer)

``AsyncClient`` has the same surface for asyncio code. Errors are typed by status and problem ``code``
(see ``ragadapt_client.errors``).
"""

from ragadapt_client.async_client import AsyncClient, AsyncJob, AsyncRun
from ragadapt_client.client import Client, Job, Run
from ragadapt_client.config import VERSION as __version__
from ragadapt_client.errors import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    GatewayTimeoutError,
    InternalServerError,
    JobFailedError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RagadaptError,
    RateLimitError,
    RequestTimeoutError,
    RunCancelledError,
    RunFailedError,
    ServiceUnavailableError,
    UnprocessableEntityError,
    WaitTimeoutError,
)
from ragadapt_client.models import (
    AdapterVersion,
    Answer,
    Checkpoint,
    DomainCreated,
    DomainInfo,
    GcReport,
    Health,
    Hyperparameters,
    IndexVersion,
    JobInfo,
    LoraSpec,
    LoraSpecs,
    Passage,
    Readiness,
    RunEvent,
    RunEvents,
    RunInfo,
    RunResources,
)
from ragadapt_client.retries import RetryPolicy

__all__ = [
    "APIConnectionError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AdapterVersion",
    "Answer",
    "AsyncClient",
    "AsyncJob",
    "AsyncRun",
    "AuthenticationError",
    "BadRequestError",
    "Checkpoint",
    "Client",
    "ConflictError",
    "DomainCreated",
    "DomainInfo",
    "GatewayTimeoutError",
    "GcReport",
    "Health",
    "Hyperparameters",
    "IndexVersion",
    "InternalServerError",
    "Job",
    "JobFailedError",
    "JobInfo",
    "LoraSpec",
    "LoraSpecs",
    "NotFoundError",
    "Passage",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RagadaptError",
    "RateLimitError",
    "Readiness",
    "RequestTimeoutError",
    "RetryPolicy",
    "Run",
    "RunCancelledError",
    "RunEvent",
    "RunEvents",
    "RunFailedError",
    "RunInfo",
    "RunResources",
    "ServiceUnavailableError",
    "UnprocessableEntityError",
    "WaitTimeoutError",
    "__version__",
]
