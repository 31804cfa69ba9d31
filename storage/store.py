"""The artifact store: one object-store interface, two backends.

``LocalStore`` keeps objects in a directory (the embedded default, no server); ``S3Store`` talks to any
S3-compatible server (MinIO in production, SeaweedFS in tests, AWS). Both give the same guarantees:
whole-object atomic writes, conditional writes (``if_match`` / ``if_none_match``) that are safe across
threads and processes, ranged and streaming reads, and listings sorted by key.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import stat as stat_mode
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal
from urllib.parse import urlsplit

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError
from pydantic import BaseModel, ConfigDict, SecretStr, model_validator

from storage.errors import (
    InvalidKey,
    ObjectNotFound,
    PreconditionFailed,
    StoreAuthError,
    StoreError,
    StoreUnavailable,
)

_CHUNK = 1 << 20
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # matched whole
# S3 error codes that mean "your credentials or signature are wrong", as opposed to a missing object.
_AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "InvalidToken",
        "ExpiredToken",
        "AuthorizationHeaderMalformed",
    }
)
_UNAVAILABLE_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"})


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one object. ``etag`` is the value conditional writes compare against."""

    key: str
    size: int
    etag: str
    last_modified: datetime


def check_key(key: str) -> str:
    """Return ``key`` if it is safe: relative, ``/``-separated, without empty, ``.`` or ``..`` segments."""
    if not isinstance(key, str) or not key:
        raise InvalidKey("an object key must be a non-empty string")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise InvalidKey(f"object key {key!r} must be relative, '/'-separated and free of NUL bytes")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise InvalidKey(f"object key {key!r} has an empty, '.' or '..' segment")
    return key


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is a valid listing prefix: empty, or a key start that cannot escape."""
    if prefix == "":
        return prefix
    if prefix.startswith("/") or "\\" in prefix or "\x00" in prefix:
        raise InvalidKey(f"prefix {prefix!r} must be relative, '/'-separated and free of NUL bytes")
    *dirs, last = prefix.split("/")
    if any(part in ("", ".", "..") for part in dirs) or last in (".", ".."):
        raise InvalidKey(f"prefix {prefix!r} has an empty, '.' or '..' segment")
    return prefix


def _check_conditions(if_match: str | None, if_none_match: bool) -> None:
    if if_match is not None and if_none_match:
        raise ValueError("if_match and if_none_match are mutually exclusive")


def _unquote(etag: str) -> str:
    return etag.strip().strip('"')


class ObjectStore(ABC):
    """Flat key/value object storage with S3 semantics, implemented by ``LocalStore`` and ``S3Store``."""

    @abstractmethod
    def put_bytes(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> ObjectInfo:
        """Write ``data`` atomically.

        ``if_match``: only if the current ETag equals it (so the object must exist); ``if_none_match``: only
        if the key does not exist yet. A condition that does not hold raises ``PreconditionFailed``.
        """

    @abstractmethod
    def put_file(self, key: str, path: Path) -> ObjectInfo:
        """Upload a local file without loading it into memory (multipart on S3 for big files)."""

    @abstractmethod
    def get_bytes(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        """``length`` bytes from ``offset`` (to the end if ``length`` is None); past the end: b""."""

    @abstractmethod
    def read(self, key: str) -> tuple[bytes, ObjectInfo]:
        """The whole object together with the ETag of exactly these bytes (for read-modify-write)."""

    @abstractmethod
    def get_file(self, key: str, path: Path) -> ObjectInfo:
        """Stream an object into ``path``; ``path`` is replaced atomically, never left half-written."""

    @abstractmethod
    def iter_chunks(self, key: str, chunk_size: int = _CHUNK) -> Iterator[bytes]:
        """Stream an object in chunks of at most ``chunk_size`` bytes. A missing key raises at call time."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size, ETag and modification time of an object."""

    def exists(self, key: str) -> bool:
        """Whether the object exists."""
        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True

    @abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (recursive), sorted by key."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; removing a missing object is not an error."""

    @abstractmethod
    def ping(self) -> None:
        """Check the store is usable now; raise ``StoreUnavailable`` or ``StoreAuthError`` if not."""

    @abstractmethod
    def describe(self) -> str:
        """Where the objects live, for logs (no secrets)."""

    def name(self) -> str:
        """What the store is, for clients (health output, error details): no secrets and no server paths."""
        return self.describe()

    @staticmethod
    def _check_range(offset: int, length: int | None) -> None:
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"invalid byte range offset={offset} length={length}")


