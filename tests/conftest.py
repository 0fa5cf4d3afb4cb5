"""Fixtures for real services and real daemons. See tests/_services.py for how each service is found."""

from __future__ import annotations

import resource
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ._daemon import Daemon, start_daemon
from ._jwks import JwksServer
from ._services import ServiceMissing, kafka_service, postgres_service, redis_service


def _service(
    factory: Callable[[Path], Any], tmp_path_factory: pytest.TempPathFactory, name: str
) -> Iterator[str]:
    try:
        with factory(tmp_path_factory.mktemp(name)) as address:
            yield address
    except ServiceMissing as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _enough_file_descriptors() -> None:
    """Streaming tests hold a thousand client and server sockets in one process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 16384 if hard == resource.RLIM_INFINITY else min(hard, 16384)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _service(redis_service, tmp_path_factory, "redis")


@pytest.fixture(scope="session")
def postgres_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh database for this test session."""
    yield from _service(postgres_service, tmp_path_factory, "postgres")


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _service(kafka_service, tmp_path_factory, "kafka")


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """``daemon_factory(role=..., env={...})`` starts ``accessd run``; every daemon is stopped after the test."""
    started: list[Daemon] = []

    def start(**kwargs: Any) -> Daemon:
        daemon = start_daemon(tmp_path, **kwargs)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()
