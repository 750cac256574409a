"""firekit: the FIRE registration model (Wang, Yang, Papanastasiou, Sensors 2022), in 2D and 3D.

The public names below resolve on first use (PEP 562), so ``import firekit`` and the command
line's ``--help`` import no torch; ``firekit.Fire`` and ``from firekit import Fire`` work as usual.
Subpackages (``firekit.core``, ``firekit.data``, ``firekit.fire``, ``firekit.registration``,
``firekit.training``, ``firekit.explain``) resolve the same way; the README's "How the code is laid
out" says what each holds.
"""

from importlib import import_module
from importlib.util import find_spec

from firekit.core.errors import FirekitError

__version__ = "0.1.0"

# public name -> the submodule that defines it (imported when the name is first read)
_LAZY = {
    "FireLoss": "fire.losses",
    "fire_loss": "fire.losses",
    "smooth_lambda": "fire.losses",
    "Fire": "fire.model",
    "FireConfig": "fire.model",
    "FireOutput": "fire.model",
    "Registration": "fire.model",
    "Transform": "fire.model",
    "RegistrationResult": "registration.pipeline",
    "load": "registration.pipeline",
    "register": "registration.pipeline",
    "register_pairs": "registration.pipeline",
    "TrainConfig": "training.config",
    "TrainResult": "training.loop",
    "make_optimizers": "training.optim",
    "train_step": "training.step",
}

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
    "register",
    "register_pairs",
    "make_optimizers",
    "smooth_lambda",
    "train_step",
    "__version__",
]


def __getattr__(name: str):
    """Import a public name's submodule (or a submodule itself) on first use, then cache it."""
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    elif not name.startswith("__") and find_spec(f"{__name__}.{name}") is not None:
        value = import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
