#!/bin/bash
# The 2D fine stage (issue 18, coarse-to-fine): the learn2d-fine recipe at 1.28 mm, 2,000 steps, from the
# shipped 2.56 mm model (the coarse stage's EMA after its synthesis stages), keeping the synthesis and
# invariance terms. Detached, one thread; resume with the same command (checkpoint.pt in $R).
# Stopped by SIGTERM at steps 707 and 1,597 on 2026-12-06, resumed each time, finished at 2,000 (validation
# Dice 0.658; the 2.56 mm model's was 0.638). Results and why it is not shipped: bench/training.md section 6.
cd /work/main
R=${RUN:-/work/runs/learn2d-fine}
RES=""; [ -f $R/checkpoint.pt ] && RES="--resume"
INIT=""; [ -z "$RES" ] && INIT="--init firekit/weights/fire2d_t1_t2like_small.pt"
OMP_NUM_THREADS=${THREADS:-1} exec .venv/bin/firekit train --recipe learn2d-fine --amp-cpu $INIT --seed 5 \
  --a 'data/demo/train/*/T1.nii.gz' --b 'data/demo/train/*/T2.nii.gz' --labels 'data/demo/train/*/labels.nii.gz' \
  --val-a 'data/demo/val/*/T1.nii.gz' --val-b 'data/demo/val/*/T2.nii.gz' --val-labels 'data/demo/val/*/labels.nii.gz' \
  --out $R $RES --quiet
