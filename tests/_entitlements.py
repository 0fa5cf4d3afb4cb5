"""Helpers for the entitlement tests: private Postgres schemas, a cuttable TCP proxy, store fixtures."""

from __future__ import annotations

import asyncio
import secrets
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import trio
import trio_asyncio

from accessd.nurseries import Health
from accessd.policy.entitlements import (
    AdaptiveTtl,
    DecisionInput,
    Entitlements,
    FileStore,
    GrantStore,
    PostgresStore,
)

from ._services import execute_sql
from ._wait import eventually


async def run_sql(dsn: str, *statements: str) -> None:
    """Run statements on a private asyncio loop in a thread (independent of the code under test)."""
    await trio.to_thread.run_sync(lambda: asyncio.run(execute_sql(dsn, *statements)))


def with_query(dsn: str, **params: str) -> str:
    sep = "&" if "?" in dsn else "?"
    return dsn + sep + "&".join(f"{k}={v}" for k, v in params.items())


async def new_schema(postgres_dsn: str) -> str:
    """A DSN whose search_path is a fresh, empty schema: isolates a test inside the session database."""
    schema = f"ent_{secrets.token_hex(4)}"
    await run_sql(postgres_dsn, f"CREATE SCHEMA {schema}")
    return with_query(postgres_dsn, search_path=schema)


def empty_policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text("grants: []\n")
    return path


@asynccontextmanager
async def open_store(kind: str, *, postgres_dsn: str, tmp_path: Path) -> AsyncIterator[GrantStore]:
    """A started store (watcher running) inside a trio-asyncio loop."""
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        store: GrantStore
        if kind == "file":
            store = FileStore(empty_policy(tmp_path), poll_s=0.05)
        else:
            store = PostgresStore(await new_schema(postgres_dsn), timeout_s=2.0, keepalive_s=0.5)
        await nursery.start(store.run)
        if isinstance(store, PostgresStore):
            await eventually(lambda: store.listening, what="the store LISTENs for grant changes")
        yield store
        nursery.cancel_scope.cancel()


def entitlements(store: GrantStore, **kwargs: object) -> Entitlements:
    kwargs.setdefault("lru_size", 10_000)
    kwargs.setdefault("ttl", AdaptiveTtl(30, 120))
    return Entitlements(store, **kwargs)  # type: ignore[arg-type]


def health() -> Health:
    return Health(role="all")


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; ``cut()`` drops every connection and refuses new ones,
    ``restore()`` listens again on the same port. Threads, so it keeps working while a test blocks."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()

    def start(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        if self._listener is not None:
            with suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for sock in conns:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def restore(self) -> None:
        self.start()

    def stop(self) -> None:
        self.cut()


# A grant (as the REST API takes it) letting t1's traders read every curve.
GRANT = {
    "tenant_id": "t1",
    "subject": "role:trader",
    "action": "read",
    "resource": "curve:*",
    "effect": "allow",
}


def ask(
    resource: str = "curve:NG_2026",
    action: str = "read",
    *,
    user: str = "u1",
    tenant: str = "t1",
    roles: tuple[str, ...] = ("trader",),
) -> DecisionInput:
    return DecisionInput(user, tenant, action, resource, frozenset(roles))
