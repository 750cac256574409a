#!/bin/bash
# Continuation of the learn2d coarse stage: steps 12,001-20,000, started from the step-12,000 EMA
# weights (the step-12,000 checkpoint with the optimiser state was not kept), at the rate the
# 20,000-step cosine had reached at step 12,000 (~4e-4), cosine to 5% over 8,000 steps.
cd /work/main
R=/work/runs/learn2d-cont
RES=""; [ -f $R/checkpoint.pt ] && RES="--resume"
INIT=""; [ -z "$RES" ] && INIT="--init firekit/weights/fire2d_t1_t2like_small.pt"
OMP_NUM_THREADS=${THREADS:-1} exec .venv/bin/firekit train --recipe learn2d --amp-cpu $INIT \
  --lr-affine 4e-4 --lr-nonrigid 4e-4 --lr-synthesis 4e-4 --warmup-steps 200 --iterations 8000 --seed 1 \
  --a 'data/demo/train/*/T1.nii.gz' --b 'data/demo/train/*/T2.nii.gz' --labels 'data/demo/train/*/labels.nii.gz' \
  --val-a 'data/demo/val/*/T1.nii.gz' --val-b 'data/demo/val/*/T2.nii.gz' --val-labels 'data/demo/val/*/labels.nii.gz' \
  --out $R $RES --quiet
