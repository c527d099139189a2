#!/usr/bin/env bash
# Validates the Kubernetes manifests offline: every file of the base and the
# overlays against the Kubernetes schemas (kubernetes-validate --strict),
# each overlay as kustomize renders it (when kubectl is installed), and the
# ServiceMonitor against schemas/servicemonitor.json (a custom resource
# kubernetes-validate has no schema for).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m kubernetes_validate --strict --quiet --no-warn base/*.yaml overlays/*/*.yaml
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
rendered=()
if command -v kubectl >/dev/null 2>&1; then
  for o in overlays/*/; do
    name=$(basename "$o")
    kubectl kustomize "$o" >"$out/$name.yaml"
    python3 -m kubernetes_validate --strict --quiet --no-warn "$out/$name.yaml"
    rendered+=("$out/$name.yaml")
  done
else
  echo "kubectl not installed: overlays validated file by file, not rendered"
fi
python3 - schemas/servicemonitor.json base/*.yaml "${rendered[@]}" <<'PY'
import json, sys, yaml, jsonschema
schema = json.load(open(sys.argv[1]))
n = 0
for path in sys.argv[2:]:
    for doc in yaml.safe_load_all(open(path)):
        if isinstance(doc, dict) and doc.get("kind") == "ServiceMonitor":
            jsonschema.validate(doc, schema)
            n += 1
if n == 0:
    sys.exit("no ServiceMonitor found")
print(f"ServiceMonitor: {n} checked against schemas/servicemonitor.json")
PY
