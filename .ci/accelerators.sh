#!/usr/bin/env bash
# Build .venv-accel: jax with the TPU and CUDA plugins, for the deviceless accelerator checks
# (bench/accelerators.py, tests/test_accelerators.py running tests/deviceless.py). XLA compiles for an H100 and a TPU v5e
# without either: no accelerator, driver or CUDA runtime is needed.
#
#   bash .ci/accelerators.sh        # then: .venv-accel/bin/python -m bench.accelerators --quick
#
# A separate environment because the plugins change what a plain `import jax` probes; the main
# .venv stays plugin-free. tests/test_accelerators.py runs .venv-accel/bin/python (or
# $JBCE_ACCEL_PYTHON) in a subprocess; with CI=true it fails when that python is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
rm -rf .venv-accel

echo "== accelerator environment (.venv-accel)"
python3 -m venv .venv-accel
.venv-accel/bin/pip install -q "jax[tpu]==0.10.2" "jax[cuda12-local]==0.10.2" numpy optax chex
# jbce from this checkout, without touching the pinned jax above.
.venv-accel/bin/pip install -q --no-deps -e .

# cuda12-local compiles PTX with a local CUDA toolkit's ptxas and libdevice. Where there is
# none, the pip-packaged nvcc provides both (jax finds the `nvidia.cuda_nvcc` module).
if ! command -v ptxas >/dev/null 2>&1 && [ ! -x /usr/local/cuda/bin/ptxas ]; then
  echo "no local ptxas: installing nvidia-cuda-nvcc-cu12"
  .venv-accel/bin/pip install -q "nvidia-cuda-nvcc-cu12"
fi

echo "== accelerator environment: smoke compile for H100 and TPU v5e"
.venv-accel/bin/python - <<'PY'
from bench import hlo

hlo.setup_environment()
import jax.numpy as jnp  # noqa: E402

for platform in hlo.PLATFORMS:
    c = hlo.compile_for(lambda x: jnp.sum(jnp.exp(x)), [((1024,), "float32")], platform)
    print(hlo.DEVICE_NAMES[platform], "ok:", hlo.analyse_hlo(c.as_text()))
PY
