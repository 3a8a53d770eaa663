"""`PolicyDriver`: the one way the gateway and the simulator drive a routing policy.

Both call the same methods in the same order, so a policy sees the same calls with the same
kinds of arguments live and simulated (`tests/test_driver_parity.py` checks this):

1. `request(...)` when a request arrives: builds its `RequestInfo` from what the client
   sent (prompt size and text, the client's `max_tokens` or None, never the true output
   length) and calls `observe_prompt`.
2. `route(info, snapshot)`: `pick_decode` first, then `pick_prefill` on the same snapshot
   (a real router knows both workers before it sends the prefill leg; a prefill worker
   equal to the decode worker means "decode computes the prompt itself").
3. `prefilled(worker, tokens, seconds)` when a prefill leg returns: `seconds` is the
   engine's own prefill time, from scheduling the prompt to its first token, queueing
   excluded (vLLM's per-request `time_to_first_token_ms` with `--enable-per-request-metrics`,
   the quantity behind `vllm:request_prefill_time_seconds`; the simulated engine's own).
4. `decode_after_prefill(info, chosen, snapshot)`: keep the chosen decode worker unless it
   left the decode pool meanwhile (a flip), then pick again without it.
5. `progress(request_id, generated)` while a stream runs, `migrated(request_id, target)`
   after a move, and `finished(request_id, worker, resident_tokens, seconds_per_token)`
   exactly once at the end: `seconds_per_token` is the request's mean inter-token time on
   its decode worker (first to last token; vLLM's per-request `mean_itl_ms`), fed to
   `observe_decode` with the worker's `decode_tokens_in_flight` after the request left.

SLO targets reach the policy once through `use_slo`, and every request carries the TPOT
target as `tbt_target_s`. `plan_migration` asks an ARES `MigrationPlanner` (any object with
`decide(residents)`) for one move among the policy's residents.

A policy's bookkeeping must never fail a request: exceptions from feedback hooks are logged
and swallowed; exceptions from the pick methods propagate.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import NamedTuple, Protocol

from core.feedback import PolicyFeedback, ResidentRequest, overrides
from core.request import RequestInfo
from core.routing import RoutingPolicy
from core.slo import SLOTargets
from core.workers import ClusterSnapshot, Role

log = logging.getLogger("fulcrum.driver")
_INFO_FIELDS = tuple(f.name for f in dataclasses.fields(RequestInfo))
# RequestInfo is a plain frozen dataclass (no slots, no __post_init__): filling its __dict__
# skips the per-field object.__setattr__ of its __init__, ~4x cheaper per request in the
# simulator's hot loop
assert "__slots__" not in vars(RequestInfo) and not hasattr(RequestInfo, "__post_init__")
assert _INFO_FIELDS == ("request_id", "prompt_tokens", "max_tokens", "arrival_time",
                        "tbt_target_s", "prompt_text")  # the fields `request` fills
_new = object.__new__
_set = object.__setattr__  # a frozen dataclass refuses its own __setattr__


class MigrationChoice(Protocol):
    request_id: str
    source: str
    target: str


class Planner(Protocol):
    def decide(self, residents: Mapping[str, Sequence[ResidentRequest]]
               ) -> MigrationChoice | None: ...


class Route(NamedTuple):
    """Where a request goes: `prefill` None means the decode worker computes the prompt."""

    decode: str | None
    prefill: str | None = None


class PolicyDriver:
    """Feeds one `RoutingPolicy` the calls of the request life cycle, in one order."""

    def __init__(self, policy: RoutingPolicy, slo: SLOTargets | None = None,
                 planner: Planner | None = None) -> None:
        if not isinstance(policy, RoutingPolicy):
            raise TypeError(f"{type(policy).__qualname__} is not a core.routing.RoutingPolicy "
                            "subclass; its feedback hooks could not be checked")
        self.policy = policy
        self.slo = slo
        self.planner = planner
        self.tbt_target_s: float | None = None
        if slo is not None:
            self.use_slo(slo)
        self.learns_prompts = overrides(policy, PolicyFeedback.observe_prompt)
        self.learns_prefill = overrides(policy, PolicyFeedback.observe_prefill)
        self.learns_decode = overrides(policy, PolicyFeedback.observe_decode)
        self.learns_progress = overrides(policy, PolicyFeedback.observe_progress)
        self.learns_finished = overrides(policy, PolicyFeedback.observe_finished)
        self.tracks_residents = overrides(policy, PolicyFeedback.residents)

    def use_slo(self, slo: SLOTargets) -> None:
        """New latency targets: for the policy, and for every later request's TPOT target."""
        self.slo = slo
        self.tbt_target_s = slo.tpot_s
        self._safely(self.policy.use_slo, slo)

    @property
    def name(self) -> str:
        return self.policy.name

    def _safely(self, hook: Callable[..., None], *args: object) -> None:
        try:
            hook(*args)
        except Exception:  # a policy's bookkeeping must never fail a request
            log.exception("policy %s: %s failed", self.policy.name, hook.__name__)

    # -- the request life cycle -------------------------------------------------------
    def request(self, request_id: str, prompt_tokens: int, max_tokens: int | None,
                arrival_time: float, prompt_text: str | None = None) -> RequestInfo:
        """A request arrived: what the policy may know of it (and `observe_prompt`)."""
        info = _new(RequestInfo)
        _set(info, "__dict__", {"request_id": request_id, "prompt_tokens": prompt_tokens,
                                "max_tokens": max_tokens, "arrival_time": arrival_time,
                                "tbt_target_s": self.tbt_target_s, "prompt_text": prompt_text})
        if self.learns_prompts:
            self._safely(self.policy.observe_prompt, prompt_tokens)
        return info

    def route(self, info: RequestInfo, snapshot: ClusterSnapshot,
              disaggregate: bool = True) -> Route:
        """Decode worker first, then (if `disaggregate`) the prefill worker."""
        decode = self.policy.pick_decode(info, snapshot)
        if decode is None:
            return Route(None)
        prefill = self.policy.pick_prefill(info, snapshot) if disaggregate else None
        return Route(decode, None if prefill == decode else prefill)

    def decode_after_prefill(self, info: RequestInfo, chosen: str,
                             snapshot: ClusterSnapshot) -> str | None:
        """`chosen` if it is still a decode candidate, else a new pick without it."""
        for w in snapshot.workers:  # is it in snapshot.decode_candidates()? (no tuple built)
            if w.name == chosen:
                if w.routable and (w.role == Role.DECODE or not snapshot.routable(Role.DECODE)):
                    return chosen
                break
        return self.policy.pick_decode(info, snapshot, frozenset((chosen,)))

    def retry_decode(self, info: RequestInfo, snapshot: ClusterSnapshot,
                     exclude: frozenset[str]) -> str | None:
        """Another decode worker after failed attempts on `exclude`."""
        return self.policy.pick_decode(info, snapshot, exclude)

    def prefilled(self, worker: str, prompt_tokens: int, seconds: float) -> None:
        if self.learns_prefill:
            self._safely(self.policy.observe_prefill, worker, prompt_tokens, seconds)

    def progress(self, request_id: str, generated: int) -> None:
        if self.learns_progress:
            self._safely(self.policy.observe_progress, request_id, generated)

    def migrated(self, request_id: str, target: str) -> None:
        self._safely(self.policy.observe_migrated, request_id, target)

    def finished(self, request_id: str, worker: str | None = None, resident_tokens: int = 0,
                 seconds_per_token: float | None = None) -> None:
        """The request left; with a measured `seconds_per_token`, `observe_decode` first."""
        if worker is not None and seconds_per_token is not None and self.learns_decode:
            self._safely(self.policy.observe_decode, worker, resident_tokens,
                         seconds_per_token)
        if self.learns_finished:
            self._safely(self.policy.observe_finished, request_id)

    # -- rebalancing ------------------------------------------------------------------
    def plan_migration(self, decoders: Collection[str],
                       movable: Callable[[str, ResidentRequest], bool] | None = None
                       ) -> MigrationChoice | None:
        """One move proposed by the planner among the policy's residents on `decoders`
        (idle decoders included, as targets), limited to what `movable(worker, request)`
        allows; None without a planner or residents."""
        if self.planner is None or not self.tracks_residents:
            return None
        residents = self.policy.residents()
        if residents is None:
            return None
        out: dict[str, list[ResidentRequest]] = {name: [] for name in decoders}
        for worker, requests in residents.items():
            if worker in out:
                out[worker] = [r for r in requests if movable is None or movable(worker, r)]
        return self.planner.decide(out)
