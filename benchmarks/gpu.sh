#!/usr/bin/env bash
# The full benchmark on a GPU machine, in one go, most important rows first.
#
#   bash benchmarks/gpu.sh OUTDIR
#
# Runs from the repository root with the machine's python3 (jax with CUDA,
# optax, chex; torch with CUDA for the torch rows) and this checkout on
# PYTHONPATH. Sections 1, 4 and 2 run in one process, section 1 with one
# size more than on the CPU, 2e8 parameters (800 MB in float32, many times
# a GPU's L2 cache); their JSON is rewritten after each row group, so a
# stopped run keeps what it finished. Section 3, the compile times, runs
# last under its own time limit.
# Writes OUTDIR/gpu.json, gpu.log, gpu_compile.json, gpu_compile.log and
# nvidia-smi.txt. The page: python benchmarks/report.py OUTDIR/gpu.json.
# BENCH_ARGS adds options to both runs (--quick tries the script anywhere).
set -u
out=${1:?usage: bash benchmarks/gpu.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}

nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
"$py" -c 'import jax; print(jax.devices())' 2>&1 | tee "$out/gpu.log"

timeout "${BENCH_MAIN_S:-260}" "$py" benchmarks/run.py --sections 1,4,2 \
    --sizes 1e5,1e6,1e7,5e7,2e8 --row-budget 1.5 --json "$out/gpu.json" ${BENCH_ARGS:-} 2>&1 | tee -a "$out/gpu.log"
echo "sections 1, 4, 2 exit status: ${PIPESTATUS[0]}" | tee -a "$out/gpu.log"

timeout "${BENCH_COMPILE_S:-200}" "$py" benchmarks/run.py --sections 3 \
    --compile-leaves 10,100,1000 --compile-timeout 30 \
    --json "$out/gpu_compile.json" ${BENCH_ARGS:-} 2>&1 | tee "$out/gpu_compile.log"
echo "section 3 exit status: ${PIPESTATUS[0]}" | tee -a "$out/gpu_compile.log"
