#!/usr/bin/env bash
# AnyFlow-FAR (the causal, frame-autoregressive student; docs/design/far.md) on Wan2.1-T2V-1.3B, one node:
#   [convert -> prepare data -> teacher -> teacher-synthesised data: reused from the bidirectional run]
#   -> FAR stage 1 (teacher forcing) -> FAR stage 2 (causal flow-map backward simulation) -> export
#
#   BASE_OUT=runs/anyflow-1.3b bash examples/pretrain_anyflow_far_1.3b.sh      # reuse examples/pretrain_anyflow_1.3b.sh's run
#   WAN=/models/Wan2.1-T2V-1.3B-Diffusers VIDEOS=/data/videos CAPTIONS=/data/captions.json \
#     bash examples/pretrain_anyflow_far_1.3b.sh                                # or make the teacher and data here
#   DRY_RUN=1 bash examples/pretrain_anyflow_far_1.3b.sh   # validate both stages on any machine (no GPU): sizes,
#                                                          # FAR tokens and padding, per-GPU memory plan
#
# TEACHER  the frozen base of both stages and stage 2's real score / fake-score start (default
#          $BASE_OUT/ckpt/teacher, the bidirectional run's LoRA teacher); DATA: the teacher-synthesised
#          training set (default $BASE_OUT/synthetic). When either is absent the script makes it as
#          examples/pretrain_anyflow_1.3b.sh does (needs WAN and VIDEOS), in $BASE_OUT.
# Steps can be skipped with SKIP_STAGE1=1 / SKIP_STAGE2=1 / SKIP_EXPORT=1. Extra arguments go to both training runs.
# Reference hyper-parameters (docs/design/far.md 2; the reference's train_farwan1b configs): stage 1 6000 iterations, global
# batch 32, lr 5e-5, LoRA 256 (+ far_patch_embedding trained fully), chunks (1, 3, 3, 3, 3, 3, 3, 2), long-context
# probability 0.5, bidirectional branch 0.1; stage 2 1200 iterations, lr 2e-6, N in {2, 4, 8, 16, 50}, the
# generator from stage 1's EMA, bidirectional real / fake scores. One difference, by design (as in the
# bidirectional script): the FAR student's LoRA lives on the teacher-merged base, where the reference puts it on
# the raw Wan base.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_OUT=${BASE_OUT:-runs/anyflow-1.3b}
OUT=${OUT:-runs/anyflow-far-1.3b}
TEACHER=${TEACHER:-$BASE_OUT/ckpt/teacher}
DATA=${DATA:-$BASE_OUT/synthetic}
GPUS=${GPUS:-8}
TP=${TP:-1}; CP=${CP:-1}
GLOBAL_BATCH=${GLOBAL_BATCH:-32}
TEACHER_ITERS=${TEACHER_ITERS:-6000}
STAGE1_ITERS=${STAGE1_ITERS:-6000}
STAGE2_ITERS=${STAGE2_ITERS:-1200}
CHUNKS=${CHUNKS:-1 3 3 3 3 3 3 2}
FRAMES=${FRAMES:-81}; HEIGHT=${HEIGHT:-480}; WIDTH=${WIDTH:-832}
DRY_RUN=${DRY_RUN:-0}
read -r -a CHUNK_ARR <<< "$CHUNKS"

step() { echo; echo "=== [$(date +%H:%M:%S)] $*"; }
COMMON=(--model far --chunk-partition "${CHUNK_ARR[@]}" --bf16 --lora-rank 256 --lora-alpha 256
        --tensor-model-parallel-size "$TP" --context-parallel-size "$CP" --micro-batch-size 1
        --global-batch-size "$GLOBAL_BATCH" --recompute-granularity full --log-interval 10)
[ "$TP" -gt 1 ] && COMMON+=(--sequence-parallel)
STAGE1=(--stage stage1 --train-iters "$STAGE1_ITERS" --lr 5e-5 --long-context-prob 0.5 --far-bidirectional-prob 0.1)
STAGE2=(--stage stage2 --train-iters "$STAGE2_ITERS" --lr 2e-6 --simulation-steps 2 4 8 16 50)

if [ "$DRY_RUN" = 1 ]; then
  LAT_F=$(( (FRAMES - 1) / 4 + 1 )); LAT_H=$((HEIGHT / 8)); LAT_W=$((WIDTH / 8))   # Wan VAE: 4x time, 8x space
  DRY=(--model-preset wan2.1-1.3b --mock-data --mock-latent-shape "$LAT_F" 16 "$LAT_H" "$LAT_W" --mock-text-len 512
       --dry-run --world-size "$GPUS")
  [ -e "$TEACHER" ] && DRY+=(--pretrained "$TEACHER")
  for s in 1 2; do
    step "dry run: FAR stage $s"
    if [ "$s" = 1 ]; then ARGS=("${STAGE1[@]}"); else ARGS=("${STAGE2[@]}"); fi
    python pretrain_anyflow.py "${ARGS[@]}" "${COMMON[@]}" "${DRY[@]}" "$@"
    python tools/memory_plan.py --model far --chunk-partition "${CHUNK_ARR[@]}" --preset wan2.1-1.3b --stage "$s" \
      --tp "$TP" --cp "$CP" --dp $((GPUS / (TP * CP))) --frames "$FRAMES" --height "$HEIGHT" --width "$WIDTH" \
      --recompute full
  done
  exit 0
