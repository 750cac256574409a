#!/bin/bash
# learn3d recipe at 5.12 mm on the demo data, one CPU thread (no GPU lent); resumable: rerun this script.
cd /work/main
R=/work/runs/learn3d
RES=""; [ -f $R/checkpoint.pt ] && RES="--resume"
OMP_NUM_THREADS=${THREADS:-1} exec .venv/bin/firekit train --recipe learn3d --ndim 3 --spacing 5.12 --amp-cpu \
  --iterations 5000 --val-every 250 --checkpoint-every 125 \
  --a 'data/demo/train/*/T1.nii.gz' --b 'data/demo/train/*/T2.nii.gz' --labels 'data/demo/train/*/labels.nii.gz' \
  --val-a 'data/demo/val/*/T1.nii.gz' --val-b 'data/demo/val/*/T2.nii.gz' --val-labels 'data/demo/val/*/labels.nii.gz' \
  --out $R $RES --quiet
