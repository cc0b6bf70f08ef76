#!/usr/bin/env bash
# The checks a lent GPU machine is for, as one script (the device tool's `run`, from the repo's root):
#
#   bash bench/gpu_session.sh [ROW ...]     ROW: image_to_3d text_to_3d text_to_3d_sds (default: image_to_3d)
#
# SKIP_RENDERER=1 leaves out step 2, JOBS_TIMEOUT (s) bounds step 3. Run it again on the same
# (warm) machine for more rows: what is done is not done twice (the
# wheels, gsplat's compiled kernels, the full-size models). That machine has Python 3.12 and a CUDA
# torch but none of diffusers, gsplat, xatlas, trimesh, pyzmq or pymeshlab, and no network: carry
# them as wheels in .whl/ (pymeshlab's 100 MB wheel is over the carry limit; bench/generate.py then
# decimates with fast_simplification and says so). Here, once (.whl/ is ignored through .git/info/exclude):
#   echo /.whl/ >> .git/info/exclude
#   for p in diffusers gsplat==1.5.3 xatlas trimesh pyzmq fast_simplification importlib_metadata; do
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d .whl $p; done
# and name .whl in the run's carry. Seen on an H200 (2026-12): gsplat's build 70-81 s, the models 45 s, the
# renderer checks 16 s. Logs go to $OUT:
#   env.log       GPU, driver, library versions
#   gsplat.log    gsplat's JIT build of its CUDA kernels (sm_90 only), and how long it took
#   models.log    the full-size random-weight models built (bench/generate.py --build-only)
#   gpu_tests.log tests marked gpu (parity of our PyTorch rasterizer with gsplat: images, depth,
#                 gradients) and bench/gpu_renderer.py (forward+backward time of each)
#   generate.log  bench/generate.py --device cuda --quality standard: per-stage seconds, peak GPU memory
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GEN3D_HOME=/tmp/gen3d-home
rows=("$@")
[ ${#rows[@]} -eq 0 ] && rows=(image_to_3d)
t0=$SECONDS
if [ ! -f /tmp/site/.done ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.done || { echo "wheel install failed"; exit 1; }
fi
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys, torch, diffusers, transformers, gsplat; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'gsplat', gsplat.__version__)"
  echo "cpus $(nproc)"
} >>"$OUT/env.log" 2>&1
cat "$OUT/env.log"

# 1. gsplat's kernels compile while the models are built on the CPU (both only once per machine)
if [ ! -f /tmp/gsplat.done ]; then
  ( s=$SECONDS; timeout 330 python3 -c "from gsplat.cuda._backend import _C; print('gsplat extension:', _C)";
    echo "gsplat build exit $? after $((SECONDS - s)) s"; touch /tmp/gsplat.done ) >>"$OUT/gsplat.log" 2>&1 &
fi
if [ ! -f /tmp/models/zero123xl/model_index.json ]; then
  OMP_NUM_THREADS=4 timeout 330 python3 bench/generate.py --build-only --keep /tmp/models >>"$OUT/models.log" 2>&1
fi
wait
tail -3 "$OUT/gsplat.log"; tail -2 "$OUT/models.log"
echo "== set-up done at $((SECONDS - t0)) s"

# 2. the renderer: parity and speed (once)
if [ ! -f /tmp/gpu_tests.done ] && [ -z "${SKIP_RENDERER:-}" ]; then
  timeout 120 python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/test_gaussian_render.py >>"$OUT/gpu_tests.log" 2>&1
  timeout 90 python3 bench/gpu_renderer.py --gaussians 20000 --size 256 >>"$OUT/gpu_tests.log" 2>&1
  touch /tmp/gpu_tests.done
  grep -E "parity|grad |RGB|passed|failed|renderer on|ms$|Error" "$OUT/gpu_tests.log"
  echo "== renderer checks done at $((SECONDS - t0)) s"
fi

# 3. the jobs at the GPU's standard settings, full-size architectures
timeout "${JOBS_TIMEOUT:-400}" python3 bench/generate.py --device cuda --quality standard --keep /tmp/models \
  --only "${rows[@]}" >>"$OUT/generate.log" 2>&1
echo "generate exit $? at $((SECONDS - t0)) s" >>"$OUT/generate.log"
tail -25 "$OUT/generate.log"
