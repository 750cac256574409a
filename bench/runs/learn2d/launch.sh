#!/bin/bash
# Coarse stage of the learn2d recipe on the demo data; resumable: rerun this script.
cd /work/main
R=/work/runs/learn2d
RES=""; [ -f $R/checkpoint.pt ] && RES="--resume"
OMP_NUM_THREADS=${THREADS:-1} exec .venv/bin/firekit train --recipe learn2d --amp-cpu \
  --a 'data/demo/train/*/T1.nii.gz' --b 'data/demo/train/*/T2.nii.gz' --labels 'data/demo/train/*/labels.nii.gz' \
  --val-a 'data/demo/val/*/T1.nii.gz' --val-b 'data/demo/val/*/T2.nii.gz' --val-labels 'data/demo/val/*/labels.nii.gz' \
  --out $R $RES --quiet
