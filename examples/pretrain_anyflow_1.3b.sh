#!/usr/bin/env bash
# AnyFlow on Wan2.1-T2V-1.3B, one node, in the reference's order:
#   convert -> prepare data -> teacher (LoRA flow matching) -> teacher-synthesised data -> stage 1 -> stage 2 -> export
#
#   WAN=/models/Wan2.1-T2V-1.3B-Diffusers VIDEOS=/data/videos CAPTIONS=/data/captions.json \
#     bash examples/pretrain_anyflow_1.3b.sh
#
# WAN      a diffusers Wan2.1 pipeline directory (transformer/, vae/, text_encoder/, tokenizer/)
# VIDEOS   a folder of videos (with CAPTIONS, JSON file -> caption) or WebDataset .tar shards
#          (.mp4/.webm + .json {"caption": ...})
# Steps can be skipped by setting SKIP_CONVERT=1 / SKIP_DATA=1 / SKIP_TEACHER=1 / SKIP_SYNTH=1 / SKIP_STAGE1=1 /
# SKIP_STAGE2=1. With SKIP_TEACHER=1 the converted base is the teacher.
# Reference hyper-parameters (paper 5.1 and the reference configs): teacher LoRA 256 on the attention and FFN
# linears, 6000 iterations, lr 5e-5, EMA 0.999 after 1000; stage 1 6000 iterations, global batch 32, lr 5e-5,
# LoRA 256; stage 2 800 iterations, lr 2e-6, the real score and the fake score's start being the teacher's
# EMA. One difference, by design: the generator's LoRA lives on the teacher-merged base (one frozen base for
# the three stage-2 roles), where the reference puts it on the raw Wan base. Extra arguments go to every
# training run. examples/pretrain_anyflow_wan22_5b.sh runs Wan2.2-TI2V-5B through this script (the model
# comes from the converted checkpoint; CODEC / FPS / RECOMPUTE / PIPELINE=1 set the rest).
set -euo pipefail
cd "$(dirname "$0")/.."

WAN=${WAN:?set WAN to a Wan2.1-T2V-1.3B-Diffusers directory}
VIDEOS=${VIDEOS:?set VIDEOS to a folder of videos or WebDataset shards}
CAPTIONS=${CAPTIONS:-}
OUT=${OUT:-runs/anyflow-1.3b}
GPUS=${GPUS:-8}
TP=${TP:-1}; CP=${CP:-1}
GLOBAL_BATCH=${GLOBAL_BATCH:-32}
TEACHER_ITERS=${TEACHER_ITERS:-6000}
STAGE1_ITERS=${STAGE1_ITERS:-6000}
SAMPLES_PER_PROMPT=${SAMPLES_PER_PROMPT:-1}
STAGE2_ITERS=${STAGE2_ITERS:-800}
FRAMES=${FRAMES:-81}; HEIGHT=${HEIGHT:-480}; WIDTH=${WIDTH:-832}
CODEC=${CODEC:-wan-vae}                # wan-vae (Wan2.1) | wan2.2-vae (Wan2.2 TI2V-5B)
FPS=${FPS:-16}
RECOMPUTE=${RECOMPUTE:-full}           # full | selective | none
PIPELINE=${PIPELINE:-0}                # 1: export a whole AnyFlowPipeline (VAE, text encoder, tokenizer copied)

step() { echo; echo "=== [$(date +%H:%M:%S)] $*"; }
mkdir -p "$OUT"

if [ "${SKIP_CONVERT:-0}" != 1 ]; then
  step "convert the diffusers transformer (delta embedder added as a copy of the time embedder)"
  python tools/convert_from_hf.py --input "$WAN/transformer" --output "$OUT/ckpt/base" --add-delta-embedder --overwrite
fi

if [ "${SKIP_DATA:-0}" != 1 ]; then
  step "prepare data: DALI decode (GPU) -> Wan VAE latents (normalised) + umT5 embeddings (512 tokens)"
  python tools/prepare_dataset.py --input "$VIDEOS" ${CAPTIONS:+--captions "$CAPTIONS"} --output "$OUT/data" \
    --codec "$CODEC" --vae "$WAN/vae" --text-encoder umt5 --text-encoder-path "$WAN/text_encoder" \
    --num-frames "$FRAMES" --height "$HEIGHT" --width "$WIDTH" --fps "$FPS"
