#!/usr/bin/env bash
# AnyFlow-FAR (the causal, frame-autoregressive model) end to end on one CPU machine, on real video:
#   the tiny demo's dataset, teacher and teacher-synthesised data (made by pretrain_anyflow_tiny.sh if absent)
#   -> FAR stage 1 (teacher forcing with clean copies, compressed context, the bidirectional branch)
#   -> FAR stage 2 (causal flow-map backward simulation through the KV cache, bidirectional real / fake
#      scores) -> diffusers export (AnyFlowFARTransformer3DModel) -> evaluation: test-time scaling table and
#      plot, and the error of each chunk against the teacher for stage 1 vs stage 2 (exposure bias).
#
# The clips have 5 latent frames: chunks (1, 1, 1, 1, 1); a training forward keeps the last 3 chunks at
# full resolution and compresses older context (n = 4, 5 chunks), as the 81-frame recipe does with 8 chunks.
# Stage 1 puts no LoRA on the time / delta embedders, as the main job (issue #17: with them FAR stage 1 fell
# from 15.8 dB at iteration 150 to 15.0 dB at 400 at 4 steps per chunk; stage 2 adapts what stage 1 did).
#
#   bash examples/pretrain_anyflow_far_tiny.sh          # ~11 min on 2 CPU cores with the data present
#
# Options: --out DIR (outputs/tiny: shares the bidirectional demo's data and teacher), --stage1-iters,
# --stage2-iters, --eval-samples, --skip-install.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=outputs/tiny
STAGE1_ITERS=400
STAGE2_ITERS=120
EVAL_SAMPLES=6
INSTALL_FLAG=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --stage1-iters) STAGE1_ITERS=$2; shift 2 ;;
    --stage2-iters) STAGE2_ITERS=$2; shift 2 ;;
    --eval-samples) EVAL_SAMPLES=$2; shift 2 ;;
    --skip-install) INSTALL_FLAG=(--skip-install); shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
step() { echo; echo "=== [$(date +%H:%M:%S)] $*"; }
export PYTHONWARNINGS=ignore
FAR="$OUT/far"
START=$(date +%s)

if [ ! -f "$OUT/synthetic/index.json" ] || [ ! -d "$OUT/ckpt/teacher" ]; then
  step "0/4 dataset, teacher and synthetic data (pretrain_anyflow_tiny.sh --stop-after-data)"
  bash examples/pretrain_anyflow_tiny.sh --out "$OUT" --stop-after-data "${INSTALL_FLAG[@]}"
fi

CHUNKS=(--model far --chunk-partition 1 1 1 1 1)
COMMON=(--model-preset tiny-video --data-path "$OUT/synthetic" --log-interval 25 --seed 1234 --guidance 1)

step "1/4 FAR stage 1: teacher forcing (LoRA 'generator' + far_patch_embedding on the frozen teacher), $STAGE1_ITERS iterations"
python pretrain_anyflow.py --stage stage1 "${CHUNKS[@]}" "${COMMON[@]}" --pretrained "$OUT/ckpt/teacher" \
  --lora-rank 32 --lora-alpha 32 --micro-batch-size 8 --train-iters "$STAGE1_ITERS" --lr 1e-3 \
  --lr-warmup-iters 50 --lr-decay-style cosine --min-lr 1e-4 --ema-decay 0.99 --ema-start-iter 0 \
  --lora-exclude 'condition_embedder.*' --save "$FAR/ckpt/stage1" --load "$FAR/ckpt/stage1"

step "2/4 FAR stage 2: causal rollouts through the KV cache, bidirectional scores, $STAGE2_ITERS iterations"
python pretrain_anyflow.py --stage stage2 "${CHUNKS[@]}" "${COMMON[@]}" --pretrained "$OUT/ckpt/teacher" \
  --init-adapters-from "$FAR/ckpt/stage1" --micro-batch-size 4 --train-iters "$STAGE2_ITERS" --lr 1e-4 \
  --critic-lr 1e-4 --ema-start-iter 0 --ema-decay 0.9 --simulation-steps 2 4 8 16 --real-guidance 0 \
  --save "$FAR/ckpt/stage2" --load "$FAR/ckpt/stage2"

step "3/4 export the FAR student to diffusers (AnyFlowFARTransformer3DModel, EMA LoRA merged)"
rm -rf "$FAR/export"
python tools/convert_to_hf.py --input "$FAR/ckpt/stage2" --output "$FAR/export" --merge-lora generator --ema --verify

step "4/4 evaluation: stage 1 and stage 2 students (N steps per chunk) vs the teacher's 50-step ODE samples"
python tools/evaluate_far.py --teacher "$OUT/ckpt/teacher" --student "stage 1=$FAR/ckpt/stage1" \
  --student "stage 2=$FAR/ckpt/stage2" --ema --guidance 1 --data-path "$OUT/data" --output "$FAR/eval" \
  --steps 1 2 4 8 --chunk-steps 1 4 --num-samples "$EVAL_SAMPLES"

step "done in $(( ($(date +%s) - START) / 60 )) min: $FAR/eval/scaling.md, per_chunk.md, scaling.png, per_chunk.png, samples.mp4"
echo
echo "Generate with the FAR student (chunk by chunk, KV cache; one MP4 per N in $FAR/generate):"
echo "  python tools/generate.py --checkpoint $FAR/ckpt/stage2 --ema --prompt \"Busy city streets on a cloudy day," \
  "a cyclist rides by.\" --steps 1 4 --output $FAR/generate"
