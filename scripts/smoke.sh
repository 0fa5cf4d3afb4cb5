#!/usr/bin/env bash
# End-to-end check of a running accessd; exits 1 at the first failed step, naming it.
#   scripts/smoke.sh EDGE_URL [STREAM_URL [INTERNAL_URL]]
# STREAM_URL and INTERNAL_URL default to EDGE_URL's host on ports 8001 and 8010.
# Steps: health (the three listeners), token (minted, then POST /auth/verify), gateway (401 without a token,
# 200 with one), stream (one message published through POST /stream/publish, received over WS and SSE).
# Environment:
#   SMOKE_ACCESSD        command running `accessd` where the daemon's dev issuer key is, to mint tokens
#                        (default: accessd; e.g. "podman exec NAME accessd")
#   SMOKE_TOKEN          a token for SMOKE_TENANT instead of a minted one (an IdP's)
#   SMOKE_PUBLISH_TOKEN  a token with the publish role instead of a minted one
#   SMOKE_TENANT (demo)  SMOKE_CHANNEL (pricing.curve.updates.v1)  SMOKE_ROUTE (/api/v1/demo/curves/NG_2026)
#   SMOKE_PUBLISH_ROLE (publisher)  SMOKE_TIMEOUT_S (10)
#   SMOKE_PYTHON         a python with accessd's dependencies (trio, trio-websocket, httpx); default python3
# The defaults fit `accessd run --demo` on the dev issuer.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 3 || $1 == -h || $1 == --help ]]; then
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
edge=${1%/}
host=${edge%:[0-9]*}
stream=${2:-$host:8001}
stream=${stream%/}
internal=${3:-$host:8010}
internal=${internal%/}
accessd=${SMOKE_ACCESSD:-accessd}
tenant=${SMOKE_TENANT:-demo}
channel=${SMOKE_CHANNEL:-pricing.curve.updates.v1}
route=${SMOKE_ROUTE:-/api/v1/demo/curves/NG_2026}
timeout=${SMOKE_TIMEOUT_S:-10}
py=${SMOKE_PYTHON:-python3}
step=setup

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

fail() {
    echo "smoke: FAILED at $step: $*" >&2
    exit 1
}
ok() { echo "smoke: $step ok${1:+ ($1)}"; }

command -v curl >/dev/null || fail "curl not found (apt-get install curl)"
"$py" -c 'import trio, trio_websocket, httpx' 2>/dev/null \
    || fail "$py lacks trio, trio-websocket or httpx (set SMOKE_PYTHON to accessd's python)"

# request METHOD URL [curl args]: sets $code (000 when nothing answered) and writes the body to $tmp/body
request() {
    local method=$1 url=$2
    shift 2
    : >"$tmp/body"
    code=$(curl -sS -m "$timeout" -X "$method" -o "$tmp/body" -w '%{http_code}' "$@" "$url" 2>"$tmp/err") \
        || code="000 ($(tail -n1 "$tmp/err"))"
}
body() { head -c 300 "$tmp/body"; }
# field NAME: a top-level field of the JSON body, or fail
field() {
    "$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$tmp/body" "$1" 2>/dev/null \
        || fail "no field '$1' in $(body)"
}

step=health
for url in "$edge" "$stream" "$internal"; do
    if [[ $url == "$stream" ]]; then  # the streaming listener serves liveness only
        request GET "$url/health/live"
        [[ $code == 200 ]] || fail "GET $url/health/live: $code $(body)"
        continue
    fi
    request GET "$url/health/ready"
    [[ $code == 200 ]] || fail "GET $url/health/ready: $code $(body)"
    request GET "$url/health"
    [[ $code == 200 ]] || fail "GET $url/health: $code $(body)"
    status=$(field status)
    [[ $status == ok || $status == degraded ]] || fail "GET $url/health: status $status"
done
ok "$status"

step=token
if [[ -n ${SMOKE_TOKEN:-} ]]; then
    token=$SMOKE_TOKEN
    sub=
else
    sub=smoke-$$
    # word splitting of $accessd is wanted: it is a command prefix
    # shellcheck disable=SC2086
    token=$($accessd token --sub "$sub" --tenant "$tenant" --ttl 300 2>"$tmp/err") \
        || fail "'$accessd token' failed: $(tail -n1 "$tmp/err") (dev issuer only: set SMOKE_TOKEN for an IdP)"
    request GET "$edge/.well-known/jwks.json"
    [[ $code == 200 ]] || fail "dev issuer JWKS GET $edge/.well-known/jwks.json: $code $(body)"
