#!/usr/bin/env bash
# AnyFlow on Wan2.2-TI2V-5B (48-channel latents of the Wan2.2 VAE: 16x space, 4x time), one GPU, in the reference's
# order: convert -> prepare data -> teacher (LoRA flow matching) -> teacher-synthesised data -> stage 1 -> stage 2
# -> export (a diffusers AnyFlowPipeline directory that loads as is, checked by --verify).
#
#   WAN=/models/Wan2.2-TI2V-5B-Diffusers VIDEOS=/data/videos CAPTIONS=/data/captions.json \
#     bash examples/pretrain_anyflow_wan22_5b.sh
#   DRY_RUN=1 bash examples/pretrain_anyflow_wan22_5b.sh   # any machine, no GPU, no model: the launch checks and
#                                                          # the per-GPU memory plan of stage 1 and stage 2
#   bash examples/pretrain_anyflow_wan22_5b.sh --tiny      # (or TINY=1) the whole chain on CPU, tiny-wan2.2-ti2v
#
# WAN      a diffusers Wan2.2-TI2V-5B pipeline directory (transformer/, vae/, text_encoder/, tokenizer/)
# VIDEOS   a folder of videos (with CAPTIONS, JSON file -> caption) or WebDataset .tar shards
# The real run is examples/pretrain_anyflow_1.3b.sh with the Wan2.2 settings (codec wan2.2-vae, 24 fps, one GPU,
# selective recomputation, a whole-pipeline export); its SKIP_* variables apply (SKIP_TEACHER=1: the converted
# base is the teacher). Clip: Wan2.2 TI2V-5B's 720p, 121 frames at
# 24 fps, 704 x 1280 (FRAMES / HEIGHT / WIDTH; multiples of 32: the VAE's 16x times the 2x2 patch) ->
# latents 31 x 48 x 44 x 80 -> 27,280 tokens. Hyper-parameters: the 1.3B script's (the reference's for Wan2.1: LoRA
# 256, lr 5e-5 for the teacher and stage 1, 2e-6 for stage 2, global batch 32); nobody has published AnyFlow
# settings for Wan2.2. Memory: stage 1 and stage 2 fit one H200 (141 GB) with selective recomputation
# (save-attention); DRY_RUN=1 prints the plan (RECOMPUTE=full for an 80 GB card). Text-to-video and TI2V (the
# first latent frame held clean) share the weights: generate with --image for TI2V (tools/generate.py). To train
# the TI2V task as well, pass --i2v-prob 0.5 (extra arguments go to every training run: each stage then holds
# frame 0 of half its samples clean, as the pipeline samples TI2V).
#
# --tiny (CPU, about 10 minutes on 2 cores): synthetic video-like 48-channel latents (megatron_anyflow/testing/
# quality.py), the tiny-wan2.2-ti2v preset trained from scratch as the teacher, its 50-step samples, stage 1,
# stage 2, the export with a tiny random Wan2.2 VAE and umT5 (megatron_anyflow/testing/tiny_components.py) and
# --verify, generation from the export (decoded through its VAE), and the test-time scaling table of the teacher,
# the stage-1 and the stage-2 student (latent PSNR against the teacher's 50-step samples). Settings: OUT
# (outputs/tiny-wan22; an earlier --tiny run's folder is replaced, any other non-empty one refused),
# TEACHER_ITERS (400), STAGE1_ITERS (400), STAGE2_ITERS (100). Stage 1 is the README
# tiny job's recipe (LoRA 32, 400 iterations; in one 1000-iteration run the 4- to 16-step PSNR fell while
# 1 step rose: the many-step floor of issue #17).
# Extra arguments (real runs) go to every training run.
set -euo pipefail
cd "$(dirname "$0")/.."

TINY=${TINY:-0}
if [ "${1:-}" = --tiny ]; then TINY=1; shift; fi
step() { echo; echo "=== [$(date +%H:%M:%S)] $*"; }

