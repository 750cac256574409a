#!/bin/bash
# learn2d-contrast: the shipped 2D model fine-tuned with the near-alignment stage's terms while half of its
# pairs pass B through a random intensity curve (bench/training.md section 9); one CPU thread by default;
# resumable: rerun this script.
cd /work/main
R=/work/runs/learn2d-contrast
RES=""; [ -f $R/checkpoint.pt ] && RES="--resume"
OMP_NUM_THREADS=${THREADS:-1} exec .venv/bin/firekit train --recipe learn2d-contrast --init firekit/weights/fire2d_t1_t2like_small.pt \
  --amp-cpu --seed 9 \
  --a 'data/demo/train/*/T1.nii.gz' --b 'data/demo/train/*/T2.nii.gz' --labels 'data/demo/train/*/labels.nii.gz' \
  --val-a 'data/demo/val/*/T1.nii.gz' --val-b 'data/demo/val/*/T2.nii.gz' --val-labels 'data/demo/val/*/labels.nii.gz' \
  --out $R $RES --quiet
