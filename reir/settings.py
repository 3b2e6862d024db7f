"""Settings declared once: a dataclass field that carries its own help, allowed values and bounds.

The network's configuration (:class:`reir.model.network.ModelConfig`) and a training run's
(:class:`reir.training.config.TrainConfig`) are dataclasses of such fields, so the command line,
the checks of a configuration built in Python and the messages naming a setting all come from the
one declaration instead of lists kept by hand beside it.
"""

from __future__ import annotations

from dataclasses import MISSING, Field, field, fields
from typing import Any

from reir.errors import UsageError

# How a resumed run treats a setting (the ``resume`` rule of its field).
MUST_MATCH = "must match"
MAY_CHANGE = "may change"
OUTPUT_ONLY = "output only"
RESUME_RULES = {
    MUST_MATCH: "changes what the run computes (data, network, initial weights, optimiser, schedule, loss, "
                "numerics): a resume with another value is refused",
    MAY_CHANGE: "changes how fast or where the run computes, not what: a resume may change it",
    OUTPUT_ONLY: "changes what is written beside the run, not what it trains: a resume may change it",
}


def setting(default: Any, help: str, *, choices=None, minimum: int | float | None = None, above: float | None = None,
            metavar: str | None = None, group: str = "extra", **rules: Any):
    """A field with its help and checks: ``choices`` (allowed values), ``minimum`` (an integer, or a number for a
    float field, at least this), ``above`` (a number greater than this); ``group`` and ``metavar`` for its flag
    and ``rules`` for whoever uses the setting beyond its value (``resume``: one of :data:`RESUME_RULES`).
    List defaults are copied per instance."""
    metadata = {"help": help, "group": group, "choices": choices, "minimum": minimum, "above": above,
                "metavar": metavar, **rules}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def default_of(declared: Field) -> Any:
    """A field's default (a fresh copy for a list)."""
    return declared.default if declared.default_factory is MISSING else declared.default_factory()


def check_settings(config: Any, declared: tuple[Field, ...] | None = None) -> None:
    """Each field of ``config`` (or each of ``declared``) within its declared choices and bounds, else a
    :class:`UsageError` naming the setting."""
    for f in declared if declared is not None else fields(config):
        value, meta = getattr(config, f.name), f.metadata
        if meta.get("choices") is not None and value not in meta["choices"]:
            raise UsageError(f"{f.name} {value!r} is not one of {', '.join(map(str, meta['choices']))}")
        if isinstance(default_of(f), float):
            low, strict = (meta["above"], True) if meta.get("above") is not None else (meta.get("minimum"), False)
            if low is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                    or not (value > low if strict else value >= low)):
                raise UsageError(f"{f.name} must be a number {'>' if strict else '>='} {low:g}, not {value!r}")
        elif meta.get("minimum") is not None and value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < meta["minimum"]):
            raise UsageError(f"{f.name} must be an integer >= {meta['minimum']}, not {value!r}")