class StoreConfig(BaseModel):
    """Which store to open. Built by the service from its settings, or directly by tests."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal["local", "s3"] = "local"
    root: Path | None = None
    endpoint: str | None = None
    bucket: str = "ragadapt"
    access_key: str | None = None
    secret_key: SecretStr | None = None
    secure: bool = False
    region: str | None = None
    ca_file: Path | None = None
    connect_timeout: float = 3.0
    read_timeout: float = 60.0
    retries: int = 2

    @model_validator(mode="before")
    @classmethod
    def _secure_from_scheme(cls, data: Any) -> Any:
        """An ``http(s)://`` endpoint decides ``secure`` unless it is set (and must agree when it is)."""
        if not isinstance(data, dict) or not isinstance(data.get("endpoint"), str):
            return data
        scheme = urlsplit(data["endpoint"]).scheme if "://" in data["endpoint"] else ""
        if scheme not in ("", "http", "https"):
            raise ValueError(f"store endpoint scheme must be http or https, got {scheme!r}")
        if scheme and data.get("secure") is None:
            return {**data, "secure": scheme == "https"}
        return data

    @model_validator(mode="after")
    def _check_backend_fields(self) -> StoreConfig:
        if self.backend == "local":
            if self.root is None:
                raise ValueError("the local store needs 'root'")
            return self
        if not self.endpoint:
            raise ValueError("the s3 store needs 'endpoint' (host:port or an http(s) URL)")
        if "://" in self.endpoint and (urlsplit(self.endpoint).scheme == "https") != self.secure:
            raise ValueError(f"endpoint {self.endpoint!r} contradicts secure={self.secure}")
        if not self.access_key or self.secret_key is None:
            raise ValueError("the s3 store needs 'access_key' and 'secret_key'")
        if not _BUCKET_NAME.fullmatch(self.bucket):
            raise ValueError(f"{self.bucket!r} is not a valid S3 bucket name")
        if self.connect_timeout <= 0 or self.read_timeout <= 0 or self.retries < 0:
            raise ValueError("timeouts must be positive and retries non-negative")
        return self


