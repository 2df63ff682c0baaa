#!/usr/bin/env bash
# AnyFlow on Wan2.1-T2V-14B, multi-node torchrun (Megatron-style launch), one stage per call.
#
# The reference's order (run each line on every node, NODE_RANK 0..NNODES-1; NNODES / MASTER_ADDR as usual):
#   1. python tools/convert_from_hf.py --input Wan2.1-T2V-14B-Diffusers/transformer --output ckpt/wan2.1-t2v-14b \
#        --add-delta-embedder
#   2. python tools/prepare_dataset.py --codec wan-vae --text-encoder umt5 ... --output data/wan14b  (81x480x832)
#   3. STAGE=teacher PRETRAINED=ckpt/wan2.1-t2v-14b DATA_PATH=data/wan14b SAVE=ckpt/anyflow14b-teacher \
#        bash examples/pretrain_anyflow_14b.sh                # LoRA flow matching (reference: 4000 iterations)
#   4. python tools/synthesize_dataset.py --teacher ckpt/anyflow14b-teacher --data-path data/wan14b \
#        --output data/wan14b-synthetic --steps 50 --guidance 3       # teacher samples (paper 5.1)
#   5. STAGE=stage1 TEACHER=ckpt/anyflow14b-teacher DATA_PATH=data/wan14b-synthetic SAVE=ckpt/anyflow14b-stage1 \
#        bash examples/pretrain_anyflow_14b.sh
#   6. STAGE=stage2 TEACHER=ckpt/anyflow14b-teacher STAGE1_CKPT=ckpt/anyflow14b-stage1 \
#        DATA_PATH=data/wan14b-synthetic SAVE=ckpt/anyflow14b-stage2 bash examples/pretrain_anyflow_14b.sh
#   7. python tools/convert_to_hf.py --input ckpt/anyflow14b-stage2 --output export/anyflow14b --merge-lora generator \
#        --ema --dtype bf16
# TEACHER (a LoRA teacher run, or a converted base) is the frozen base of stages 1 and 2: its EMA adapter is
# merged, and in stage 2 it is the real score and the fake score's start. Without TEACHER, PRETRAINED is used.
#
#   # validate the launch on any machine (no GPU): sizes, parameter counts, per-GPU memory plan
#   DRY_RUN=1 bash examples/pretrain_anyflow_14b.sh
#
# AnyFlow-FAR (the causal, frame-autoregressive model; docs/design/far.md): MODEL=far for stages 1 and 2 (the teacher stays
# bidirectional; FAR stage 2's real / fake scores are the bidirectional teacher):
#   MODEL=far STAGE=stage1 TEACHER=ckpt/anyflow14b-teacher DATA_PATH=data/wan14b-synthetic bash examples/pretrain_anyflow_14b.sh
#   MODEL=far STAGE=stage2 TEACHER=ckpt/anyflow14b-teacher STAGE1_CKPT=ckpt/anyflow14b-far-stage1 \
#     DATA_PATH=data/wan14b-synthetic bash examples/pretrain_anyflow_14b.sh
#   MODEL=far STAGE=stage2 DRY_RUN=1 bash examples/pretrain_anyflow_14b.sh   # + FAR tokens and the rollout's KV caches
# FAR defaults: CHUNKS="1 3 3 3 3 3 3 2" (21 latent frames = 81 video frames), TP=8 CP=1 (Transformer Engine's own CP
# attention cannot express the FAR mask: with CP > 1 use BACKEND=local, whose Ulysses exchange runs it, and no FP8),
# stage 1 4000 iterations (long-context probability 0.5, bidirectional branch 0.1), stage 2 1200 iterations.
#   # throughput / smoke run without a dataset
#   MOCK_DATA=1 bash examples/pretrain_anyflow_14b.sh
#
# Every setting below can be overridden from the environment. Extra arguments go to pretrain_anyflow.py.
set -euo pipefail
cd "$(dirname "$0")/.."

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
WORLD_SIZE=$((NNODES * GPUS_PER_NODE))

STAGE=${STAGE:-stage1}                 # teacher | stage1 | stage2
MODEL=${MODEL:-bidirectional}          # bidirectional | far (AnyFlow-FAR, stages 1 and 2)
CHUNKS=${CHUNKS:-1 3 3 3 3 3 3 2}      # MODEL=far: latent frames per chunk (sum = latent frames of the clip)
case "$MODEL" in
  bidirectional) DEFAULT_TP=4; DEFAULT_CP=2 ;;
  far) DEFAULT_TP=8; DEFAULT_CP=1 ;;     # TE's CP attention has no FAR mask: TP only with the te backend
  *) echo "MODEL must be bidirectional or far (got $MODEL)" >&2; exit 2 ;;
esac
[ "$MODEL" = far ] && [ "$STAGE" = teacher ] && { echo "MODEL=far trains stages 1 and 2; the teacher is bidirectional" >&2; exit 2; }
TP=${TP:-$DEFAULT_TP}                  # tensor parallel (with sequence parallel)
CP=${CP:-$DEFAULT_CP}                  # context parallel (Ulysses over heads / TE CP attention)
BACKEND=${BACKEND:-te}                 # te (FP8, fused attention) | local
MICRO_BATCH=${MICRO_BATCH:-1}
GLOBAL_BATCH=${GLOBAL_BATCH:-16}       # AnyFlow 14B: 16
FP8=${FP8:-hybrid}                     # hybrid | e4m3 | "" (bf16 only)
FP8_RECIPE=${FP8_RECIPE:-delayed}      # delayed | tensorwise | mxfp8 (Blackwell) | blockwise
RECOMPUTE=${RECOMPUTE:-full}           # none | selective | full
FRAMES=${FRAMES:-81}; HEIGHT=${HEIGHT:-480}; WIDTH=${WIDTH:-832}
PRESET=${PRESET:-wan2.1-14b}           # the architecture of DRY_RUN / MOCK_DATA runs and of the plan (wan2.2-t2v-a14b:
                                       # one expert in stage 1 with --expert, both in stage 2 with --pretrained-2;
                                       # examples/pretrain_anyflow_wan22_a14b.sh)
