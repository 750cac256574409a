#!/bin/bash
# learn2d-near: the shipped 2D model fine-tuned with 30 % of its pairs at or near alignment
# (bench/training.md section 8); one CPU thread by default; resumable: rerun this script.
cd /work/main
R=/work/runs/learn2d-near
RES=""; [ -f $R/checkpoint.pt ] && RES="--resume"
OMP_NUM_THREADS=${THREADS:-1} exec .venv/bin/firekit train --recipe learn2d-near --init firekit/weights/fire2d_t1_t2like_small.pt \
  --amp-cpu --seed 5 \
  --a 'data/demo/train/*/T1.nii.gz' --b 'data/demo/train/*/T2.nii.gz' --labels 'data/demo/train/*/labels.nii.gz' \
  --val-a 'data/demo/val/*/T1.nii.gz' --val-b 'data/demo/val/*/T2.nii.gz' --val-labels 'data/demo/val/*/labels.nii.gz' \
  --out $R $RES --quiet
