# accessd developer tasks (https://github.com/casey/just)

# run the daemon on its embedded defaults (add --demo for a synthetic upstream and price feed)
run *ARGS:
    python -m accessd run {{ARGS}}

# the full test suite against real Redis, Postgres and a Tansu broker
test *ARGS:
    python -m pytest {{ARGS}}

# the streaming fuzz suite with many more cases than CI runs, and a new seed each time
fuzz EXAMPLES="20000":
    ACCESSD_FUZZ_EXAMPLES={{EXAMPLES}} ACCESSD_FUZZ_RANDOM=1 python -m pytest tests/test_stream_fuzz.py -q

# the REST API against its OpenAPI document (schemathesis): many more cases than CI runs, a new seed each time
fuzz-api EXAMPLES="200":
    ACCESSD_FUZZ_API_EXAMPLES={{EXAMPLES}} ACCESSD_FUZZ_API_RANDOM=1 python -m pytest tests/test_api_conformance.py -q -k conforms

# copy the API documents to docs/ (tests fail while a copy differs from its source)
api-docs:
    cp accessd/http/openapi.yaml docs/openapi.yaml
    cp accessd/stream/asyncapi.yaml docs/asyncapi.yaml

# breaking changes in docs/openapi.yaml and docs/asyncapi.yaml since docs/baseline/ (fails unless the version is bumped)
contract-check:
    python scripts/contract_check.py

# at a release: the documents become the baseline the next changes are checked against
contract-baseline: api-docs
    cp docs/openapi.yaml docs/asyncapi.yaml docs/baseline/

# style, formatting, types (pyright, standard mode), the package layering (import-linter) and the Containerfile (hadolint); CI runs it
lint:
    ruff check accessd tests bench scripts
    ruff format --check accessd tests bench scripts
    pyright
    lint-imports
    hadolint Containerfile

# benchmarks; each appends its figures to bench/RESULTS.md
bench:
    python bench/health.py
    for script in bench/auth.py bench/entitlements.py bench/gateway.py; do [ -f "$script" ] && python "$script"; done

# the REST load scenario with locust against a running `accessd run --demo` (HOST: its edge)
locust HOST="http://127.0.0.1:8000" USERS="50" TIME="30s":
    locust -f bench/locustfile.py --headless -u {{USERS}} -r 10 -t {{TIME}} --host {{HOST}}

# scale-out on real engines: one internal daemon and two edges as processes on one Tansu, Redis and Postgres
scale-test *ARGS:
    python -m pytest tests/test_scale_out.py -rxX {{ARGS}}

# deploy/ validated and scanned: kubernetes-validate (strict), the service manifests against their schema, checkov (own venv); CI runs it
deploy-check:
    scripts/deploy-check.sh

# the image built (on a Debian-packages base when no registry is reachable), run read-only, smoked, stopped with SIGTERM
image-test:
    scripts/image-test.sh