PRETRAINED=${PRETRAINED:-ckpt/wan2.1-t2v-14b}
TEACHER=${TEACHER:-}
STAGE1_CKPT=${STAGE1_CKPT:-}
DATA_PATH=${DATA_PATH:-data/wan14b}
SUFFIX=$([ "$MODEL" = far ] && echo "far-$STAGE" || echo "$STAGE")
SAVE=${SAVE:-ckpt/anyflow14b-$SUFFIX}
MOCK_DATA=${MOCK_DATA:-0}
DRY_RUN=${DRY_RUN:-0}
case "$STAGE" in
  teacher) ITERS=${ITERS:-4000}; LR=${LR:-5e-5} ;;
  stage1)  ITERS=${ITERS:-4000}; LR=${LR:-5e-5} ;;
  stage2)  ITERS=${ITERS:-$([ "$MODEL" = far ] && echo 1200 || echo 800)};  LR=${LR:-2e-6} ;;
  *) echo "STAGE must be teacher, stage1 or stage2 (got $STAGE)" >&2; exit 2 ;;
esac
LAT_F=$(( (FRAMES - 1) / 4 + 1 )); LAT_H=$((HEIGHT / 8)); LAT_W=$((WIDTH / 8))   # Wan VAE: 4x time, 8x space

ARGS=(--stage "$STAGE" --model-preset "$PRESET" --bf16 --backend "$BACKEND"
      --tensor-model-parallel-size "$TP" --sequence-parallel --context-parallel-size "$CP"
      --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --train-iters "$ITERS" --lr "$LR"
      --lora-rank 256 --lora-alpha 256 --recompute-granularity "$RECOMPUTE"
      --save "$SAVE" --load "$SAVE" --save-interval 200 --log-interval 1 --tensorboard-dir "$SAVE/tensorboard")
[ "$BACKEND" = local ] && FP8=""           # FP8 GEMMs come from Transformer Engine
[ -n "$FP8" ] && ARGS+=(--fp8-format "$FP8" --fp8-recipe "$FP8_RECIPE")
read -r -a CHUNK_ARR <<< "$CHUNKS"
FAR_ARGS=(); PLAN_FAR=()
if [ "$MODEL" = far ]; then
  FAR_ARGS=(--model far --chunk-partition "${CHUNK_ARR[@]}")
  PLAN_FAR=(--model far --chunk-partition "${CHUNK_ARR[@]}")   # the plan adds the FAR tokens and KV caches
  [ "$STAGE" = stage1 ] && FAR_ARGS+=(--long-context-prob 0.5 --far-bidirectional-prob 0.1)
  ARGS+=("${FAR_ARGS[@]}")
fi
# The te backend's fused attention is not an op the save-attention policy can keep: selective = modules here.
POLICY=()
[ "$RECOMPUTE" = selective ] && [ "$BACKEND" = te ] && POLICY=(--recompute-policy modules) && ARGS+=("${POLICY[@]}")
if [ "$MOCK_DATA" = 1 ] || [ "$DRY_RUN" = 1 ]; then
  ARGS+=(--mock-data --mock-latent-shape "$LAT_F" 16 "$LAT_H" "$LAT_W" --mock-text-len 512)
else
  ARGS+=(--data-path "$DATA_PATH")
fi
BASE_CKPT=$PRETRAINED
[ "$STAGE" != teacher ] && [ -n "$TEACHER" ] && BASE_CKPT=$TEACHER
[ "$DRY_RUN" = 1 ] || [ -e "$BASE_CKPT" ] && ARGS+=(--pretrained "$BASE_CKPT")
[ "$STAGE" = stage2 ] && [ -n "$STAGE1_CKPT" ] && ARGS+=(--init-adapters-from "$STAGE1_CKPT")

if [ "$DRY_RUN" = 1 ]; then
  python pretrain_anyflow.py "${ARGS[@]}" --dry-run --world-size "$WORLD_SIZE" "$@"
  STAGE_NO=$([ "$STAGE" = stage2 ] && echo 2 || echo 1)
  PLAN_EXPERTS=()   # stage 2 of a two-expert preset holds both experts (the trainer builds the pair)
  case "$PRESET" in *a14b) [ "$STAGE" = stage2 ] && PLAN_EXPERTS=(--experts 2) ;; esac
  python tools/memory_plan.py --preset "$PRESET" --stage "$STAGE_NO" "${PLAN_EXPERTS[@]}" --tp "$TP" --cp "$CP" \
    --dp $((WORLD_SIZE / (TP * CP))) --frames "$FRAMES" --height "$HEIGHT" --width "$WIDTH" \
    --micro-batch "$MICRO_BATCH" --recompute "$RECOMPUTE" "${POLICY[@]}" ${FP8:+--fp8 "$FP8"} "${PLAN_FAR[@]}"
  exit 0
fi

export CUDA_DEVICE_MAX_CONNECTIONS=1   # TP communication ordering (Megatron)
torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" pretrain_anyflow.py "${ARGS[@]}" "$@"
