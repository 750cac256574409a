"""Training FIRE: the loop, optimisers and schedules, checkpoints and resume, run logs, distributed helpers and data loading."""
