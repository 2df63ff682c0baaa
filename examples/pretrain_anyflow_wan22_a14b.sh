#!/usr/bin/env bash
# AnyFlow on Wan2.2-T2V-A14B (or I2V-A14B: PRESET=wan2.2-i2v-a14b, below): two 14B experts split at the boundary
# b = 0.875 (0.9 for I2V; diffusers' boundary_ratio:
# `transformer` serves t >= b, `transformer_2` below). The two-expert teacher's ODE samples for DATA_PATH's
# prompts are the training data (tools/synthesize_dataset.py --teacher-2: each Euler step on the expert of its
# timestep, as diffusers' WanPipeline; paper 5.1), each expert is distilled on its own time range (stage 1,
# one run per expert: t, r in [b, 1] for the high-noise expert, [0, b] for the low-noise one), then both together
# (stage 2: both resident, each call routed to the expert of its range; the rollout splits its one jump across b),
# and the pair is exported as one AnyFlowTwoExpertPipeline, whose grid puts b on the grid so that no jump crosses
# it (docs/design/anyflow.md, "Wan2.2 A14B"; README, "Wan2.2").
#
#   WAN=/models/Wan2.2-T2V-A14B-Diffusers DATA_PATH=data/a14b bash examples/pretrain_anyflow_wan22_a14b.sh
#   DRY_RUN=1 bash examples/pretrain_anyflow_wan22_a14b.sh   # any machine, no GPU, no model: the launch checks of
#                                                            # both experts' stage 1 and of stage 2, and the
#                                                            # per-GPU memory plans
#
# WAN        a diffusers Wan2.2-T2V-A14B pipeline directory (transformer/, transformer_2/, vae/, text_encoder/, ...)
# DATA_PATH  latents of your videos at 81 x 480 x 832 (tools/prepare_dataset.py --codec wan-vae: A14B uses the Wan2.1
#            VAE, 16 channels, 16 fps), as for examples/pretrain_anyflow_14b.sh: their prompts (and latent size)
#            are what the teacher samples
# OUT        where the converted experts, the synthesised data ($OUT/synthetic), the stage-1 and stage-2 runs and the
#            export go (runs/anyflow-wan22-a14b)
# SYNTH_STEPS, GUIDANCE, GUIDANCE_2, SAMPLES_PER_PROMPT   the synthesis: Euler steps (50), the high expert's CFG (3),
#            the low expert's (= GUIDANCE), teacher samples per prompt (1); SKIP_SYNTH=1 trains on DATA_PATH itself;
#            the teacher runs in bf16 (synthesize_dataset.py --bf16: 29 GB per expert, tensor cores), SYNTH_BF16=0 fp32
# Each expert's stage 1 and the pair's stage 2 run through examples/pretrain_anyflow_14b.sh (multi-node torchrun;
# NNODES, TP = 4, CP = 2, FP8, ... as documented there) with PRESET=wan2.2-t2v-a14b, and --expert (stage 1) or
# --pretrained-2 / --init-adapters-from-2 (stage 2). The difference from the Wan2.1 chain: no teacher-LoRA stage
# (the trainer refuses it for an expert): each expert's converted base is its own teacher (and the pair of bases
# the teacher that synthesises the data and stage 2's real score).
# PRESET=wan2.2-i2v-a14b (WAN a Wan2.2-I2V-A14B-Diffusers directory): the experts read 36 channels, the noisy
# latents and each clip's image condition (its frame 0 through the VAE, with a mask). DATA_PATH must then hold the
# conditions (tools/prepare_dataset.py --codec wan-vae --i2v-condition); the synthesis draws each sample given its
# clip's condition and keeps it, and the export's pipeline takes image= (README, "Wan2.2 I2V-A14B").
set -euo pipefail
cd "$(dirname "$0")/.."
step() { echo; echo "=== [$(date +%H:%M:%S)] $*"; }

OUT=${OUT:-runs/anyflow-wan22-a14b}
TP=${TP:-4}; CP=${CP:-2}; GPUS=${GPUS:-8}
FRAMES=${FRAMES:-81}; HEIGHT=${HEIGHT:-480}; WIDTH=${WIDTH:-832}
PRESET=${PRESET:-wan2.2-t2v-a14b}
case "$PRESET" in
  wan2.2-t2v-a14b|wan2.2-i2v-a14b) ;;
  *) echo "PRESET=$PRESET: this script trains wan2.2-t2v-a14b or wan2.2-i2v-a14b" >&2; exit 2 ;;
