#!/usr/bin/env bash
# Copies policies/default.yaml into the two places deployments carry it:
#   deploy/k8s/policy.yaml                       (kustomize's configMapGenerator input)
#   deploy/helm/llm-numbers-proxy/values.yaml    (the `policy:` block, which must stay the last key)
#   proxy/config/default.yaml                    (the copy shipped in the package, used outside a checkout)
# tests/test_deploy_manifests.py fails while either copy differs from the default policy.
set -euo pipefail
cd "$(dirname "$0")/.."

cp policies/default.yaml deploy/k8s/policy.yaml
cp policies/default.yaml proxy/config/default.yaml

values=deploy/helm/llm-numbers-proxy/values.yaml
grep -q '^policy: |$' "$values" || { echo "$values: no 'policy: |' line" >&2; exit 1; }
{
  sed '/^policy: |$/q' "$values"
  sed 's/^/  /; s/^ *$//' policies/default.yaml
} > "$values.tmp"
mv "$values.tmp" "$values"
echo "synced deploy/k8s/policy.yaml, proxy/config/default.yaml and $values from policies/default.yaml"
