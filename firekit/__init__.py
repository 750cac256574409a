"""firekit: the FIRE registration model (Wang, Yang, Papanastasiou, Sensors 2022), in 2D and 3D."""

from .errors import FirekitError
from .losses import FireLoss, fire_loss, smooth_lambda
from .model import Fire, FireConfig, FireOutput, Registration, Transform
from .register import RegistrationResult, load
from .train import TrainConfig, TrainResult, make_optimizers, train_step

__version__ = "0.1.0"

__all__ = [
    "Fire",
    "FireConfig",
    "FireOutput",
    "FireLoss",
    "FirekitError",
    "Registration",
    "RegistrationResult",
    "TrainConfig",
    "TrainResult",
    "Transform",
    "fire_loss",
    "load",
    "make_optimizers",
    "smooth_lambda",
    "train_step",
    "__version__",
]
