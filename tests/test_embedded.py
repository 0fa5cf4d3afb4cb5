"""The last-resort servers of tests/_embedded.py really start, answer a client, and stop without leftovers.

Sync on purpose (trio_mode would run async tests under trio; asyncpg needs asyncio.run).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from pathlib import Path

import pytest
import redis

from ._embedded import (
    POSTGRES_WHEELS,
    REDIS_WHEELS,
    EmbeddedServer,
    EmbeddedUnavailable,
    start_postgres,
    start_redis,
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(stat.parent.name))
    return found


def _assert_stops_cleanly(server: EmbeddedServer) -> None:
    children = _children(server.pid)
    temp_dirs = list(server.cleanup)
    server.stop()
    assert server.process.returncode is not None
    assert not _alive(server.pid)
    assert [pid for pid in children if _alive(pid)] == []
    assert [d for d in temp_dirs if d.exists()] == []
    server.stop()  # idempotent


def _redis_round_trip(server: EmbeddedServer) -> None:
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    client = redis.Redis.from_url(server.url)
    try:
        client.set("embedded:k", "v")
        assert client.get("embedded:k") == b"v"
    finally:
        client.close()


def _postgres_round_trip(server: EmbeddedServer) -> None:
    import asyncpg

    assert server.url == f"postgresql://postgres@127.0.0.1:{server.port}/postgres"

    async def round_trip() -> list[int]:
        conn = await asyncpg.connect(server.url, timeout=10)
        try:
            await conn.execute("CREATE TABLE embedded_t (n int)")
            await conn.execute("INSERT INTO embedded_t VALUES (1), (2)")
            return [row["n"] for row in await conn.fetch("SELECT n FROM embedded_t ORDER BY n")]
        finally:
            await conn.close()

    assert asyncio.run(round_trip()) == [1, 2]


def test_redis_from_path(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis")  # PATH first; on a bare machine the dev extra's wheel
    try:
        _redis_round_trip(server)
    finally:
        _assert_stops_cleanly(server)


def test_postgres_from_path(tmp_path: Path) -> None:
    server = start_postgres(tmp_path / "pg")  # tmp_path sits in 0700 /tmp/pytest-of-root when root
    try:
        _postgres_round_trip(server)
    finally:
        _assert_stops_cleanly(server)


def _require_one_of(modules: tuple[str, ...]) -> None:
    # The dev extra installs these wheels; their absence is a broken install, not a reason to skip.
    if not any(importlib.util.find_spec(m) for m in modules):
        pytest.fail(f"none of {modules} installed: run `pip install -e '.[dev]'`", pytrace=False)


def test_redis_from_wheel(tmp_path: Path) -> None:
    _require_one_of(REDIS_WHEELS)
    (tmp_path / "empty").mkdir()
    server = start_redis(tmp_path / "redis", search_path=str(tmp_path / "empty"))
    try:
        _redis_round_trip(server)
    finally:
        _assert_stops_cleanly(server)


def test_postgres_from_wheel(tmp_path: Path) -> None:
    _require_one_of(POSTGRES_WHEELS)
    (tmp_path / "empty").mkdir()
    server = start_postgres(tmp_path / "pg", search_path=str(tmp_path / "empty"))
    try:
        _postgres_round_trip(server)
    finally:
        _assert_stops_cleanly(server)


def _fake_server(bindir: Path, script: str) -> str:
    bindir.mkdir()
    fake = bindir / "redis-server"
    fake.write_text("#!/bin/sh\n" + script)
    fake.chmod(0o755)
    return str(bindir)


def test_early_exit_reports_log_tail(tmp_path: Path) -> None:
    search_path = _fake_server(tmp_path / "bin", "echo 'boom: bad config' >&2\nexit 3\n")
    with pytest.raises(EmbeddedUnavailable, match=r"(?s)exited with code 3.*boom: bad config"):
        start_redis(tmp_path / "work", search_path=search_path)


def test_startup_timeout_kills_server(tmp_path: Path) -> None:
    search_path = _fake_server(tmp_path / "bin", 'echo "pid $$"\nexec sleep 60\n')
    with pytest.raises(EmbeddedUnavailable, match=r"not ready in 0.5s") as raised:
        start_redis(tmp_path / "work", search_path=search_path, timeout=0.5)
    pid = int(str(raised.value).split("pid ")[1].split()[0])
    assert not _alive(pid)
