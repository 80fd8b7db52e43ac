"""Field helpers for the settings dataclasses that double as config schemas.

A pure core's settings dataclass (``ExtractSettings``, ``TrainSettings``, ``SyntheticSpec``) is the one
definition of its options; ``rrt_dist.config`` extends it into the Hydra schema. Bounds and choices ride on
the fields as metadata, so :func:`rrt_dist.config.validate_config` checks them without a second list.
"""
from __future__ import annotations

from dataclasses import MISSING, field


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


def bounded(default=MISSING, *, ge=None, gt=None, le=None, lt=None, factory=None):
    """A field whose value (each element, for lists) must lie within the given bounds (None always passes)."""
    limits = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if factory is not None:
        return field(default_factory=factory, metadata={"bounds": limits})
    return field(default=default, metadata={"bounds": limits})


def choice(default, *options):
    return field(default=default, metadata={"choices": options})
