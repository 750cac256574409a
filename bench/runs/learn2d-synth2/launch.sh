#!/bin/bash
# Second synthesis stage of the shipped 2D model: 600 steps of learn2d-synth with the invariance
# weight doubled (60), from learn2d-synth's final EMA (/work/runs/learn2d-synth/model_ema.pt).
cd /work/main
R=/work/runs/learn2d-synth2
RES=""; [ -f $R/checkpoint.pt ] && RES="--resume"
INIT=""; [ -z "$RES" ] && INIT="--init /work/runs/learn2d-synth/model_ema.pt"
OMP_NUM_THREADS=${THREADS:-1} exec .venv/bin/firekit train --recipe learn2d-synth --amp-cpu $INIT \
  --invariance-weight 60 --iterations 600 --seed 4 \
  --a 'data/demo/train/*/T1.nii.gz' --b 'data/demo/train/*/T2.nii.gz' --labels 'data/demo/train/*/labels.nii.gz' \
  --val-a 'data/demo/val/*/T1.nii.gz' --val-b 'data/demo/val/*/T2.nii.gz' --val-labels 'data/demo/val/*/labels.nii.gz' \
  --out $R $RES --quiet
