#!/usr/bin/env bash
# Prepare .device/ for benchmarks/gpu_check.sh on a lent GPU machine that has torch and
# transformers but no network: wheels (Python 3.12) of the other libraries this project
# uses, at the versions of this checkout's .venv, and SmolLM2-135M-Instruct's config and
# tokenizer (gpu_check.sh builds random weights of that shape there). Then, on the device:
#   pip install -q --no-deps --no-index .device/wheels/*.whl && bash benchmarks/gpu_check.sh OUT
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYVER=${DEVICE_PYTHON:-3.12}
mkdir -p .device/wheels
specs=$("$PY" - <<'PYEOF'
from importlib.metadata import version
names = ["transformer-lens", "peft", "datasets", "dill", "multiprocess", "fancy-einsum",
         "beartype", "typeguard", "gguf", "jaxtyping", "wadler-lindig"]
print(" ".join(f"{n}=={version(n)}" for n in names))
PYEOF
)
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  -d .device/wheels $specs
"$PY" benchmarks/random_model.py export smollm2-135m-instruct .device/smollm2-shape
du -sh .device
