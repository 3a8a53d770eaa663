"""Build routing and control policies by name, so new policies drop into the simulator.

Names resolve, in order: the registries the live system uses (`router.policy.make_policy`,
`instance_manager.controller.registry.make_control_policy`), then `package.module:Class`.
"""

from __future__ import annotations

import importlib
from typing import Any

from core.routing import RoutingPolicy
from instance_manager.controller.base import ControlPolicy
from router.policy import make_policy


def _by_path(spec: str, **kwargs: Any) -> Any:
    module, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"{spec!r} is neither a registered name nor 'module:Class'")
    return getattr(importlib.import_module(module), attr)(**kwargs)


def make_routing(name: str) -> RoutingPolicy:
    """A routing policy by registered name (e.g. 'least-loaded') or 'module:Class'."""
    if ":" in name:
        return _by_path(name)
    return make_policy(name)


def make_control(name: str | None, knobs: dict[str, str] | None = None) -> ControlPolicy | None:
    """A control policy by registered name or 'module:Class'; None/'none' means no flips."""
    if name is None or name == "none":
        return None
    knobs = knobs or {}
    if ":" in name:
        return _by_path(name, **knobs)
    from instance_manager.controller.registry import make_control_policy

    return make_control_policy(name, **knobs)


def parse_knobs(items: list[str]) -> dict[str, str]:
    """["cooldown_s=5", "prefill=2"] -> {"cooldown_s": "5", "prefill": "2"}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"knob {item!r} must be key=value")
        out[key] = value
    return out
