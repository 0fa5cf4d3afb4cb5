"""The AsyncAPI document of the streaming protocol (``asyncapi.yaml``, package data) as the streaming
listener serves it at ``GET /asyncapi.json``: its servers name the host the client reached."""

from __future__ import annotations

import functools
import json
import re
from importlib import resources
from typing import Any

import yaml

_HOST = re.compile(r"[A-Za-z0-9.\-]{1,253}(:\d{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:\d{1,5})?")


@functools.cache
def asyncapi_source() -> dict[str, Any]:
    text = resources.files(__name__.rpartition(".")[0]).joinpath("asyncapi.yaml").read_text(encoding="utf-8")
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def asyncapi_json(host: str | None) -> bytes:
    """The document with every server's host set to ``host`` (the request's ``Host``) when it is one."""
    document = asyncapi_source()
    if host and _HOST.fullmatch(host):
        servers = {name: {**server, "host": host} for name, server in document["servers"].items()}
        document = {**document, "servers": servers}
    return json.dumps(document).encode()
