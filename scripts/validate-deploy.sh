#!/usr/bin/env bash
# Checks the deployment files: every Kubernetes manifest under deploy/kubernetes
# against the schema of a current Kubernetes release (kubernetes-validate,
# strict: unknown fields are errors), and deploy/Dockerfile with hadolint.
# Uses the fleet venv (scripts/setup-python.sh scripts/requirements-fleet.txt target/fleetenv).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${WORKER_ORCD_FLEETENV:-$repo/target/fleetenv}"
# The oldest release still maintained upstream, and the newest the validator knows.
versions="${KUBERNETES_VERSIONS:-1.33.0 1.37.0}"

for version in $versions; do
    "$venv/bin/kubernetes-validate" --quiet --strict -k "$version" "$repo"/deploy/kubernetes/*.yaml
done
"$venv/bin/hadolint" "$repo/deploy/Dockerfile"
echo "validate-deploy: manifests valid for Kubernetes $versions (strict); Dockerfile lint clean"
