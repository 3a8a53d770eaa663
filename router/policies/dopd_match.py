"""DOPD's length-aware assignment of mixed-length requests (arXiv 2511.20982).

Prefill cost is convex in prompt length, so one long prompt queued in front of short ones
inflates their TTFT far more than its token count suggests. This policy splits the prefill
pool in two: prompts above a threshold (a quantile of recently seen prompt lengths) go to a
"long" sub-pool sized by the long class's share of predicted prefill *work*
(Σ T(L), T convex), the rest to the "short" sub-pool. The split is made only when the
prefill pool has at least `min_split_workers` workers: on a small pool, sub-pools strand
capacity (on ShareGPT a 3-worker split served 30% fewer requests than least-loaded
routing). Within a sub-pool the worker with the least predicted queued work wins; a
request spills into the other sub-pool when that one would finish it sooner by a factor of
`spill_ratio` (queued work plus its own prefill), so a burst of one class never queues
behind its sub-pool while the other idles.

Decode: the worker whose resident tokens after admitting this request
(prompt + expected output) are fewest, so long-context requests spread out.
"""

from __future__ import annotations

from bisect import bisect_right, insort
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from core.routing import RoutingPolicy
from core.workers import ClusterSnapshot, Role, WorkerView
from router.policies.latency_model import PrefillLatencyModel
from router.quantile import linear_quantile

if TYPE_CHECKING:
    from core.request import RequestInfo


@dataclass(frozen=True)
class DOPDMatchConfig:
    long_quantile: float = 0.8     # prompts above this quantile of the window are "long"
    window: int = 512              # recent prompt lengths kept
    min_samples: int = 16          # below this, no split: one shared pool
    expected_output_tokens: float = 200.0  # decode footprint when max_tokens is larger
    min_split_workers: int = 4     # a smaller prefill pool is one shared pool
    spill_ratio: float = 1.5       # spill when the other sub-pool finishes this much sooner
    spill_on_idle_only: bool = False  # round 1: spill only into an idle sub-pool


ROUND1_MATCH = DOPDMatchConfig(min_split_workers=2, spill_on_idle_only=True)
"""The round-1 behaviour: split any pool of two or more, spill only into an idle one."""


class DOPDMatchPolicy(RoutingPolicy):
    """Length-aware prefill sub-pools and footprint-balanced decode placement."""

    name = "dopd-match"

    def __init__(self, config: DOPDMatchConfig | None = None,
                 cost: PrefillLatencyModel | None = None) -> None:
        self.config = config or DOPDMatchConfig()
        self.cost = cost or PrefillLatencyModel()
        self._recent: deque[int] = deque(maxlen=self.config.window)
        # the same window kept sorted, with exact integer sums of L and L², so the
        # threshold and the work share cost O(log n + long class) per arrival, not O(n)
        self._sorted: list[int] = []
        self._sum_l = 0
        self._sum_l2 = 0

    def observe_prompt(self, prompt_tokens: int) -> None:
        """Record one arriving prompt length. The caller (gateway or simulator) feeds every
        arrival here; `pick_prefill` itself records nothing, so nothing is counted twice."""
        length = int(prompt_tokens)
        recent, ordered = self._recent, self._sorted
        if len(recent) == recent.maxlen:
            gone = recent[0]
            del ordered[bisect_right(ordered, gone) - 1]
            self._sum_l -= gone
            self._sum_l2 -= gone * gone
        recent.append(length)
        insort(ordered, length)
        self._sum_l += length
        self._sum_l2 += length * length

    # -- the split ------------------------------------------------------------------
    def threshold(self) -> float | None:
        """Prompt length above which a request is "long", or None while there is no split."""
        ordered = self._sorted
        if len(ordered) < self.config.min_samples:
            return None
        return linear_quantile(ordered, self.config.long_quantile)

    def long_pool_size(self, n_workers: int, threshold: float) -> int:
        """Workers for the long class, ∝ its share of predicted prefill work, in [1, n-1]."""
        if n_workers < 2:
            return 0
        a, b, c = self.cost.a, self.cost.b, self.cost.c
        if a >= 0 and b >= 0 and c >= 0:  # every prompt's work is >= 0: sums decompose
            ordered = self._sorted
            top = ordered[bisect_right(ordered, threshold):]
            total = a * self._sum_l2 + b * self._sum_l + c * len(ordered)
            long_work = a * sum(x * x for x in top) + b * sum(top) + c * len(top)
            share = long_work / total if total > 0 else 0.0
            if share <= 0.0:
                return 0
            return min(n_workers - 1, max(1, round(share * n_workers)))
        lengths = np.fromiter(self._recent, float)
        work = np.maximum(self.cost.a * lengths ** 2 + self.cost.b * lengths + self.cost.c, 0)
        total = work.sum()
        share = float(work[lengths > threshold].sum() / total) if total > 0 else 0.0
        if share <= 0.0:
            return 0
        return min(n_workers - 1, max(1, round(share * n_workers)))

    def split(self, pool: tuple[WorkerView, ...]) -> tuple[tuple[WorkerView, ...],
                                                           tuple[WorkerView, ...], float | None]:
        """(short sub-pool, long sub-pool, threshold); names sorted so the split is stable."""
        ordered = tuple(sorted(pool, key=lambda w: w.name))
        threshold = self.threshold()
        if len(ordered) < self.config.min_split_workers:
            return ordered, (), threshold
        n_long = 0 if threshold is None else self.long_pool_size(len(ordered), threshold)
        if n_long == 0:
            return ordered, (), threshold
        return ordered[:-n_long], ordered[-n_long:], threshold

    def queued_work(self, w: WorkerView) -> float:
        n = w.in_flight_prefill
        return n * self.cost.predict(w.prefill_tokens_in_flight / n) if n else 0.0

    # -- RoutingPolicy ----------------------------------------------------------------
    def pick_prefill(self, request: RequestInfo, cluster: ClusterSnapshot) -> str | None:
        pool = cluster.routable(Role.PREFILL)
        short, long_, threshold = self.split(pool)
        if not pool:
            return None
        is_long = threshold is not None and request.prompt_tokens > threshold
        own, other = (long_, short) if is_long else (short, long_)
        if not own:
            own, other = pool, ()
        key = lambda w: (self.queued_work(w), w.in_flight, w.name)  # noqa: E731
        best = min(own, key=key)
        if not other:
            return best.name
        if self.config.spill_on_idle_only:
            if best.in_flight_prefill > 0 and any(w.in_flight_prefill == 0 for w in other):
                return min((w for w in other if w.in_flight_prefill == 0), key=key).name
            return best.name
        alt = min(other, key=key)
        own_cost = self.cost.predict(request.prompt_tokens)
        if (self.queued_work(alt) + own_cost) * self.config.spill_ratio < \
                self.queued_work(best) + own_cost:
            return alt.name
        return best.name

    def pick_decode(self, request: RequestInfo, cluster: ClusterSnapshot,
                    exclude: frozenset[str] = frozenset()) -> str | None:
        pool = cluster.decode_candidates(exclude)
        if not pool:
            return None
        expected = self.config.expected_output_tokens
        cap = request.max_tokens
        footprint = request.prompt_tokens + (expected if cap is None else min(cap, expected))
        return min(pool, key=lambda w: (w.decode_tokens_in_flight + footprint,
                                        w.in_flight_decode, w.name)).name
