#!/bin/bash
# H100 calls for `bench generate --fuse-layer` (issue 3). With TESTS=1 the fused-kernel tests compiled on the GPU
# first; then the decode step with --fuse-layer (fp16 and w4: the ratio within one run), then without it (w4 only,
# or the variants in $BASE_VARIANTS), both --compile --fuse --profile, shape $SHAPE (8b), batches in $BATCH ("1").
# Writes $OUT/tests.log, $OUT/gen_fl.json|log, $OUT/gen_base.json|log.
set -o pipefail
export PYTHONPATH=src TORCHINDUCTOR_COMPILE_THREADS=16 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
if [ -n "$TESTS" ]; then
    TRITON_INTERPRET=0 BITSMITH_TUNE=0 timeout 120 python3 -m pytest -p no:cacheprovider -x \
        tests/kernels/test_fused_ops.py tests/kernels/test_fused_layer.py 2>&1 | tee $OUT/tests.log | tail -4
fi
B=""; for b in ${BATCH:-1}; do B="$B --batch $b"; done
G="python3 -m bitsmith.kernels.bench_generate --shape ${SHAPE:-8b} --steps 64 $B --compile --fuse --profile"
timeout ${T_FL:-330} $G --variant fp16 --variant w4 --fuse-layer --out $OUT/gen_fl.json > $OUT/gen_fl.log 2>&1
echo "fuse-layer rc $?"
if [ -n "${BASE_VARIANTS-w4}" ]; then
    V=""; for v in ${BASE_VARIANTS-w4}; do V="$V --variant $v"; done
    timeout ${T_BASE:-230} $G $V --out $OUT/gen_base.json > $OUT/gen_base.log 2>&1
    echo "base rc $?"
fi
for f in gen_fl gen_base; do
    [ -f $OUT/$f.json ] && python3 benchmarks/generate_summary.py $OUT/$f.json --top 10 || tail -3 $OUT/$f.log
done
