#!/usr/bin/env bash
# Checks what deploy/ holds with a tool made for each:
#   - Kubernetes manifests: kubernetes-validate (PyPI; the API schemas of
#     Kubernetes 1.37, offline), strict: unknown fields are errors.
#   - the compose file: check-jsonschema against the Compose Specification.
#   - the systemd unit: systemd-analyze verify, against a built hexfleet-node.
#   - the Grafana dashboard: parses as JSON; the node's unit tests check that
#     every metric it plots exists (metrics.rs).
#   - shell scripts: bash -n.
# The Dockerfile has no checker here: hadolint ships from GitHub, and
# `docker build` needs Docker Hub; neither is reachable from these machines.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/deploy-validate
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/check-jsonschema" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q kubernetes-validate==1.37.0 check-jsonschema==0.39.0
fi
"$venv/bin/kubernetes-validate" --strict deploy/kubernetes/*.yaml
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.cluster.yml
python3 -m json.tool deploy/grafana/hexfleet.json >/dev/null && echo "ok -- deploy/grafana/hexfleet.json"

bin=${HEXFLEET_NODE_BIN:-target/debug/hexfleet-node}
[ -x "$bin" ] || cargo build --locked -p hexfleet-node
unit=$(mktemp -d)
trap 'rm -rf "$unit"' EXIT
sed "s|/usr/local/bin/hexfleet-node|$(realpath "$bin")|" deploy/systemd/hexfleet-node.service \
  >"$unit/hexfleet-node.service"
systemd-analyze verify "$unit/hexfleet-node.service"
echo "ok -- deploy/systemd/hexfleet-node.service"
bash -n deploy/local-cluster.sh scripts/*.sh && echo "ok -- shell scripts"
