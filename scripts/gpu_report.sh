#!/usr/bin/env bash
# The CUDA checks and GPU numbers of the kernels issue, in one pass on one NVIDIA GPU (~5–8 min on an H100),
# most important first:
#   1. `bench --attention-only`: fused attention fwd+bwd vs eager, bf16, T = 2048 and 4096
#   2. `bench --only ours` at configs/llama-1b.yaml's shape on one GPU: MFU (vs measured and data-sheet peak)
#   3. the CUDA-only tests (attention backends vs eager incl. document masks, real Liger kernels vs ours)
#   4. `bench` ours vs HF-Llama + DeepSpeed at configs/llama-125m.yaml's shape, one GPU, bf16
#   5. `python launch/train.py` on the default config for a few steps (the real trainer on CUDA, checkpoint)
# Usage: OUT=gpu-report bash scripts/gpu_report.sh   (each stage's log, its JSON included, lands in $OUT; a failed
# stage does not stop the next: the summary at the end lists every stage's exit code and seconds)
set -u
OUT=${OUT:-gpu-report}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0

stage() {  # stage NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, record rc and time
    local name=$1 limit=$2 start rc
    shift 2
    if [ -n "${ONLY:-}" ] && ! [[ $name =~ $ONLY ]]; then return 0; fi  # ONLY=regex picks stages
    start=$(date +%s)
    echo "== $name: $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    (( rc == 0 )) || FAILED=$((FAILED + 1))
    echo "$name rc=$rc $(( $(date +%s) - start ))s" | tee -a "$SUMMARY"
    tail -n 4 "$OUT/$name.log"
    return $rc
}
ST=("$PY" -m scaletrain.cli)  # an array, not a function: `timeout` runs programs

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$SUMMARY"

stage attention 120 "${ST[@]}" bench --attention-only --device cuda --precision bf16 --attention-seqs 2048 4096 --steps 10

ONE_B=(--hidden 2048 --layers 16 --heads 32 --kv-heads 8 --intermediate 8192 --vocab 128256 --seq 4096 --loss-chunk 1024)  # as in the README table
stage mfu_1b 200 "${ST[@]}" bench --device cuda --ranks 1 --zero 2 --precision bf16 --only ours "${ONE_B[@]}" \
    --micro-batch 4 --steps 8 --warmup 3 --no-memory
rc=$?
if [ $rc -ne 0 ] && [ $rc -ne 124 ]; then  # out of memory at micro-batch 4: half the batch
    stage mfu_1b_mb2 150 "${ST[@]}" bench --device cuda --ranks 1 --zero 2 --precision bf16 --only ours "${ONE_B[@]}" \
        --micro-batch 2 --steps 8 --warmup 3 --no-memory
fi

stage tests 240 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_attention_backends.py tests/test_fused_ops.py

M125=(--hidden 768 --layers 12 --heads 12 --kv-heads 4 --intermediate 2048 --vocab 32000 --seq 2048 --loss-chunk 1024)
stage vs_peer_125m 120 "${ST[@]}" bench --device cuda --ranks 1 --zero 2 --precision bf16 "${M125[@]}" \
    --micro-batch 8 --steps 8 --warmup 3 --no-memory

TINY_RUN="${TMPDIR:-/tmp}/scaletrain-gpu-tiny"
rm -rf "$TINY_RUN"  # a fresh run: the same dir again would resume a finished run and train nothing
stage train_tiny 100 "$PY" launch/train.py --config configs/tiny.yaml --set run.dir="$TINY_RUN" \
    train.max_steps=40 train.eval_every=20 train.save_every=20 train.log_every=10 data.tokenizer_sample_lines=200000
cat "$SUMMARY"
echo "$FAILED stage(s) failed"
exit $(( FAILED > 0 ))