if [ "$TINY" = 1 ]; then
  [ $# -eq 0 ] || { echo "--tiny takes no arguments (got $*); settings: OUT, TEACHER_ITERS, STAGE1_ITERS, STAGE2_ITERS" >&2; exit 2; }
  OUT=${OUT:-outputs/tiny-wan22}
  TEACHER_ITERS=${TEACHER_ITERS:-400}; STAGE1_ITERS=${STAGE1_ITERS:-400}; STAGE2_ITERS=${STAGE2_ITERS:-100}
  export PYTHONWARNINGS=ignore
  START=$(date +%s)
  # Replace only an earlier tiny run's folder (its marker file): never a user's non-empty directory.
  if [ -d "$OUT" ] && [ -n "$(ls -A "$OUT")" ] && [ ! -f "$OUT/.tiny-wan22-run" ]; then
    echo "OUT=$OUT exists and is not an earlier --tiny run (no $OUT/.tiny-wan22-run): choose another OUT" >&2; exit 2
  fi
  rm -rf "$OUT"; mkdir -p "$OUT"; touch "$OUT/.tiny-wan22-run"
  step "1/9 data: 256 synthetic video-like latents [2, 48, 4, 4] (4 prompts), tiny random Wan2.2 VAE + umT5"
  python -c "from megatron_anyflow.testing.quality import write_video_like_dataset as w; w('$OUT/data')"
  python -m megatron_anyflow.testing.tiny_components --wan22-vae "$OUT/wan/vae" --umt5 "$OUT/wan"

  COMMON=(--model-preset tiny-wan2.2-ti2v --log-interval 50 --seed 1234 --num-workers 0)
  step "2/9 teacher: flow matching from scratch (full fine-tuning), $TEACHER_ITERS iterations"
  python pretrain_anyflow.py --stage teacher "${COMMON[@]}" --data-path "$OUT/data" --lora-rank 0 \
    --micro-batch-size 8 --train-iters "$TEACHER_ITERS" --lr 1e-3 --lr-warmup-iters 20 --lr-decay-style cosine \
    --min-lr 1e-4 --text-dropout 0.1 --save "$OUT/ckpt/teacher"

  step "3/9 teacher-synthesised data: the teacher's 50-step ODE samples for every prompt"
  python tools/synthesize_dataset.py --teacher "$OUT/ckpt/teacher" --data-path "$OUT/data" --output "$OUT/synthetic" \
    --steps 50 --guidance 1

  COMMON+=(--data-path "$OUT/synthetic" --guidance 1 --pretrained "$OUT/ckpt/teacher" --lora-exclude 'condition_embedder.*')
  step "4/9 stage 1: forward flow-map training (LoRA generator on the frozen teacher), $STAGE1_ITERS iterations"
  python pretrain_anyflow.py --stage stage1 "${COMMON[@]}" --lora-rank 32 --lora-alpha 32 --micro-batch-size 8 \
    --train-iters "$STAGE1_ITERS" --lr 1e-3 --lr-warmup-iters 50 --lr-decay-style cosine --min-lr 1e-4 \
    --ema-decay 0.99 --ema-start-iter 0 --save "$OUT/ckpt/stage1"

  step "5/9 stage 2: on-policy distillation (flow-map backward simulation), $STAGE2_ITERS iterations"
  python pretrain_anyflow.py --stage stage2 "${COMMON[@]}" --init-adapters-from "$OUT/ckpt/stage1" \
    --micro-batch-size 4 --train-iters "$STAGE2_ITERS" --lr 1e-4 --critic-lr 1e-4 --ema-start-iter 0 \
    --ema-decay 0.9 --simulation-steps 2 4 8 16 --real-guidance 0 --save "$OUT/ckpt/stage2"

  step "6/9 export: AnyFlowPipeline directory (EMA generator merged, Wan2.2 VAE), --verify"
  python tools/convert_to_hf.py --input "$OUT/ckpt/stage2" --output "$OUT/export" --merge-lora generator --ema \
    --pipeline --vae "$OUT/wan/vae" --text-encoder "$OUT/wan/text_encoder" --verify

  step "7/9 generate from the export: 2 prompts (the dataset's embeddings) at N = 1 2 4, decoded by its VAE"
  python -c "
import torch; from safetensors.torch import save_file
from megatron_anyflow.data.latent_dataset import LatentDataset
ds = LatentDataset('$OUT/data')
save_file({'prompt_embeds': torch.stack([ds[i][1] for i in (0, 128)]).float()}, '$OUT/prompts.safetensors')"
  python tools/generate.py --checkpoint "$OUT/export" --prompt-embeds "$OUT/prompts.safetensors" --steps 1 2 4 \
    --frames 5 --height 64 --width 64 --output "$OUT/generate" --no-progress

  for s in stage1 stage2; do
    step "$([ $s = stage1 ] && echo 8 || echo 9)/9 test-time scaling, $s student (EMA) and teacher vs the teacher's 50 steps"
    python tools/evaluate_anyflow.py --teacher "$OUT/ckpt/teacher" --student "$OUT/ckpt/$s" --ema --guidance 1 \
      --data-path "$OUT/data" --output "$OUT/eval_$s" --steps 1 2 4 8 16 --num-samples 8 \
      $([ $s = stage2 ] && echo --diffusers-export "$OUT/export/transformer") > "$OUT/eval_$s.log"
  done
  step "done in $(( $(date +%s) - START )) s: $OUT/eval_stage1/, $OUT/eval_stage2/, $OUT/generate/, $OUT/export/"
  echo "latent PSNR (dB, peak 2) against the teacher's 50-step samples, 8 prompts, same noise:"
  python -c "
import json
from megatron_anyflow.anyflow.evaluation import psnr
m = {s: json.load(open('$OUT/eval_' + s + '/scaling.json'))['metrics'] for s in ('stage1', 'stage2')}
print('| N (NFE) | teacher | stage-1 student | stage-2 student |')
print('|---|---|---|---|')
for n in m['stage2']['teacher']:
    cells = [m['stage2']['teacher'][n], m['stage1']['student'][n], m['stage2']['student'][n]]
    print(f'| {n} | ' + ' | '.join(f'{psnr(c[\"latent_mse\"]):.2f}' for c in cells) + ' |')" | tee "$OUT/scaling_table.md"
  exit 0
fi

GPUS=${GPUS:-1}
TP=${TP:-1}; CP=${CP:-1}
GLOBAL_BATCH=${GLOBAL_BATCH:-32}
RECOMPUTE=${RECOMPUTE:-selective}      # selective (save-attention policy) | full | none
GPU_GIB=${GPU_GIB:-139}                # usable GiB per GPU for the plan (H200; 79.6 for an 80 GB card)
TEACHER_ITERS=${TEACHER_ITERS:-6000}
STAGE1_ITERS=${STAGE1_ITERS:-6000}
STAGE2_ITERS=${STAGE2_ITERS:-800}
SAMPLES_PER_PROMPT=${SAMPLES_PER_PROMPT:-1}
FRAMES=${FRAMES:-121}; HEIGHT=${HEIGHT:-704}; WIDTH=${WIDTH:-1280}
OUT=${OUT:-runs/anyflow-wan22-5b}

COMMON=(--model-preset wan2.2-ti2v-5b --bf16 --lora-rank 256 --lora-alpha 256
        --tensor-model-parallel-size "$TP" --context-parallel-size "$CP" --micro-batch-size 1
        --global-batch-size "$GLOBAL_BATCH" --recompute-granularity "$RECOMPUTE" --log-interval 10)
[ "$TP" -gt 1 ] && COMMON+=(--sequence-parallel)

if [ "${DRY_RUN:-0}" = 1 ]; then
  LAT=($(( (FRAMES - 1) / 4 + 1 )) 48 $((HEIGHT / 16)) $((WIDTH / 16)))   # Wan2.2 VAE: 4x time, 16x space, 48 channels
  for STAGE in stage1 stage2; do
    step "DRY_RUN: $STAGE of Wan2.2-TI2V-5B on $GPUS GPU(s), ${FRAMES}x${HEIGHT}x${WIDTH}"
    python pretrain_anyflow.py --stage "$STAGE" "${COMMON[@]}" --train-iters 1 --mock-data \
      --mock-latent-shape "${LAT[@]}" --mock-text-len 512 --dry-run --world-size "$GPUS" "$@"
    python tools/memory_plan.py --preset wan2.2-ti2v-5b --stage "${STAGE#stage}" --tp "$TP" --cp "$CP" \
      --dp $((GPUS / (TP * CP))) --frames "$FRAMES" --height "$HEIGHT" --width "$WIDTH" --recompute "$RECOMPUTE" \
      --gpu-gib "$GPU_GIB"
  done
  exit 0
fi

: "${WAN:?set WAN to a Wan2.2-TI2V-5B-Diffusers directory (or DRY_RUN=1 / --tiny)}"
# The real run is the 1.3B script's (the model comes from the converted checkpoint) with the Wan2.2 settings.
export GPUS TP CP GLOBAL_BATCH RECOMPUTE TEACHER_ITERS STAGE1_ITERS STAGE2_ITERS SAMPLES_PER_PROMPT FRAMES HEIGHT WIDTH OUT
CODEC=wan2.2-vae FPS=24 PIPELINE=1 exec bash examples/pretrain_anyflow_1.3b.sh "$@"
