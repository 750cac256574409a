"""Training FIRE, one job per module (each imports only those listed before it):

* :mod:`~firekit.training.config`: :class:`~firekit.training.config.TrainConfig` and its presets.
* :mod:`~firekit.training.distributed`: several processes under ``torchrun`` (process group, devices, DDP).
* :mod:`~firekit.training.interrupt`: Ctrl-C and SIGTERM held until the running step ends.
* :mod:`~firekit.training.optim`: the three Adam optimisers, learning-rate schedules, the EMA of the weights.
* :mod:`~firekit.training.logs`: losses.csv, validation.csv, config.yaml, the losses read back from the device.
* :mod:`~firekit.training.checkpoints`: the run folder, saving checkpoints and resuming from them.
* :mod:`~firekit.training.loading`: batches drawn ahead, sliced per process, checked and moved to the device.
* :mod:`~firekit.training.validation`: validation Dice.
* :mod:`~firekit.training.distill`: refinement's displacements as distillation targets.
* :mod:`~firekit.training.step`: :func:`~firekit.training.step.train_step`, one optimisation step.
* :mod:`~firekit.training.loop`: :func:`~firekit.training.loop.train`, the loop over a run's steps.
"""
