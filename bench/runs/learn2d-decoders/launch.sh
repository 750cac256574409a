#!/bin/bash
# The last stage of the shipped 2D model: 600 steps of the decoders alone (run as 300, then resumed to 600) (G and both T frozen, so
# registration is exactly that of learn2d-synth2), exact-target synthesis weight 100, rate 1e-3.
# Start: learn2d-synth2's final EMA (/work/runs/learn2d-synth2/model_ema.pt). Resume with the same command.
cd /work/main
R=/work/runs/learn2d-decoders
RES=""; [ -f $R/checkpoint.pt ] && RES="--resume"
INIT=""; [ -z "$RES" ] && INIT="--init /work/runs/learn2d-synth2/model_ema.pt"
OMP_NUM_THREADS=${THREADS:-1} exec .venv/bin/firekit train --recipe learn2d-synth --amp-cpu $INIT \
  --train-only decoders --synthesis-weight 100 --lr-synthesis 1e-3 --iterations 600 --warmup-steps 20 --seed 3 \
  --a 'data/demo/train/*/T1.nii.gz' --b 'data/demo/train/*/T2.nii.gz' --labels 'data/demo/train/*/labels.nii.gz' \
  --val-a 'data/demo/val/*/T1.nii.gz' --val-b 'data/demo/val/*/T2.nii.gz' --val-labels 'data/demo/val/*/labels.nii.gz' \
  --out $R $RES --quiet
