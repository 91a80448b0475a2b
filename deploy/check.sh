#!/usr/bin/env bash
# Validates the deployment files offline; exits non-zero on the first file that fails.
#
#   deploy/check.sh                       # everything below, the repository's own files
#   deploy/check.sh --k8s FILE --compose FILE --haproxy FILE    # only the files named (repeatable)
#
# - Kubernetes manifests: kubernetes-validate --strict (unknown fields are errors) against the JSON
#   schemas the package bundles, for each version in FEDHIVE_K8S_VERSIONS.
# - Compose files: check-jsonschema against the Compose Specification schema it bundles
#   (vendor.compose-spec), then cross-references a schema cannot see (depends_on naming a service
#   that does not exist, a named volume not declared).
# - HAProxy: haproxy -c (Debian's haproxy package), and the replicas it balances are services of
#   compose.replicas.yaml.
#
# The validators are pinned, with their dependencies, in a virtual environment kept at
# $HOME/.cache/fedhive-k8s-validate (from PyPI the first time, reused after). No other network.
set -euo pipefail
cd "$(dirname "$0")"

venv="$HOME/.cache/fedhive-k8s-validate"
k8s_versions="${FEDHIVE_K8S_VERSIONS:-1.30.0 1.37.0}"
requirements="kubernetes-validate==1.37.0
check-jsonschema==0.39.0
attrs==26.1.0
certifi==2026.10.19.post1
charset-normalizer==3.5.3
click==8.5.1
idna==3.21
importlib_resources==7.1.0
jsonschema==4.26.0
jsonschema-specifications==2025.9.1
packaging==26.4
PyYAML==6.0.4
referencing==0.37.0
regress==2026.9.1
requests==2.34.2
rpds-py==2026.9.1
ruamel.yaml==0.19.1
typing_extensions==4.16.0
urllib3==2.8.0"

if ! cmp -s "$venv/requirements.txt" <(printf '%s\n' "$requirements") \
  || [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/check-jsonschema" ]; then
  echo "check: installing kubernetes-validate 1.37.0 and check-jsonschema 0.39.0 into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  printf '%s\n' "$requirements" > "$venv/requirements.in"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$venv/requirements.in"
  mv "$venv/requirements.in" "$venv/requirements.txt"
fi

k8s=() compose=() haproxy_cfgs=()
if [ $# -eq 0 ]; then
  k8s=(k8s/*.yaml)
  compose=(compose.yaml compose.replicas.yaml)
  haproxy_cfgs=(haproxy.cfg)
fi
while [ $# -gt 0 ]; do
  case "$1" in
    --k8s) k8s+=("$(realpath "$2")") ;;
    --compose) compose+=("$(realpath "$2")") ;;
    --haproxy) haproxy_cfgs+=("$(realpath "$2")") ;;
    *) echo "usage: $0 [--k8s FILE] [--compose FILE] [--haproxy FILE] ..." >&2; exit 2 ;;
  esac
  shift 2
done

for file in "${k8s[@]}"; do
  for version in $k8s_versions; do
    echo "check: $file: Kubernetes $version schemas, strict (kubernetes-validate)"
    "$venv/bin/kubernetes-validate" --strict -k "$version" "$file"
  done
done

for file in "${compose[@]}"; do
  echo "check: $file: Compose Specification schema (check-jsonschema vendor.compose-spec)"
  "$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec "$file"
  echo "check: $file: services and volumes it refers to"
  "$venv/bin/python" - "$file" <<'EOF'
import sys, yaml
path = sys.argv[1]
doc = yaml.safe_load(open(path))
services = doc.get("services") or {}
volumes = doc.get("volumes") or {}
errors = []
for name, service in services.items():
    depends = service.get("depends_on") or []
    for target in depends if isinstance(depends, list) else depends.keys():
        if target not in services:
            errors.append(f"{name}: depends_on names no service `{target}`")
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):  # SOURCE:TARGET[:MODE]; a bare TARGET is anonymous
            parts = volume.split(":")
            source = parts[0] if len(parts) > 1 else None
        else:
            source = volume.get("source") if volume.get("type") == "volume" else None
        if source and not source.startswith((".", "/", "~", "$")) and source not in volumes:
            errors.append(f"{name}: volume `{source}` is not declared under volumes")
for error in errors:
    print(f"  {path}: {error}")
sys.exit(1 if errors else 0)
EOF
  echo "  ok"
done

for file in "${haproxy_cfgs[@]}"; do
  if ! command -v haproxy >/dev/null; then
    echo "check: $file: haproxy is not installed (apt-get install haproxy)" >&2
    exit 1
  fi
  echo "check: $file: haproxy -c ($(haproxy -v | head -n1))"
  # Outside compose the replicas' names do not resolve: HAProxy warns and starts without them
  # (init-addr ... none); those warnings are expected, anything else is shown.
  out=$(haproxy -c -f "$file" 2>&1) || { echo "$out"; exit 1; }
  echo "$out" | { grep -v -e "could not resolve address" -e "^\[NOTICE\]" -e "^Warnings were found" || true; } \
    | sed 's/^/  /'
  if [ "$file" = haproxy.cfg ]; then
    echo "check: $file: every server is a service of compose.replicas.yaml"
    "$venv/bin/python" - "$file" compose.replicas.yaml <<'EOF'
import sys, yaml
cfg, compose = sys.argv[1], sys.argv[2]
services = yaml.safe_load(open(compose))["services"]
hosts = [line.split()[2].rsplit(":", 1)[0] for line in open(cfg)
         if line.split()[:1] == ["server"]]
missing = [h for h in hosts if h not in services]
for h in missing:
    print(f"  {cfg}: server host `{h}` is not a service of {compose}")
if not hosts:
    print(f"  {cfg}: no server lines")
sys.exit(1 if missing or not hosts else 0)
EOF
    echo "  ok"
  fi
done
echo "check: all passed"
