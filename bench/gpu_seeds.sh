#!/usr/bin/env bash
# The 80-step GPU quality runs over seeds behind bench/results/quality_gpu-80steps-seeds.json, as they ran
# on one lent NVIDIA H100 80GB (16 cores) on 2026-11-23: four batches, the invocations of a batch side by
# side (nvidia-smi, sampled each minute, read up to 76630 MiB in use in batch 1, ten rows at once; the
# batches took 527, 316, 278 and 276 s). Each quality.py command below is the one its JSON records. Needs a
# CUDA GPU with about 80 GB and the demo model fetched (`zsaq fetch-demo-model`).
#
#     bash bench/gpu_seeds.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
C=(--device cuda --results bench/results/seeds)
B=(--steps 80 --batch-size 8 --seq-len 128 --num-sequences 256 --eval-tokens 8192)
Q=(python bench/quality.py)

# batch 1: W4 g64 asym, the issue's rows, seeds 0-2
"${Q[@]}" "${C[@]}" --settings w4g64-asym "${B[@]}" --set method.lr=5e-5 --tag gpu-80steps-seed0 \
    --rows rtn self_sample zsaq 'zsaq rho=0' 'zsaq ascent=false' --jobs 4 --set method.seed=0 &
sleep 5
for s in 1 2; do
    "${Q[@]}" "${C[@]}" --settings w4g64-asym "${B[@]}" --set method.lr=5e-5 --tag gpu-80steps-seed$s \
        --rows self_sample zsaq 'zsaq rho=0' 'zsaq ascent=false' --jobs 3 --set method.seed=$s &
done
wait

# batch 2: W3 g64 and W4A8, seed 0 (into bench/results: the current default's table at those settings)
"${Q[@]}" --device cuda --results bench/results --tag gpu-80steps-samq --settings w3g64 w4a8 \
    --rows rtn self_sample zsaq 'zsaq rho=0' 'zsaq ascent=false' "${B[@]}" --jobs 8 --set method.lr=5e-5 \
    --set method.seed=0

# batch 3: smaller SAM radii, W4 g64 asym seeds 0-2 and W3 g64 seed 0
for s in 0 1 2; do
    "${Q[@]}" "${C[@]}" "${B[@]}" --jobs 2 --set method.lr=5e-5 --settings w4g64-asym --tag gpu-80steps-seed$s-rho \
        --rows 'zsaq rho=0.01' 'zsaq rho=0.02' --set method.seed=$s &
done
"${Q[@]}" "${C[@]}" "${B[@]}" --jobs 2 --set method.lr=5e-5 --settings w3g64 --tag gpu-80steps-seed0-w3rho \
    --rows 'zsaq rho=0.01' 'zsaq rho=0.02' --set method.seed=0 &
wait

# batch 4: W3 g64 and W4A8 seed 1; noise at W4 g64 asym seed 0
"${Q[@]}" "${C[@]}" "${B[@]}" --set method.lr=5e-5 --settings w3g64 w4a8 --tag gpu-80steps-seed1-w3w4a8 \
    --rows self_sample zsaq 'zsaq rho=0' 'zsaq ascent=false' --jobs 8 --set method.seed=1 &
"${Q[@]}" "${C[@]}" "${B[@]}" --set method.lr=5e-5 --settings w4g64-asym --tag gpu-80steps-seed0-noise \
    --rows noise --set method.seed=0 &
wait

python bench/seeds.py --runs bench/results/seeds/quality_gpu-80steps-seed?.json \
    bench/results/seeds/quality_gpu-80steps-seed?-*.json bench/results/quality_gpu-80steps-samq.json \
    --out bench/results/quality_gpu-80steps-seeds.json