fi
request POST "$internal/auth/verify" -H "Authorization: Bearer $token"
[[ $code == 200 ]] || fail "POST $internal/auth/verify: $code $(body)"
[[ $(field tenant_id) == "$tenant" ]] || fail "verified tenant $(field tenant_id), not $tenant"
[[ -z $sub || $(field sub) == "$sub" ]] || fail "verified sub $(field sub), not $sub"
ok "sub $(field sub), tenant $tenant"

step=gateway
request GET "$edge$route"
[[ $code == 401 ]] || fail "GET $edge$route without a token: $code, not 401"
request GET "$edge$route" -H "Authorization: Bearer $token"
[[ $code == 200 ]] || fail "GET $edge$route: $code $(body)"
ok "GET $route 200"

step=stream
if [[ -n ${SMOKE_PUBLISH_TOKEN:-} ]]; then
    publish_token=$SMOKE_PUBLISH_TOKEN
else
    # shellcheck disable=SC2086
    publish_token=$($accessd token --sub "smoke-publisher-$$" --tenant "$tenant" \
        --roles "${SMOKE_PUBLISH_ROLE:-publisher}" --ttl 300 2>"$tmp/err") \
        || fail "'$accessd token' for the publisher failed: $(tail -n1 "$tmp/err") (or set SMOKE_PUBLISH_TOKEN)"
fi
# Subscribe over WS and SSE, then publish through the internal role until both have the message (the SSE
# subscription is only known to be in place once something arrives on it).
"$py" - "$stream" "$internal" "$channel" "$token" "$publish_token" "$timeout" <<'PY' || exit 1
import json, os, sys, time
import httpx, trio
from trio_websocket import open_websocket_url

stream, internal, channel, token, publish_token, timeout = sys.argv[1:7]
nonce = f"smoke-{time.time_ns()}"
got = {}
step = "stream-ws"


def fail(message):
    print(f"smoke: FAILED at {step}: {message}", file=sys.stderr, flush=True)
    os._exit(1)  # from inside a task too, without unwinding the nursery


def ours(message):
    data = message.get("data")
    return message.get("type") == "message" and isinstance(data, dict) and data.get("smoke") == nonce


async def read_ws(ws):
    while True:
        frame = json.loads(await ws.get_message())
        if frame.get("type") == "error":
            fail(f"WS error frame {frame}")
        if ours(frame):
            got["ws"] = time.monotonic()
            return


async def read_sse(sse):
    async for line in sse.aiter_lines():
        if line.startswith("data:") and ours(json.loads(line[5:])):
            got["sse"] = time.monotonic()
            return
    fail("the event stream ended")


async def main():
    global step
    ws_url = "ws" + stream.removeprefix("http") + "/ws/stream?token=" + token
    start = time.monotonic()
    with trio.move_on_after(float(timeout)):
        async with open_websocket_url(ws_url) as ws, httpx.AsyncClient(timeout=float(timeout)) as http:
            welcome = json.loads(await ws.get_message())
            if welcome.get("type") != "welcome":
                fail(f"first frame {welcome}")
            await ws.send_message(json.dumps({"op": "subscribe", "id": "smoke", "channel": channel}))
            answer = json.loads(await ws.get_message())
            if answer.get("type") != "subscribed":
                fail(f"subscribe answered {answer}")
            step = "stream-sse"
            params, auth = {"channel": channel}, {"Authorization": f"Bearer {token}"}
            async with http.stream("GET", f"{stream}/sse/stream", params=params, headers=auth) as sse:
                if sse.status_code != 200:
                    fail(f"GET /sse/stream: {sse.status_code} {(await sse.aread())[:300]!r}")
                step = "stream"
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read_ws, ws)
                    nursery.start_soon(read_sse, sse)
                    for n in range(10**6):
                        body = {"channel": channel, "key": "SMOKE", "data": {"smoke": nonce, "n": n}}
                        headers = {"Authorization": f"Bearer {publish_token}"}
                        response = await http.post(f"{internal}/stream/publish", json=body, headers=headers)
                        if response.status_code != 202:
                            step = "publish"
                            fail(f"POST /stream/publish: {response.status_code} {response.text[:300]}")
                        await trio.sleep(0.5)
                        if len(got) == 2:
                            nursery.cancel_scope.cancel()
    missing = {"ws", "sse"} - set(got)
    if missing:
        fail(f"no published message over {' and '.join(sorted(missing))} within {timeout}s")
    print(f"smoke: stream ok (WS {got['ws'] - start:.2f}s, SSE {got['sse'] - start:.2f}s)")


try:
    trio.run(main)
except Exception as exc:  # refused connection, closed WebSocket, bad JSON: still named by its step
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    fail(f"{type(exc).__name__}: {exc}")
PY
echo "smoke: all steps passed"
