"""The embedded store: grants in a YAML policy file (``ACCESS_POLICY_FILE``), watched and reloaded.

File shape (CONTRACT §9): ``grants: [{id?, tenant_id, subject, action, resource, effect, expires_at?}]``.
Grants without an ``id`` get a stable one derived from their content (``h`` + 10 hex digits).

Watching: the file's (mtime, size, inode) is polled every ``poll_s`` (0.25 s by default) — no new dependency,
works on every filesystem, and an atomic rename by an editor or by ``accessd grants`` changes the inode.
A changed file is parsed off the event loop and swapped in atomically; a malformed file on reload keeps the
last good grants and logs one line naming the problem. At start a malformed file is a ConfigError naming
ACCESS_POLICY_FILE (exit 2).

Edits (grants API, ``accessd grants``) take an exclusive ``flock`` on ``<file>.lock``, re-read the file,
write a temporary file in the same directory and ``rename`` it over the original, so readers see the old or
the new file, never half of one. Comments and formatting of a hand-written file are not preserved.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import trio
import yaml

from ...errors import ConfigError
from ._evaluate import GrantIndex
from ._model import DecisionInput, Grant, InvalidInput, format_time, parse_grant
from ._version import PolicyVersion

log = logging.getLogger("accessd.policy")

SETTING = "ACCESS_POLICY_FILE"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def parse_policy(text: bytes) -> tuple[str, list[Grant], list[dict[str, Any]]]:
    """``(version, grants, raw entries)`` from the file's bytes; InvalidInput names the bad field."""
    version = "f" + hashlib.sha256(text).hexdigest()[:16]
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise InvalidInput("file", f"not valid YAML: {str(exc).splitlines()[0]}") from exc
    if data is None:
        data = {"grants": []}
    if not isinstance(data, dict):
        raise InvalidInput("file", "expected a mapping with a 'grants' list")
    for key in data:
        if key != "grants":
            raise InvalidInput(str(key), "unknown top-level key (only 'grants')")
    raw = data.get("grants") or []
    if not isinstance(raw, list):
        raise InvalidInput("grants", "expected a list")
    grants: list[Grant] = []
    seen: set[str] = set()
    for i, entry in enumerate(raw):
        grant = parse_grant(entry, where=f"grants[{i}].")
        if not grant.id:
            grant = _with_id(grant, _content_id(grant))
            n = 1
            while grant.id in seen:
                grant = _with_id(grant, f"{_content_id(grant)}.{n}")
                n += 1
        elif grant.id in seen:
            raise InvalidInput(f"grants[{i}].id", f"duplicate id {grant.id!r}")
        seen.add(grant.id)
        grants.append(grant)
    return version, grants, raw


def check_policy_file(path: Path) -> list[Grant]:
    """The grants of a policy file (``accessd check-config``); ConfigError naming ACCESS_POLICY_FILE."""
    try:
        return parse_policy(path.read_bytes())[1]
    except InvalidInput as exc:
        raise ConfigError(SETTING, f"{path}: {exc}") from exc
    except OSError as exc:
        raise ConfigError(SETTING, f"cannot read {path}: {exc.strerror}") from exc


def _content_id(grant: Grant) -> str:
    body = json.dumps(
        [grant.tenant_id, grant.subject, grant.action, grant.resource, grant.effect, grant.expires_at]
    )
    return "h" + hashlib.sha1(body.encode()).hexdigest()[:10]


def _with_id(grant: Grant, grant_id: str) -> Grant:
    return Grant(
        grant_id, grant.tenant_id, grant.subject, grant.action, grant.resource, grant.effect, grant.expires_at
    )


def _file_entry(grant: Grant) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": grant.id,
        "tenant_id": grant.tenant_id,
        "subject": grant.subject,
        "action": grant.action,
        "resource": grant.resource,
        "effect": grant.effect,
    }
    if grant.expires_at is not None:
        entry["expires_at"] = format_time(grant.expires_at)
    return entry


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class _Snapshot:
    def __init__(self, version: str, grants: list[Grant]) -> None:
        self.version = version
        self.index = GrantIndex(grants)


