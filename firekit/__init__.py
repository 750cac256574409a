"""firekit: the FIRE registration model (Wang, Yang, Papanastasiou, Sensors 2022), in 2D and 3D.

The public names below resolve on first use (PEP 562), so ``import firekit`` and the command
line's ``--help`` import no torch; ``firekit.Fire`` and ``from firekit import Fire`` work as usual.
Submodules (``firekit.io``, ``firekit.spatial``, ...) resolve the same way.
"""

from importlib import import_module
from importlib.util import find_spec

from .errors import FirekitError

__version__ = "0.1.0"

# public name -> the submodule that defines it (imported when the name is first read)
_LAZY = {
    "FireLoss": "losses",
    "fire_loss": "losses",
    "smooth_lambda": "losses",
    "Fire": "model",
    "FireConfig": "model",
    "FireOutput": "model",
    "Registration": "model",
    "Transform": "model",
    "RegistrationResult": "register",
    "load": "register",
    "TrainConfig": "train",
    "TrainResult": "train",
    "make_optimizers": "train",
    "train_step": "train",
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
