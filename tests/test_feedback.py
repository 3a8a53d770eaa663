"""The typed feedback interface and the PolicyDriver's call order."""

from __future__ import annotations

import logging

import pytest

from core.driver import PolicyDriver, Route
from core.feedback import PolicyFeedback
from core.request import RequestInfo
from core.routing import RoutingPolicy
from core.slo import SLOTargets
from core.workers import ClusterSnapshot, Role, WorkerState, WorkerView
from router.policies.arrow import ArrowRouting
from router.policy import POLICIES, LeastLoadedPolicy


class Fixed(RoutingPolicy):
    """Picks fixed workers and logs every call it receives."""

    name = "fixed"

    def __init__(self, prefill: str | None = "p0", decode: str | None = "d0") -> None:
        self.prefill, self.decode = prefill, decode
        self.calls: list[tuple] = []

    def pick_prefill(self, request: RequestInfo, cluster: ClusterSnapshot) -> str | None:
        self.calls.append(("pick_prefill", request.request_id))
        return self.prefill

    def pick_decode(self, request: RequestInfo, cluster: ClusterSnapshot,
                    exclude: frozenset[str] = frozenset()) -> str | None:
        self.calls.append(("pick_decode", request.request_id, tuple(sorted(exclude))))
        return self.decode

    def observe_prompt(self, prompt_tokens: int) -> None:
        self.calls.append(("observe_prompt", prompt_tokens))

    def observe_decode(self, worker: str, resident_tokens: int, seconds_per_token: float
                       ) -> None:
        self.calls.append(("observe_decode", worker, resident_tokens, seconds_per_token))

    def observe_finished(self, request_id: str) -> None:
        self.calls.append(("observe_finished", request_id))


def snapshot(*views: WorkerView) -> ClusterSnapshot:
    return ClusterSnapshot(views or (WorkerView("p0", "u", Role.PREFILL),
                                     WorkerView("d0", "u", Role.DECODE)))


def test_a_misspelled_hook_is_an_error_when_the_class_is_defined() -> None:
    with pytest.raises(TypeError, match="observe_prefil is not a feedback hook"):
        class Typo(LeastLoadedPolicy):
            def observe_prefil(self, worker: str, prompt_tokens: int, seconds: float) -> None:
                pass


def test_a_hook_with_the_wrong_arguments_is_an_error() -> None:
    with pytest.raises(TypeError, match="observe_prefill takes 2 arguments"):
        class Short(PolicyFeedback):
            def observe_prefill(self, worker: str, seconds: float) -> None:  # type: ignore[override]
                pass


def test_every_registered_policy_is_a_typed_routing_policy() -> None:
    for cls in POLICIES.values():
        assert issubclass(cls, RoutingPolicy)


def test_the_driver_refuses_an_untyped_policy() -> None:
    class DuckTyped:
        name = "duck"

        def pick_prefill(self, request, cluster):  # noqa: ANN001, ANN201
            return None

        def pick_decode(self, request, cluster, exclude=frozenset()):  # noqa: ANN001, ANN201
            return None

    with pytest.raises(TypeError, match="not a core.routing.RoutingPolicy"):
        PolicyDriver(DuckTyped())  # type: ignore[arg-type]


def test_the_driver_knows_which_hooks_a_policy_overrides() -> None:
    plain = PolicyDriver(LeastLoadedPolicy())
    assert not (plain.learns_prefill or plain.learns_decode or plain.tracks_residents)
    arrow = PolicyDriver(ArrowRouting())
    assert arrow.learns_prefill and arrow.learns_decode and not arrow.learns_prompts


def test_slo_reaches_the_policy_and_every_request() -> None:
    policy = ArrowRouting()
    driver = PolicyDriver(policy, SLOTargets(ttft_s=0.3, tpot_s=0.02))
    assert (policy.targets.ttft_s, policy.targets.tpot_s) == (0.3, 0.02)
    info = driver.request("r", 10, None, 0.0, "hi")
    assert info.tbt_target_s == 0.02 and info.max_tokens is None and info.prompt_text == "hi"
    driver.use_slo(SLOTargets(ttft_s=2.0, tpot_s=0.2))
    assert policy.targets.tpot_s == 0.2 and driver.request("s", 1, 5, 0.0).tbt_target_s == 0.2


def test_route_picks_decode_first_and_same_worker_means_local() -> None:
    policy = Fixed()
    driver = PolicyDriver(policy)
    info = driver.request("r1", 7, 4, 0.0)
    assert driver.route(info, snapshot()) == Route("d0", "p0")
    assert policy.calls == [("observe_prompt", 7), ("pick_decode", "r1", ()),
                            ("pick_prefill", "r1")]
    policy.prefill = "d0"
    assert driver.route(info, snapshot()) == Route("d0", None)
    policy.calls.clear()
    assert driver.route(info, snapshot(), disaggregate=False) == Route("d0", None)
    assert policy.calls == [("pick_decode", "r1", ())]


def test_decode_is_picked_again_only_if_the_chosen_worker_left_the_pool() -> None:
    policy = Fixed(decode="d1")
    driver = PolicyDriver(policy)
    info = driver.request("r", 7, 4, 0.0)
    both = snapshot(WorkerView("d0", "u", Role.DECODE), WorkerView("d1", "u", Role.DECODE))
    assert driver.decode_after_prefill(info, "d0", both) == "d0"
    assert not any(c[0] == "pick_decode" for c in policy.calls)
    flipped = snapshot(WorkerView("d0", "u", Role.PREFILL), WorkerView("d1", "u", Role.DECODE))
    assert driver.decode_after_prefill(info, "d0", flipped) == "d1"
    draining = snapshot(WorkerView("d0", "u", Role.DECODE, WorkerState.DRAINING),
                        WorkerView("d1", "u", Role.DECODE))
    assert driver.decode_after_prefill(info, "d0", draining) == "d1"
    assert [c for c in policy.calls if c[0] == "pick_decode"] == [
        ("pick_decode", "r", ("d0",))] * 2


def test_finished_feeds_decode_time_then_finish_and_survives_a_failing_hook(caplog) -> None:
    policy = Fixed()
    driver = PolicyDriver(policy)
    driver.finished("r", "d0", 120, 0.02)
    driver.finished("s")  # failed request: no decode measurement
    assert policy.calls == [("observe_decode", "d0", 120, 0.02), ("observe_finished", "r"),
                            ("observe_finished", "s")]

    class Broken(Fixed):
        def observe_finished(self, request_id: str) -> None:
            raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="fulcrum.driver"):
        PolicyDriver(Broken()).finished("r")
    assert "observe_finished failed" in caplog.text
