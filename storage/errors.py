"""Typed errors of the artifact store and the domain registry.

Each error carries a stable ``code`` (what clients dispatch on) and a ``status`` hint the service's
exception handler turns into an RFC 9457 problem response. Messages are for people, never parsed.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of every error raised by ``storage``."""

    code: str = "store_error"
    status: int = 500


class InvalidKey(StoreError):
    """An object key that is empty, absolute, escapes the store root, or clashes on a local filesystem."""

    code = "invalid_key"
    status = 400


class ObjectNotFound(StoreError):
    """The object does not exist."""

    code = "object_not_found"
    status = 404


class PreconditionFailed(StoreError):
    """A conditional write lost: the object changed (or appeared) since the caller read it."""

    code = "version_conflict"
    status = 409


class StoreUnavailable(StoreError):
    """The store cannot be reached (server down, network error, bucket or directory unusable)."""

    code = "store_unavailable"
    status = 503


class StoreAuthError(StoreError):
    """The store rejected our credentials or our signature: a configuration problem, not a transient one."""

    code = "store_auth_failed"
    status = 502


class IntegrityError(StoreError):
    """Downloaded bytes do not match the checksum recorded in the manifest."""

    code = "checksum_mismatch"
    status = 500


class InvalidDomainName(StoreError):
    """A domain name outside ``^[a-z0-9][a-z0-9_-]{0,62}$``."""

    code = "invalid_domain_name"
    status = 422


class DomainExists(StoreError):
    """``create_domain`` for a name that is already taken."""

    code = "domain_exists"
    status = 409


class DomainNotFound(StoreError):
    """The domain has no ``domain.json``."""

    code = "domain_not_found"
    status = 404


class VersionNotFound(StoreError):
    """No complete (manifest-bearing) artifact version with that id."""

    code = "version_not_found"
    status = 404


class NothingToRollback(StoreError):
    """The live pointer has no earlier state to return to."""

    code = "nothing_to_rollback"
    status = 409