fi

LAUNCH=(torchrun --nproc_per_node "$GPUS")
if [ ! -e "$TEACHER" ] || [ ! -f "$DATA/index.json" ]; then
  # the bidirectional run's steps 1-4 (examples/pretrain_anyflow_1.3b.sh), in $BASE_OUT
  WAN=${WAN:?no teacher at $TEACHER or no data at $DATA: set TEACHER / DATA, or WAN (and VIDEOS) to make them}
  VIDEOS=${VIDEOS:?set VIDEOS to a folder of videos or WebDataset shards}
  CAPTIONS=${CAPTIONS:-}
  mkdir -p "$BASE_OUT"
  TEACHER=$BASE_OUT/ckpt/teacher; DATA=$BASE_OUT/synthetic
  if [ ! -e "$BASE_OUT/ckpt/base" ]; then
    step "convert the diffusers transformer (delta embedder added as a copy of the time embedder)"
    python tools/convert_from_hf.py --input "$WAN/transformer" --output "$BASE_OUT/ckpt/base" --add-delta-embedder --overwrite
  fi
  if [ ! -f "$BASE_OUT/data/index.json" ]; then
    step "prepare data: DALI decode (GPU) -> Wan VAE latents (normalised) + umT5 embeddings (512 tokens)"
    python tools/prepare_dataset.py --input "$VIDEOS" ${CAPTIONS:+--captions "$CAPTIONS"} --output "$BASE_OUT/data" \
      --codec wan-vae --vae "$WAN/vae" --text-encoder umt5 --text-encoder-path "$WAN/text_encoder" \
      --num-frames "$FRAMES" --height "$HEIGHT" --width "$WIDTH" --fps 16
  fi
  if [ ! -e "$TEACHER" ]; then
    step "teacher: LoRA flow matching on your clips, on top of the converted base (bidirectional)"
    BI=(--bf16 --lora-rank 256 --lora-alpha 256 --tensor-model-parallel-size "$TP" --context-parallel-size "$CP"
        --micro-batch-size 1 --global-batch-size "$GLOBAL_BATCH" --recompute-granularity full --log-interval 10)
    [ "$TP" -gt 1 ] && BI+=(--sequence-parallel)
    "${LAUNCH[@]}" pretrain_anyflow.py --stage teacher "${BI[@]}" --pretrained "$BASE_OUT/ckpt/base" \
      --data-path "$BASE_OUT/data" --train-iters "$TEACHER_ITERS" --lr 5e-5 --save "$TEACHER" --load "$TEACHER" \
      --save-interval 500 --tensorboard-dir "$BASE_OUT/tb/teacher"
  fi
  if [ ! -f "$DATA/index.json" ]; then
    step "teacher-synthesised data: the teacher's 50-step samples (CFG 3) for every prompt (paper 5.1)"
    python tools/synthesize_dataset.py --teacher "$TEACHER" --data-path "$BASE_OUT/data" --output "$DATA" \
      --steps 50 --guidance 3 --samples-per-prompt 1 --batch-size 1
  fi
fi
echo "teacher $TEACHER, data $DATA"
mkdir -p "$OUT"

if [ "${SKIP_STAGE1:-0}" != 1 ]; then
  step "FAR stage 1: teacher forcing (compressed context, clean copies) + the bidirectional branch"
  "${LAUNCH[@]}" pretrain_anyflow.py "${STAGE1[@]}" "${COMMON[@]}" --pretrained "$TEACHER" --data-path "$DATA" \
    --save "$OUT/ckpt/stage1" --load "$OUT/ckpt/stage1" --save-interval 500 --tensorboard-dir "$OUT/tb/stage1" "$@"
fi

if [ "${SKIP_STAGE2:-0}" != 1 ]; then
  step "FAR stage 2: causal rollouts through the KV cache, bidirectional real / fake scores"
  "${LAUNCH[@]}" pretrain_anyflow.py "${STAGE2[@]}" "${COMMON[@]}" --pretrained "$TEACHER" --data-path "$DATA" \
    --init-adapters-from "$OUT/ckpt/stage1" --save "$OUT/ckpt/stage2" --load "$OUT/ckpt/stage2" \
    --save-interval 100 --tensorboard-dir "$OUT/tb/stage2" "$@"
fi

if [ "${SKIP_EXPORT:-0}" != 1 ]; then
  step "export the FAR student (EMA generator merged, far_patch_embedding) for diffusers"
  rm -rf "$OUT/export"
  python tools/convert_to_hf.py --input "$OUT/ckpt/stage2" --output "$OUT/export" --merge-lora generator --ema --dtype bf16
  echo "load with: AnyFlowFARTransformer3DModel.from_pretrained('$OUT/export'), sample with AnyFlowFARPipeline" \
    "(FlowMapEulerDiscreteScheduler(shift=5.0))"
fi
