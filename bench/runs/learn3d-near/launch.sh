#!/bin/bash
# learn3d-near: the learn3d model (EMA of step 5,000) fine-tuned with the synthesis and invariance
# terms and 30 % of its pairs at or near alignment, at 5.12 mm (bench/training.md section 7);
# one CPU thread by default; resumable: rerun this script.
cd /work/main
R=/work/runs/learn3d-near
RES=""; [ -f $R/checkpoint.pt ] && RES="--resume"
OMP_NUM_THREADS=${THREADS:-1} exec .venv/bin/firekit train --recipe learn3d-near --init /work/runs/learn3d/model_ema.pt \
  --ndim 3 --spacing 5.12 --amp-cpu --seed 7 \
  --a 'data/demo/train/*/T1.nii.gz' --b 'data/demo/train/*/T2.nii.gz' --labels 'data/demo/train/*/labels.nii.gz' \
  --val-a 'data/demo/val/*/T1.nii.gz' --val-b 'data/demo/val/*/T2.nii.gz' --val-labels 'data/demo/val/*/labels.nii.gz' \
  --out $R $RES --quiet