fi

COMMON=(--bf16 --lora-rank 256 --lora-alpha 256
        --tensor-model-parallel-size "$TP" --context-parallel-size "$CP" --micro-batch-size 1
        --global-batch-size "$GLOBAL_BATCH" --recompute-granularity "$RECOMPUTE" --log-interval 10)
[ "$TP" -gt 1 ] && COMMON+=(--sequence-parallel)
LAUNCH=(torchrun --nproc_per_node "$GPUS")
TEACHER="$OUT/ckpt/teacher"
[ "${SKIP_TEACHER:-0}" = 1 ] && TEACHER="$OUT/ckpt/base"

if [ "${SKIP_TEACHER:-0}" != 1 ]; then
  step "teacher: LoRA flow matching on your clips, on top of the converted base"
  "${LAUNCH[@]}" pretrain_anyflow.py --stage teacher "${COMMON[@]}" --pretrained "$OUT/ckpt/base" \
    --data-path "$OUT/data" --train-iters "$TEACHER_ITERS" --lr 5e-5 --save "$TEACHER" --load "$TEACHER" \
    --save-interval 500 --tensorboard-dir "$OUT/tb/teacher" "$@"
fi

if [ "${SKIP_SYNTH:-0}" != 1 ]; then
  step "teacher-synthesised data: the teacher's 50-step samples (CFG 3) for every prompt (paper 5.1)"
  python tools/synthesize_dataset.py --teacher "$TEACHER" --data-path "$OUT/data" --output "$OUT/synthetic" \
    --steps 50 --guidance 3 --samples-per-prompt "$SAMPLES_PER_PROMPT" --batch-size 1
fi

if [ "${SKIP_STAGE1:-0}" != 1 ]; then
  step "stage 1: forward flow-map training"
  "${LAUNCH[@]}" pretrain_anyflow.py --stage stage1 "${COMMON[@]}" --pretrained "$TEACHER" \
    --data-path "$OUT/synthetic" --train-iters "$STAGE1_ITERS" --lr 5e-5 \
    --save "$OUT/ckpt/stage1" --load "$OUT/ckpt/stage1" --save-interval 500 --tensorboard-dir "$OUT/tb/stage1" "$@"
fi

if [ "${SKIP_STAGE2:-0}" != 1 ]; then
  step "stage 2: on-policy distillation with flow-map backward simulation"
  "${LAUNCH[@]}" pretrain_anyflow.py --stage stage2 "${COMMON[@]}" --pretrained "$TEACHER" \
    --data-path "$OUT/synthetic" --init-adapters-from "$OUT/ckpt/stage1" \
    --train-iters "$STAGE2_ITERS" --lr 2e-6 --save "$OUT/ckpt/stage2" --load "$OUT/ckpt/stage2" \
    --save-interval 100 --tensorboard-dir "$OUT/tb/stage2" "$@"
fi

step "export the student (EMA generator merged) for diffusers"
rm -rf "$OUT/export"
if [ "$PIPELINE" = 1 ]; then
  python tools/convert_to_hf.py --input "$OUT/ckpt/stage2" --output "$OUT/export" --merge-lora generator --ema \
    --dtype bf16 --pipeline --vae "$WAN/vae" --text-encoder "$WAN/text_encoder" --tokenizer "$WAN/tokenizer"
  echo "load with: AnyFlowPipeline.from_pretrained('$OUT/export'); pipe(prompt, height=$HEIGHT, width=$WIDTH," \
    "num_frames=$FRAMES, num_inference_steps=4) (first frame given: video=[image])"
else
  python tools/convert_to_hf.py --input "$OUT/ckpt/stage2" --output "$OUT/export" --merge-lora generator --ema --dtype bf16
  echo "load with: AnyFlowTransformer3DModel.from_pretrained('$OUT/export'), sample with FlowMapEulerDiscreteScheduler"
fi
