"""A real HTTP JWKS server for tests, standing in for Keycloak, with keys and faults under test control.

It runs in a thread (the test process hosts several ``trio.run`` calls, and the daemon under test may be a
subprocess), serving ``GET /jwks.json`` (and ``/<realm>/jwks.json`` for several issuers).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class JwksServer:
    def __init__(self) -> None:
        self.keys: dict[str, list[dict[str, Any]]] = {"": []}  # realm -> JWK list
        self.down = False  # answer 503
        self.delay_s = 0.0
        self.hits = 0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="jwks", daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, realm: str = "") -> str:
        prefix = f"/{realm}" if realm else ""
        return f"http://127.0.0.1:{self.port}{prefix}/jwks.json"

    def set_keys(self, jwks: list[dict[str, Any]], realm: str = "") -> None:
        with self._lock:
            self.keys[realm] = list(jwks)

    def start(self) -> JwksServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                with server._lock:
                    server.hits += 1
                    keys = server.keys.get(self.path.rsplit("/jwks.json", 1)[0].strip("/"))
                    down, delay = server.down, server.delay_s
                if delay:
                    time.sleep(delay)
                if down:
                    self._answer(503, {"error": "unavailable"})
                elif keys is None or not self.path.endswith("/jwks.json"):
                    self._answer(404, {"error": "not found"})
                else:
                    self._answer(200, {"keys": keys})

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

        return Handler
