#!/usr/bin/env bash
# One call on the GPU machine: build, GPU tests (pytest on cuda + ctest + compute-sanitizer),
# benchmarks, and a short table at the end. Logs go to $OUT (or ./gpu_check_out).
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
summary=()
step() {  # step NAME CMD...: run, log to $OUT/NAME.log, remember the status
  local name=$1; shift
  local t0=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-22s rc=%-3s %4ss  %s' "$name" "$rc" $((SECONDS - t0)) "$(tail -n 1 "$OUT/$name.log")")")
  return $rc
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
step build python -m pip install --no-build-isolation --no-deps -v \
  -C build-dir=build/gpu -C cmake.define.MOEFORGE_BUILD_TESTS=ON . || { printf '%s\n' "${summary[@]}"; tail -40 "$OUT/build.log"; exit 1; }
step pytest python -m pytest tests -q -x
step ctest ctest --test-dir build/gpu --output-on-failure
if command -v compute-sanitizer >/dev/null 2>&1; then
  for bin in build/gpu/tests/cpp/test_routing build/gpu/tests/cpp/test_permute; do
    [ -x "$bin" ] || continue
    step "memcheck_$(basename "$bin")" compute-sanitizer --tool memcheck --error-exitcode 1 "$bin"
    step "racecheck_$(basename "$bin")" compute-sanitizer --tool racecheck --error-exitcode 1 "$bin"
  done
fi
cd benchmarks
step bench_permute python bench_permute.py --tokens 4096 16384 65536 \
  --models qwen3-30b-a3b olmoe mixtral-8x7b gpt-oss-20b deepseek-v3
step bench_router_loss python bench_router_loss.py --tokens 16384 --layers 48
step bench_layer python bench_layer.py --models ${MOEFORGE_BENCH_MODELS:-qwen3-30b-a3b} \
  --tokens 4096 16384 --engines moeforge simt torch --unfused --json "$OUT/bench_layer.json"
step bench_e2e_lora python bench_e2e_lora.py
cd ..
echo; echo "== summary =="; printf '%s\n' "${summary[@]}"
for b in bench_permute bench_router_loss bench_layer bench_e2e_lora; do
  echo; echo "== $b =="; grep -v "^ *$" "$OUT/$b.log" | tail -25
done
