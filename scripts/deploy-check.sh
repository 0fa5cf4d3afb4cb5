#!/usr/bin/env bash
# Validates and scans deploy/: the Kubernetes manifests against the API schemas of a current Kubernetes
# (kubernetes-validate, strict), the seed §4 service manifests against deploy/services/schema.json, and all
# of deploy/ with checkov. Every checkov finding is fixed or skipped by an annotation with its reason.
# checkov lives in its own venv (CHECKOV_VENV): it pins many packages that would clash with the dev extra.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VERSION="${KUBERNETES_VERSION:-1.37.0}"
CHECKOV_VERSION="${CHECKOV_VERSION:-3.3.30}"
CHECKOV_VENV="${CHECKOV_VENV:-.venv-checkov}"

fail() { echo "deploy-check: $*" >&2; exit 1; }

command -v kubernetes-validate >/dev/null \
  || fail "kubernetes-validate not found: activate .venv and run pip install -e '.[dev]'"
python -c "import jsonschema, yaml" 2>/dev/null \
  || fail "jsonschema/PyYAML not importable: activate .venv and run pip install -e '.[dev]'"

echo "== kubernetes-validate $(kubernetes-validate --version) --strict against Kubernetes $KUBERNETES_VERSION"
kubernetes-validate --strict --quiet -k "$KUBERNETES_VERSION" deploy/k8s/*.yaml \
  || fail "a manifest in deploy/k8s/ is not valid Kubernetes $KUBERNETES_VERSION (see above)"

echo "== service manifests against deploy/services/schema.json"
python - deploy/services/schema.json deploy/services/*.yaml <<'PY'
import json, sys
from pathlib import Path

import jsonschema
import yaml

schema = json.loads(Path(sys.argv[1]).read_text())
jsonschema.Draft202012Validator.check_schema(schema)
validator = jsonschema.Draft202012Validator(schema)
bad = 0
for name in sys.argv[2:]:
    errors = list(validator.iter_errors(yaml.safe_load(Path(name).read_text())))
    for error in errors:
        print(f"{name}: {'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}", file=sys.stderr)
    print(f"{name}: {'invalid' if errors else 'valid'}")
    bad += len(errors)
sys.exit(1 if bad else 0)
PY

if [ "$("$CHECKOV_VENV/bin/checkov" --version 2>/dev/null)" != "$CHECKOV_VERSION" ]; then
  echo "== installing checkov $CHECKOV_VERSION into $CHECKOV_VENV"
  python3 -m venv "$CHECKOV_VENV" || fail "cannot create $CHECKOV_VENV (python3 -m venv)"
  "$CHECKOV_VENV/bin/pip" install -q "checkov==$CHECKOV_VERSION" \
    || fail "cannot install checkov==$CHECKOV_VERSION into $CHECKOV_VENV (needs PyPI)"
fi
echo "== checkov $CHECKOV_VERSION on deploy/ (offline: --skip-download)"
"$CHECKOV_VENV/bin/checkov" --directory deploy --skip-download --compact --quiet \
  || fail "checkov findings above: fix them, or skip one with a checkov.io/skipN annotation and its reason"
echo "deploy-check: ok"
