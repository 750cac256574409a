#!/bin/bash
# The synthesis stage of the shipped 2D model: 1,500 steps of the learn2d-synth recipe (synthesis
# weight 10, invariance weight 30, rates 3e-4 on a cosine, EMA 0.99) from the EMA of step 16,500 of
# learn2d-cont (the model shipped before this stage). Resume with the same command.
cd /work/main
R=/work/runs/learn2d-synth
RES=""; [ -f $R/checkpoint.pt ] && RES="--resume"
# the start: the 2D model as shipped at commit 5bf43a0 (the EMA of learn2d-cont's step 16,500)
[ -f $R.start.pt ] || { mkdir -p "$(dirname $R)"; git show 5bf43a0:firekit/weights/fire2d_t1_t2like_small.pt > $R.start.pt; }
INIT=""; [ -z "$RES" ] && INIT="--init $R.start.pt"
OMP_NUM_THREADS=${THREADS:-1} exec .venv/bin/firekit train --recipe learn2d-synth --amp-cpu $INIT --seed 2 \
  --a 'data/demo/train/*/T1.nii.gz' --b 'data/demo/train/*/T2.nii.gz' --labels 'data/demo/train/*/labels.nii.gz' \
  --val-a 'data/demo/val/*/T1.nii.gz' --val-b 'data/demo/val/*/T2.nii.gz' --val-labels 'data/demo/val/*/labels.nii.gz' \
  --out $R $RES --quiet