esac
export PRESET TP CP FRAMES HEIGHT WIDTH

if [ "${DRY_RUN:-0}" = 1 ]; then
  for EXPERT in high low; do
    step "DRY_RUN: $PRESET stage 1 of the $EXPERT-noise expert (one 14B model), $GPUS GPUs, ${FRAMES}x${HEIGHT}x${WIDTH}"
    STAGE=stage1 DRY_RUN=1 GPUS_PER_NODE=$GPUS PRETRAINED="$OUT/ckpt/$EXPERT-base" \
      bash examples/pretrain_anyflow_14b.sh --expert "$EXPERT" "$@"
  done
  step "DRY_RUN: two-expert stage 2: both experts' bases, generator, fake score, EMA resident"
  STAGE=stage2 DRY_RUN=1 GPUS_PER_NODE=$GPUS PRETRAINED="$OUT/ckpt/high-base" STAGE1_CKPT="$OUT/ckpt/high-stage1" \
    bash examples/pretrain_anyflow_14b.sh --pretrained-2 "$OUT/ckpt/low-base" \
    --init-adapters-from-2 "$OUT/ckpt/low-stage1" "$@"
  exit 0
fi

: "${WAN:?set WAN to a Wan2.2-T2V-A14B-Diffusers (PRESET=wan2.2-i2v-a14b: I2V-A14B) directory (or DRY_RUN=1)}"
: "${DATA_PATH:?set DATA_PATH to the latents of your videos (tools/prepare_dataset.py --codec wan-vae; I2V: --i2v-condition)}"
for EXPERT in high low; do
  SUB=$([ "$EXPERT" = high ] && echo transformer || echo transformer_2)
  if [ ! -e "$OUT/ckpt/$EXPERT-base" ]; then
    step "convert $WAN/$SUB -> $OUT/ckpt/$EXPERT-base (records the boundary and the expert)"
    python tools/convert_from_hf.py --input "$WAN/$SUB" --output "$OUT/ckpt/$EXPERT-base" --add-delta-embedder
  fi
done
TRAIN_DATA=$OUT/synthetic
if [ "${SKIP_SYNTH:-0}" = 1 ]; then
  TRAIN_DATA=$DATA_PATH
elif [ ! -e "$OUT/synthetic/index.json" ]; then   # index.json is written last: its presence means complete
  step "teacher-synthesised data: the two-expert teacher's ${SYNTH_STEPS:-50}-step samples for DATA_PATH's prompts"
  python tools/synthesize_dataset.py --teacher "$OUT/ckpt/high-base" --teacher-2 "$OUT/ckpt/low-base" \
    --data-path "$DATA_PATH" --output "$OUT/synthetic" --steps "${SYNTH_STEPS:-50}" --guidance "${GUIDANCE:-3}" \
    --guidance-2 "${GUIDANCE_2:-${GUIDANCE:-3}}" --samples-per-prompt "${SAMPLES_PER_PROMPT:-1}" --batch-size 1 \
    $([ "${SYNTH_BF16:-1}" = 1 ] && echo --bf16)
fi
for EXPERT in high low; do
  step "stage 1 of the $EXPERT-noise expert on its time range, on $TRAIN_DATA"
  STAGE=stage1 PRETRAINED="$OUT/ckpt/$EXPERT-base" DATA_PATH="$TRAIN_DATA" SAVE="$OUT/ckpt/$EXPERT-stage1" \
    bash examples/pretrain_anyflow_14b.sh --expert "$EXPERT" "$@"
done
step "stage 2 of both experts together (both resident), on $TRAIN_DATA"
STAGE=stage2 PRETRAINED="$OUT/ckpt/high-base" STAGE1_CKPT="$OUT/ckpt/high-stage1" DATA_PATH="$TRAIN_DATA" \
  SAVE="$OUT/ckpt/stage2" bash examples/pretrain_anyflow_14b.sh --pretrained-2 "$OUT/ckpt/low-base" \
  --init-adapters-from-2 "$OUT/ckpt/low-stage1" "$@"
step "export: both experts of stage 2 as one AnyFlowTwoExpertPipeline (EMA generators merged, bf16)"
python tools/convert_to_hf.py --input "$OUT/ckpt/stage2" \
  --output "$OUT/export" --merge-lora generator --ema --dtype bf16 --pipeline --vae "$WAN/vae" \
  --text-encoder "$WAN/text_encoder" --tokenizer "$WAN/tokenizer"
echo "load it: DiffusionPipeline.from_pretrained('$OUT/export', trust_remote_code=True)"
