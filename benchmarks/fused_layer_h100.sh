#!/bin/bash
# One H100 call for `bench generate --fuse-layer` (issue 3): the fused-kernel tests compiled on the GPU, then the
# 8B decode step at batch 1 with and without --fuse-layer (fp16 and w4 in each run, --compile --fuse --profile).
#   bash benchmarks/fused_layer_h100.sh [extra bench_generate args for the second run, e.g. "--batch 1 --batch 16"]
# Writes $OUT/tests.log, $OUT/gen_base.json|log, $OUT/gen_fl.json|log.
set -o pipefail
export PYTHONPATH=src TORCHINDUCTOR_COMPILE_THREADS=16 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
git log --oneline -1 2>/dev/null
TRITON_INTERPRET=0 BITSMITH_TUNE=0 timeout 120 python3 -m pytest -p no:cacheprovider -x \
    tests/kernels/test_fused_ops.py tests/kernels/test_fused_layer.py 2>&1 | tee $OUT/tests.log | tail -4
G="python3 -m bitsmith.kernels.bench_generate --shape ${SHAPE:-8b} --steps 64 --variant fp16 --variant w4 --compile --fuse --profile"
if [ -z "$SKIP_BASE" ]; then
    timeout ${T_BASE:-200} $G --batch 1 --out $OUT/gen_base.json > $OUT/gen_base.log 2>&1
    echo "base rc $?"
fi
timeout ${T_FL:-240} $G --fuse-layer ${@:---batch 1} --out $OUT/gen_fl.json > $OUT/gen_fl.log 2>&1
echo "fuse-layer rc $?"
for f in gen_base gen_fl; do
    [ -f $OUT/$f.json ] && python3 benchmarks/generate_summary.py $OUT/$f.json --top 8 || tail -5 $OUT/$f.log
done