class FileStore:
    """Grants from a YAML file, reloaded on change.

    Cancellation: the watcher is a plain poll loop. Errors: a malformed file at start is a ConfigError;
    later it is logged once and the last good grants stay.
    """

    kind = "file"
    name = "entitlements-file"
    # The version is a hash of the whole file, and a decision a pure function of the grants (ids included)
    # and the input: two file stores with the same version answer alike, so sharing entries is harmless.
    epoch = "file"

    def __init__(self, path: Path, *, poll_s: float = 0.25) -> None:
        self.path = path
        self._poll_s = poll_s
        self._snapshot = _Snapshot("empty", [])
        self._signature: tuple[int, int, int] | None = None
        self._bad_signature: tuple[int, int, int] | None = None
        self.version = PolicyVersion("empty")

    # --- loading ---

    async def load(self) -> None:
        """(Re)load now. Errors: ConfigError naming ACCESS_POLICY_FILE when the file is unusable."""
        try:
            signature, version, grants = await trio.to_thread.run_sync(self._read)
        except InvalidInput as exc:
            raise ConfigError(SETTING, f"{self.path}: {exc}") from exc
        except OSError as exc:
            raise ConfigError(SETTING, f"cannot read {self.path}: {exc.strerror or exc}") from exc
        self._install(signature, version, grants)

    def _read(self) -> tuple[tuple[int, int, int] | None, str, list[Grant]]:
        signature = _signature(self.path)
        version, grants, _ = parse_policy(self.path.read_bytes())
        return signature, version, grants

    def _install(self, signature: tuple[int, int, int] | None, version: str, grants: list[Grant]) -> None:
        self._signature = signature
        self._bad_signature = None
        if version != self._snapshot.version:
            self._snapshot = _Snapshot(version, grants)
            self.version.set(version)
            log.info("policy file %s loaded: %d grants (version %s)", self.path, len(grants), version)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        await self.load()
        task_status.started()
        while True:
            await trio.sleep(self._poll_s)
            signature = _signature(self.path)
            if signature == self._signature or signature is None or signature == self._bad_signature:
                continue
            try:
                signature, version, grants = await trio.to_thread.run_sync(self._read)
            except (InvalidInput, OSError) as exc:
                self._bad_signature = signature
                log.error(
                    "policy file %s rejected, keeping the last good grants (version %s): %s",
                    self.path,
                    self._snapshot.version,
                    exc,
                )
                continue
            self._install(signature, version, grants)

    # --- the GrantStore interface ---

    async def lookup(self, inp: DecisionInput) -> tuple[str, list[Grant]]:
        snapshot = self._snapshot
        return snapshot.version, snapshot.index.candidates(inp)

    async def lookup_under(self, inp: DecisionInput) -> tuple[str, list[Grant]]:
        snapshot = self._snapshot
        return snapshot.version, snapshot.index.candidates_under(inp)

    def is_newer(self, a: str, b: str) -> bool:
        return a == self._snapshot.version and a != b

    @property
    def grants(self) -> tuple[Grant, ...]:
        return self._snapshot.index.grants

    async def list_grants(self, tenant_id: str | None) -> list[Grant]:
        return [g for g in self._snapshot.index.grants if tenant_id is None or g.tenant_id == tenant_id]

    async def add(self, grant: Grant) -> Grant:
        def mutate(grants: list[Grant]) -> Grant:
            if grant.id:
                raise InvalidInput("id", "assigned by the store; omit it")
            numeric = [int(g.id) for g in grants if g.id.isdigit()]
            stored = _with_id(grant, str(max(numeric, default=0) + 1))
            grants.append(stored)
            return stored

        return await self._edit(mutate)

    async def revoke(self, grant_id: str, tenant_id: str | None = None) -> Grant | None:
        def mutate(grants: list[Grant]) -> Grant | None:
            for i, g in enumerate(grants):
                if g.id == grant_id and (tenant_id is None or g.tenant_id == tenant_id):
                    return grants.pop(i)
            return None

        return await self._edit(mutate)

    async def _edit(self, mutate: Callable[[list[Grant]], Any]) -> Any:
        result, signature, version, grants = await trio.to_thread.run_sync(self._edit_sync, mutate)
        self._install(signature, version, grants)
        return result

    def _edit_sync(self, mutate: Callable[[list[Grant]], Any]) -> tuple[Any, Any, str, list[Grant]]:
        with _locked(self.path):
            try:
                _, grants, _ = parse_policy(self.path.read_bytes())
            except FileNotFoundError:
                grants = []
            except InvalidInput as exc:
                raise InvalidInput("file", f"{self.path} is malformed, fix it first ({exc})") from exc
            result = mutate(grants)
            text = yaml.dump({"grants": [_file_entry(g) for g in grants]}, Dumper=_Dumper, sort_keys=False)
            _atomic_write(self.path, text.encode())
            signature = _signature(self.path)
            version, grants, _ = parse_policy(text.encode())
            return result, signature, version, grants


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(OSError):
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
