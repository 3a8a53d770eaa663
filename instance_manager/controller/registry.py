"""Build control policies by name with keyword knobs (from the CLI, the admin API or a
config file); string values are converted to the knob's type."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from instance_manager.controller.arrow import ArrowConfig, ArrowController
from instance_manager.controller.base import ControlPolicy
from instance_manager.controller.dopd import DOPDConfig, DOPDController
from instance_manager.controller.scaling import FlipOrScale, FlipOrScaleConfig
from instance_manager.controller.static import StaticConfig, StaticPolicy

CONTROL_POLICIES: dict[str, tuple[type, type]] = {
    FlipOrScale.name: (FlipOrScale, FlipOrScaleConfig),
    StaticPolicy.name: (StaticPolicy, StaticConfig),
    ArrowController.name: (ArrowController, ArrowConfig),
    DOPDController.name: (DOPDController, DOPDConfig),
}


def _convert(value: Any, like: Any, knob: str) -> Any:
    if not isinstance(value, str) or isinstance(like, str):
        return type(like)(value) if isinstance(like, float) and isinstance(value, int) else value
    try:
        if isinstance(like, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        return type(like)(value)
    except ValueError:
        raise ValueError(f"knob {knob!r} wants a {type(like).__name__}, got {value!r}") from None


def make_control_policy(name: str, **knobs: Any) -> ControlPolicy:
    """A fresh policy of a registered kind; unknown names or knobs raise ValueError."""
    try:
        policy_cls, config_cls = CONTROL_POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown control policy {name!r}; known: "
                         f"{sorted(CONTROL_POLICIES)}") from None
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(knobs) - set(defaults))
    if unknown:
        raise ValueError(f"policy {name!r} has no knob(s) {unknown}; known: {sorted(defaults)}")
    values = {k: _convert(v, defaults[k], k) for k, v in knobs.items()}
    return policy_cls(config_cls(**values))


def policy_knobs(policy: ControlPolicy) -> Mapping[str, Any]:
    """The policy's current knob values (empty for a policy without a dataclass config)."""
    config = getattr(policy, "config", None)
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}