class LocalStore(ObjectStore):
    """Objects as files under ``root/objects``; the embedded default.

    Writes go to ``root/tmp`` first and are renamed into place, so readers never see a partial object.
    Every rename happens under an ``flock`` on ``root/store.lock``; that makes conditional writes atomic
    across threads (each call opens its own file description) and across processes. The MD5 ETag is
    kept in a sidecar under ``root/meta`` together with the inode, size and mtime it describes, so a file
    changed behind the store's back gets its ETag recomputed instead of trusted.
    """

    def __init__(self, root: Path) -> None:
        self._root = Path(root).absolute()
        self._objects = self._root / "objects"
        self._meta = self._root / "meta"
        self._tmp = self._root / "tmp"
        self._lock_path = self._root / "store.lock"
        try:
            for directory in (self._objects, self._meta, self._tmp):
                directory.mkdir(parents=True, exist_ok=True)
            self._lock_path.touch(exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot use the local store: {exc.strerror}") from exc

    def describe(self) -> str:
        return f"local:{self._root}"

    def name(self) -> str:
        return "local"

    def ping(self) -> None:
        if not (
            self._objects.is_dir() and os.access(self._objects, os.W_OK) and os.access(self._tmp, os.W_OK)
        ):
            raise StoreUnavailable("the local store's directory is missing or not writable")

    # -- writes -------------------------------------------------------------------------------------

    def put_bytes(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> ObjectInfo:
        check_key(key)
        _check_conditions(if_match, if_none_match)
        staged, etag = self._stage([bytes(data)])
        return self._commit(key, staged, etag, if_match=if_match, if_none_match=if_none_match)

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        check_key(key)
        with open(path, "rb") as src:
            staged, etag = self._stage(iter(lambda: src.read(_CHUNK), b""))
        return self._commit(key, staged, etag, if_match=None, if_none_match=False)

    def delete(self, key: str) -> None:
        path, meta = self._paths(key)
        with self._locked():
            for file, top in ((path, self._objects), (meta, self._meta)):
                try:
                    file.unlink()
                except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                    continue
                self._prune(file.parent, top)

    # -- reads --------------------------------------------------------------------------------------

    def stat(self, key: str) -> ObjectInfo:
        path, meta = self._paths(key)
        with self._open(key, path) as fh:
            st = os.fstat(fh.fileno())
            return ObjectInfo(key, st.st_size, self._etag(fh, st, meta), _mtime(st))

    def get_bytes(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        self._check_range(offset, length)
        path, _ = self._paths(key)
        with self._open(key, path) as fh:
            fh.seek(offset)
            return fh.read() if length is None else fh.read(length)

    def read(self, key: str) -> tuple[bytes, ObjectInfo]:
        path, meta = self._paths(key)
        with self._open(key, path) as fh:
            st = os.fstat(fh.fileno())
            data = fh.read()
            return data, ObjectInfo(key, len(data), self._etag(fh, st, meta), _mtime(st))

    def iter_chunks(self, key: str, chunk_size: int = _CHUNK) -> Iterator[bytes]:
        path, _ = self._paths(key)
        return self._read_chunks(self._open(key, path), chunk_size)

    def get_file(self, key: str, path: Path) -> ObjectInfo:
        source, _ = self._paths(key)
        path = Path(path)
        with self._open(key, source) as fh:
            st = os.fstat(fh.fileno())
            etag = _write_atomically(path, iter(lambda: fh.read(_CHUNK), b""))
        return ObjectInfo(key, st.st_size, etag, _mtime(st))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        head = prefix.rpartition("/")[0]
        base = self._objects / head if head else self._objects
        keys = []
        for dirpath, _, filenames in os.walk(base):
            rel = Path(dirpath).relative_to(self._objects).as_posix()
            keys.extend(name if rel == "." else f"{rel}/{name}" for name in filenames)
        return self._infos(sorted(key for key in keys if key.startswith(prefix)))

    # -- internals ----------------------------------------------------------------------------------

    def _paths(self, key: str) -> tuple[Path, Path]:
        check_key(key)
        return self._objects / key, self._meta / key

    def _open(self, key: str, path: Path) -> BinaryIO:
        try:
            fh = open(path, "rb")  # noqa: SIM115 - the caller reads and closes it
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise ObjectNotFound(f"object {key!r} not found in the store") from exc
        if not stat_mode.S_ISREG(os.fstat(fh.fileno()).st_mode):
            fh.close()
            raise ObjectNotFound(f"object {key!r} not found in the store")
        return fh

    @staticmethod
    def _read_chunks(fh: BinaryIO, chunk_size: int) -> Iterator[bytes]:
        with fh:
            while chunk := fh.read(chunk_size):
                yield chunk

    def _infos(self, keys: Iterable[str]) -> Iterator[ObjectInfo]:
        for key in keys:
            try:
                yield self.stat(key)
            except ObjectNotFound:
                continue  # deleted while we were listing

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # A fresh open() per call: flock then excludes other threads of this process too.
        with open(self._lock_path, "rb") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _stage(self, chunks: Iterable[bytes]) -> tuple[Path, str]:
        """Write ``chunks`` to a durable temp file; return it with its MD5 (the S3 single-part ETag)."""
        fd, name = tempfile.mkstemp(dir=self._tmp, prefix="put-")
        md5 = hashlib.md5()
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    md5.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return Path(name), md5.hexdigest()

    def _commit(
        self, key: str, staged: Path, etag: str, *, if_match: str | None, if_none_match: bool
    ) -> ObjectInfo:
        path, meta = self._paths(key)
        st = staged.stat()  # rename keeps inode and mtime, so this is what the sidecar must describe
        record = {"etag": etag, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
        leftovers = [staged]
        try:
            fd, meta_name = tempfile.mkstemp(dir=self._tmp, prefix="meta-")
            leftovers.append(Path(meta_name))
            with os.fdopen(fd, "w") as out:
                json.dump(record, out)
            with self._locked():
                if if_none_match or if_match is not None:
                    current = self._current_etag(path, meta)
                    if if_none_match and current is not None:
                        raise PreconditionFailed(f"object {key!r} already exists")
                    if if_match is not None and current != _unquote(if_match):
                        state = "does not exist" if current is None else f"has ETag {current!r}"
                        raise PreconditionFailed(f"object {key!r} {state}, not {_unquote(if_match)!r}")
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    meta.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(staged, path)
                except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
                    raise InvalidKey(
                        f"object key {key!r} clashes with an existing object or prefix in the store"
                    ) from exc
                os.replace(meta_name, meta)
                leftovers.clear()
        finally:
            for leftover in leftovers:
                leftover.unlink(missing_ok=True)
        return ObjectInfo(key, st.st_size, etag, _mtime(st))

    def _current_etag(self, path: Path, meta: Path) -> str | None:
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed by the with below
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        with fh:
            return self._etag(fh, os.fstat(fh.fileno()), meta)

    @staticmethod
    def _etag(fh: BinaryIO, st: os.stat_result, meta: Path) -> str:
        try:
            record = json.loads(meta.read_text())
            if (record["size"], record["mtime_ns"], record["ino"]) == (st.st_size, st.st_mtime_ns, st.st_ino):
                return str(record["etag"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        md5 = hashlib.md5()  # sidecar missing or stale: the file changed outside the store
        fh.seek(0)
        while chunk := fh.read(_CHUNK):
            md5.update(chunk)
        return md5.hexdigest()

    @staticmethod
    def _prune(directory: Path, top: Path) -> None:
        """Remove now-empty parent directories of a deleted object, up to (not including) ``top``."""
        while directory != top:
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent


class S3Store(ObjectStore):
    """Objects in one bucket of an S3-compatible server, through the ``minio`` SDK.

    The HTTP pool uses short connect timeouts and few retries so a dead server fails in seconds. Reads
    that fail half-way are not retried (a retried conditional PUT whose first attempt landed would report
    a false conflict). The bucket is created on first use if it is missing.
    """

    def __init__(self, config: StoreConfig) -> None:
        if config.backend != "s3" or config.endpoint is None or config.secret_key is None:
            raise ValueError("S3Store needs a StoreConfig with backend='s3'")
        endpoint = config.endpoint
        self._host = urlsplit(endpoint).netloc if "://" in endpoint else endpoint.rstrip("/")
        self._secure = config.secure
        self._bucket = config.bucket
        self._region = config.region
        self._access_key = config.access_key
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=config.connect_timeout, read=config.read_timeout),
            maxsize=16,
            cert_reqs="CERT_REQUIRED",
            ca_certs=str(config.ca_file) if config.ca_file else certifi.where(),
            retries=urllib3.Retry(
                total=config.retries,
                connect=config.retries,
                read=0,
                status=config.retries,
                backoff_factor=0.2,
                status_forcelist=(500, 502, 503, 504),
            ),
        )
        self._client = Minio(
            self._host,
            access_key=config.access_key,
            secret_key=config.secret_key.get_secret_value(),
            secure=config.secure,
            region=config.region,
            http_client=http,
        )
        self._bucket_ready = False
        self._bucket_lock = threading.Lock()

    def describe(self) -> str:
        return f"s3://{self._bucket}@{self._host}" + (" (tls)" if self._secure else "")

    def ping(self) -> None:
        self._ensure_bucket(check=True)

    # -- writes -------------------------------------------------------------------------------------

    def put_bytes(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> ObjectInfo:
        check_key(key)
        _check_conditions(if_match, if_none_match)
        data = bytes(data)
        headers = {"Content-Type": "application/octet-stream"}
        if if_none_match:
            headers["If-None-Match"] = "*"
        if if_match is not None:
            headers["If-Match"] = f'"{_unquote(if_match)}"'  # SeaweedFS refuses an unquoted ETag here
        self._ensure_bucket()
        with self._errors(key, conditional=if_match is not None):
            # The public put_object() turns unknown headers into x-amz-meta-* user metadata, so the
            # conditional headers go through the SDK's single-part PUT, which sends them verbatim.
            result = self._client._put_object(self._bucket, key, data, headers=headers)
        return ObjectInfo(key, len(data), _unquote(result.etag or ""), _http_date(result.http_headers))

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        check_key(key)
        self._ensure_bucket()
        with self._errors(key):
            self._client.fput_object(self._bucket, key, str(path))
        # A multipart ETag is not the content MD5, and servers need not report the same one on PUT and
        # HEAD; stat so callers hold the ETag a later If-Match is compared against.
        return self.stat(key)

    def delete(self, key: str) -> None:
        check_key(key)
        self._ensure_bucket()
        with self._errors(key):
            self._client.remove_object(self._bucket, key)

    # -- reads --------------------------------------------------------------------------------------

    def stat(self, key: str) -> ObjectInfo:
        check_key(key)
        self._ensure_bucket()
        with self._errors(key):
            obj = self._client.stat_object(self._bucket, key)
        return ObjectInfo(key, int(obj.size or 0), _unquote(obj.etag or ""), _aware(obj.last_modified))

    def get_bytes(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        check_key(key)
        self._check_range(offset, length)
        if length == 0:
            self.stat(key)  # still report a missing object
            return b""
        self._ensure_bucket()
        with self._errors(key):
            try:
                response = self._client.get_object(self._bucket, key, offset=offset, length=length or 0)
            except S3Error as exc:
                if exc.code != "InvalidRange":
                    raise
                return b""  # the range starts at or past the end of the object
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

    def read(self, key: str) -> tuple[bytes, ObjectInfo]:
        check_key(key)
        response = self._get(key)
        try:
            with self._errors(key):
                data = response.read()
        finally:
            response.close()
            response.release_conn()
        headers = response.headers
        info = ObjectInfo(
            key, len(data), _unquote(headers.get("etag", "")), _http_date(headers, "last-modified")
        )
        return data, info

    def iter_chunks(self, key: str, chunk_size: int = _CHUNK) -> Iterator[bytes]:
        check_key(key)
        return self._stream(key, self._get(key), chunk_size)

    def get_file(self, key: str, path: Path) -> ObjectInfo:
        check_key(key)
        response = self._get(key)
        headers = response.headers
        _write_atomically(Path(path), self._stream(key, response, _CHUNK))
        return ObjectInfo(
            key,
            int(headers.get("content-length", 0)),
            _unquote(headers.get("etag", "")),
            _http_date(headers, "last-modified"),
        )

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        self._ensure_bucket()
        with self._errors(None):
            infos = [
                ObjectInfo(
                    obj.object_name, int(obj.size or 0), _unquote(obj.etag or ""), _aware(obj.last_modified)
                )
                for obj in self._client.list_objects(self._bucket, prefix=prefix or None, recursive=True)
                if obj.object_name and not obj.is_dir
            ]
        # Sort here: SeaweedFS lists a directory's subtree before its siblings ("a/y/z" before "a/y-1"),
        # not in the byte order AWS and MinIO use.
        infos.sort(key=lambda info: info.key)
        return iter(infos)

    # -- internals ----------------------------------------------------------------------------------

    def _get(self, key: str) -> Any:
        """Start a whole-object GET; the caller streams and releases the response."""
        self._ensure_bucket()
        with self._errors(key):
            return self._client.get_object(self._bucket, key)

    def _stream(self, key: str, response: Any, chunk_size: int) -> Iterator[bytes]:
        try:
            with self._errors(key):
                yield from response.stream(chunk_size)
        finally:
            response.close()
            response.release_conn()

    def _ensure_bucket(self, *, check: bool = False) -> None:
        """Create the bucket if it is missing, once per store (every time when ``check``)."""
        if self._bucket_ready and not check:
            return
        with self._bucket_lock, self._errors(None):
            if self._bucket_ready and not check:
                return
            if not self._client.bucket_exists(self._bucket):
                try:
                    self._client.make_bucket(self._bucket, location=self._region)
                except S3Error as exc:
                    # Another client won the race (SeaweedFS may also accept a duplicate silently).
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
            self._bucket_ready = True

    @contextlib.contextmanager
    def _errors(self, key: str | None, *, conditional: bool = False) -> Iterator[None]:
        """Translate SDK and transport exceptions into ``storage.errors``."""
        try:
            yield
        except S3Error as exc:
            raise self._translate(exc, key, conditional) from exc
        except (ServerError, InvalidResponseError) as exc:
            raise StoreUnavailable(f"{self.describe()} answered with an error: {exc}") from exc
        except urllib3.exceptions.MaxRetryError as exc:
            raise StoreUnavailable(f"{self.describe()} is unreachable: {exc.reason}") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise StoreUnavailable(f"{self.describe()} is unreachable: {exc}") from exc

    def _translate(self, exc: S3Error, key: str | None, conditional: bool) -> StoreError:
        code = exc.code
        if code in ("NoSuchKey", "NoSuchObject"):
            if conditional:
                return PreconditionFailed(f"object {key!r} does not exist, so the If-Match write was refused")
            return ObjectNotFound(f"object {key!r} not found in {self.describe()}")
        if code == "PreconditionFailed":
            return PreconditionFailed(f"object {key!r} changed since it was read; conditional write refused")
        if code in _AUTH_CODES:
            return StoreAuthError(
                f"{self.describe()} rejected access key {self._access_key!r}: {code} ({exc.message}); "
                "check the store's access key and secret key"
            )
        if code == "NoSuchBucket":
            self._bucket_ready = False
            return StoreUnavailable(f"bucket {self._bucket!r} does not exist at {self._host}")
        if code in _UNAVAILABLE_CODES:
            return StoreUnavailable(f"{self.describe()} is unavailable: {code} ({exc.message})")
        return StoreError(f"{self.describe()} failed on {key!r}: {code} ({exc.message})")


def open_store(config: StoreConfig) -> ObjectStore:
    """Build the store ``config`` describes. No network I/O happens until the first operation."""
    if config.backend == "local":
        assert config.root is not None  # guaranteed by StoreConfig validation
        return LocalStore(config.root)
    return S3Store(config)


def _write_atomically(path: Path, chunks: Iterable[bytes]) -> str:
    """Write ``chunks`` to a temp file next to ``path``, then rename it over ``path``. Returns the MD5."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    md5 = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                md5.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return md5.hexdigest()


def _mtime(st: os.stat_result) -> datetime:
    return datetime.fromtimestamp(st.st_mtime, tz=UTC)


def _aware(moment: datetime | None) -> datetime:
    if moment is None:
        return datetime.now(UTC)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _http_date(headers: Any, name: str = "date") -> datetime:
    value = headers.get(name) if headers is not None else None
    if not value:
        return datetime.now(UTC)
    return _aware(parsedate_to_datetime(value))
