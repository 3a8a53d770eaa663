"""The one way a routing policy learns what happened: typed hooks with no-op defaults.

The gateway and the simulator call these through `router.driver.PolicyDriver`, never by
name, so a policy only overrides the hooks it needs. A subclass method whose name starts
with `observe_` but is not one of the hooks below (a typo such as `observe_prefil`) or an
override with a different number of parameters is a `TypeError` when the class is defined,
instead of a hook that is silently never called.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from core.pressure import PressureLog
from core.slo import SLOTargets

HOOK_PREFIX = "observe_"


@dataclass(frozen=True)
class ResidentRequest:
    """One running decode as a migration planner sees it."""

    request_id: str
    context_tokens: int
    predicted_remaining: float
    migrations: int = 0


class PolicyFeedback:
    """Measurements a routing policy may learn from. Every hook is a no-op by default.

    What each measures is the same quantity live and in the simulator (see
    `router.driver` for how each is taken)."""

    def use_slo(self, slo: SLOTargets) -> None:
        """The deployment's latency targets (`--slo-ttft/--slo-tpot`), given once at start."""

    def observe_prompt(self, prompt_tokens: int) -> None:
        """A request arrived with a prompt of this many tokens (before any routing)."""

    def observe_prefill(self, worker: str, prompt_tokens: int, seconds: float) -> None:
        """`worker` computed a prompt of `prompt_tokens` in `seconds`: from the engine
        scheduling it to its first token, queueing before that excluded."""

    def observe_decode(self, worker: str, resident_tokens: int, seconds_per_token: float
                       ) -> None:
        """A request finished decoding on `worker` at `seconds_per_token` (its mean time per
        output token after the first), with `resident_tokens` decode tokens (the snapshot's
        `decode_tokens_in_flight`) on that worker when it ended."""

    def observe_progress(self, request_id: str, generated: int) -> None:
        """`request_id` has generated `generated` output tokens so far."""

    def observe_migrated(self, request_id: str, target: str) -> None:
        """`request_id` now decodes on `target` (a migration was carried out)."""

    def observe_finished(self, request_id: str) -> None:
        """`request_id` left the system (finished, failed or aborted); sent exactly once."""

    def pressure_log(self) -> PressureLog | None:
        """Where this policy records predicted SLO misses for the controller (Arrow's inline
        flips); None: it records none."""
        return None

    def residents(self) -> Mapping[str, Sequence[ResidentRequest]] | None:
        """Running decodes by worker, for a migration planner; None: this policy does not
        track them (no rebalancing)."""
        return None

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        check_hooks(cls)


def _hooks() -> dict[str, int]:
    return {name: len(inspect.signature(fn).parameters)
            for name, fn in vars(PolicyFeedback).items()
            if name.startswith(HOOK_PREFIX) or name in ("use_slo", "residents", "pressure_log")}


def check_hooks(cls: type) -> None:
    """Raise TypeError if `cls` defines an `observe_*` method that is not a feedback hook,
    or overrides a hook with a different number of parameters."""
    hooks = _hooks()
    for name, value in vars(cls).items():
        if not callable(value):
            continue
        if name.startswith(HOOK_PREFIX) and name not in hooks:
            raise TypeError(f"{cls.__qualname__}.{name} is not a feedback hook (known: "
                            f"{', '.join(sorted(hooks))}); it would never be called")
        if name in hooks:
            try:
                n = len(inspect.signature(value).parameters)
            except (TypeError, ValueError):
                continue
            if n != hooks[name]:
                raise TypeError(f"{cls.__qualname__}.{name} takes {n - 1} arguments; the "
                                f"hook passes {hooks[name] - 1}")


def overrides(policy: object, hook: object) -> bool:
    """Whether `policy`'s class replaces the default `hook` (a `PolicyFeedback` function),
    so hot loops can skip calls that would do nothing."""
    name = getattr(hook, "__name__", "")
    return getattr(type(policy), name, hook) is not hook
