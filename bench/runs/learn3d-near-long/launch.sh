#!/bin/bash
# learn3d-near-long: the learn3d-near recipe on a cosine three times as long (3,000 steps), so that the
# registration has room to recover from the new terms (bench/training.md section 7);
# from the shipped 3D model (the learn3d EMA of step 5,000); one CPU thread by default; resumable: rerun this script.
cd /work/main
R=/work/runs/learn3d-near-long
RES=""; [ -f $R/checkpoint.pt ] && RES="--resume"
OMP_NUM_THREADS=${THREADS:-1} exec .venv/bin/firekit train --recipe learn3d-near --init firekit/weights/fire3d_t1_t2like_small.pt \
  --ndim 3 --spacing 5.12 --amp-cpu --seed 8 --iterations 3000 \
  --a 'data/demo/train/*/T1.nii.gz' --b 'data/demo/train/*/T2.nii.gz' --labels 'data/demo/train/*/labels.nii.gz' \
  --val-a 'data/demo/val/*/T1.nii.gz' --val-b 'data/demo/val/*/T2.nii.gz' --val-labels 'data/demo/val/*/labels.nii.gz' \
  --out $R $RES --quiet
