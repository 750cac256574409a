"""Plain-data round trips for the dataclass configs (model, training, refinement, augmentation)."""

from __future__ import annotations

import dataclasses

from firekit.core.errors import FirekitError


class PlainConfig:
    """Mixin for ``@dataclass`` configs: :meth:`to_dict` and :meth:`from_dict` as plain data.

    Plain data (lists, numbers, strings) is JSON- and YAML-safe and loads with
    ``torch.load(weights_only=True)``. ``config_name`` names the config in error messages.
    """

    config_name = "config"

    def to_dict(self) -> dict:
        """Plain-data form; tuples become lists."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict):
        """Inverse of :meth:`to_dict` (e.g. a section of a run's config.yaml or a checkpoint's config)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise FirekitError(
                f"{cls.config_name} has unknown fields {sorted(unknown)}; expected some of {sorted(known)} "
                "(written by a newer firekit? upgrade)"
            )
        return cls(**data)
