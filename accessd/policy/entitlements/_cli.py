"""``accessd grants add|list|revoke`` against the configured store (Postgres or the policy file)."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import AsyncExitStack

import trio

from ... import aio
from ...errors import BackendUnavailable, ConfigError
from ...settings import Settings
from ._build import build_store
from ._file_store import FileStore
from ._model import Grant, InvalidInput, parse_grant
from ._pg_store import PostgresStore
from ._store import EmptyStore, GrantStore

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


def add_grants_arguments(grants: argparse.ArgumentParser) -> None:
    commands = grants.add_subparsers(dest="grants_command", required=True, parser_class=type(grants))
    add = commands.add_parser("add", help="store one grant; prints it (with its id) as JSON")
    add.add_argument("--tenant", required=True, help="tenant_id")
    add.add_argument("--subject", required=True, help="user:<id>, role:<name> or *")
    add.add_argument("--action", required=True, help="read, write, subscribe, admin or *")
    add.add_argument("--resource", required=True, help="resource glob, e.g. curve:NG_*")
    add.add_argument("--effect", default="allow", choices=("allow", "deny"))
    add.add_argument("--expires-at", help="ISO 8601 time (UTC unless an offset is given)")
    listing = commands.add_parser("list", help="print grants as JSON lines")
    listing.add_argument("--tenant", help="only this tenant")
    revoke = commands.add_parser("revoke", help="delete one grant by id")
    revoke.add_argument("id")
    revoke.add_argument("--tenant", help="only if the grant belongs to this tenant")


def run_grants_cli(settings: Settings, args: argparse.Namespace) -> int:
    return trio.run(_main, settings, args)


async def _main(settings: Settings, args: argparse.Namespace) -> int:
    grant = None
    if args.grants_command == "add":
        raw = {
            "tenant_id": args.tenant,
            "subject": args.subject,
            "action": args.action,
            "resource": args.resource,
            "effect": args.effect,
            "expires_at": args.expires_at,
        }
        try:
            grant = parse_grant(raw)
        except InvalidInput as exc:
            print(f"accessd: invalid grant: {exc}", file=sys.stderr)
            return EXIT_INVALID
    store = build_store(settings)
    if isinstance(store, EmptyStore):
        raise ConfigError("ACCESS_POSTGRES_DSN", "no grant store configured: set it or ACCESS_POLICY_FILE")
    try:
        async with aio.open_asyncio_loop(), AsyncExitStack() as stack:
            if isinstance(store, PostgresStore):
                await store.open(stack)
                await store.migrate()
            elif isinstance(store, FileStore):
                await store.load()
            return await _command(store, args, grant)
    except BackendUnavailable as exc:
        print(f"accessd: grant store unavailable: {exc}", file=sys.stderr)
        return EXIT_FAILED


async def _command(store: GrantStore, args: argparse.Namespace, grant: Grant | None) -> int:
    if grant is not None:
        try:
            stored = await store.add(grant)
        except InvalidInput as exc:
            print(f"accessd: invalid grant: {exc}", file=sys.stderr)
            return EXIT_INVALID
        print(json.dumps(stored.to_json()))
        return EXIT_OK
    if args.grants_command == "list":
        for grant in await store.list_grants(args.tenant):
            print(json.dumps(grant.to_json()))
        return EXIT_OK
    revoked = await store.revoke(args.id, args.tenant)
    if revoked is None:
        print(
            f"accessd: no grant {args.id!r}" + (f" in tenant {args.tenant!r}" if args.tenant else ""),
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(json.dumps(revoked.to_json()))
    return EXIT_OK
