"""Derive control-policy knobs from a performance model, so nobody computes them by hand.

A performance model is anything with `iteration_time(prefill_tokens, prefill_pairs,
decode_seqs, decode_ctx) -> seconds` and `kv_capacity_tokens`: the simulator's roofline
(`benchmarks.sim.perf.roofline`) or a `fulcrum profile` fit (`FittedModel`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

PROMPT_LENGTHS = (128, 256, 512, 1024, 2048, 3072, 4096, 6144, 8192)


class StepTimeModel(Protocol):
    @property
    def kv_capacity_tokens(self) -> int: ...

    def iteration_time(self, prefill_tokens: int, prefill_pairs: float, decode_seqs: int,
                       decode_ctx: float) -> float: ...


def dopd_knobs(perf: StepTimeModel, tpot_s: float, max_num_seqs: int = 256,
               decode_context: float = 1000.0,
               prompt_lengths: tuple[int, ...] = PROMPT_LENGTHS) -> dict[str, float]:
    """DOPD's cost constants measured on `perf`.

    Prefill: a quadratic fit of one-prompt iterations over `prompt_lengths`. Decode: the
    largest batch B* (up to `max_num_seqs`) whose step at `decode_context` tokens per
    sequence meets `tpot_s`, giving B*/tau(B*) tokens/s and tau(B*); the KV room per worker
    is passed on so the policy can bound slots at the context it actually sees."""
    lengths = np.array(prompt_lengths, dtype=float)
    secs = [perf.iteration_time(int(n), n * n / 2, 0, 0.0) for n in lengths]
    a, b, c = np.polyfit(lengths, secs, 2)
    if b <= 0:  # a curve bent by noise: fall back to the straight line through the points
        b, c = np.polyfit(lengths, secs, 1)
        a = 0.0
    best = 1
    for batch in range(1, max_num_seqs + 1):
        if perf.iteration_time(0, 0.0, batch, batch * decode_context) <= tpot_s:
            best = batch
        else:
            break
    step = perf.iteration_time(0, 0.0, best, best * decode_context)
    return {"prefill_quadratic_s": max(0.0, float(a)), "prefill_tokens_per_s": 1.0 / float(b),
            "prefill_overhead_s": max(0.0, float(c)), "decode_tokens_per_s": best / step,
            "decode_step_s": float(step), "max_num_seqs": int(max_num_seqs),
            "kv_tokens_per_worker": int(perf.kv_capacity_tokens)}


def derived_knobs(policy: str, perf: StepTimeModel, tpot_s: float,
                  max_num_seqs: int = 256) -> dict[str, float]:
    """The knobs `policy` takes from a performance model (empty for other policies)."""
    if policy == "dopd":
        return dopd_knobs(perf, tpot_s, max_num_seqs)
    if policy == "arrow":
        return arrow_knobs(perf, tpot_s, max_num_seqs)
    return {}


def knobs_from_profile(policy: str, path: Path | str, tpot_s: float,
                       max_num_seqs: int = 256) -> dict[str, float]:
    """`derived_knobs` of a `fulcrum profile` JSON file."""
    if policy == "dopd":
        return dopd_knobs_from_profile(path, tpot_s, max_num_seqs)
    if policy == "arrow":
        import json

        from benchmarks.sim.perf import FittedModel

        # slots at the context the profile measured: its fit says nothing past that range,
        # and a longer assumed context turns a per-token cost into too few slots
        context = profile_decode_context(json.loads(Path(path).read_text()))
        return arrow_knobs(FittedModel.load(Path(path)), tpot_s, max_num_seqs, 512, context)
    return {}


def profile_decode_context(data: dict) -> float:
    """Tokens of context per sequence in a profile's decode points (prompt plus half the
    outputs, as the profiler runs them), 256 when it has none."""
    points = data.get("decode") or []
    if not points:
        return 256.0
    return max(1.0, float(np.mean([p[1] / max(1.0, p[0]) for p in points])))


def dopd_knobs_from_profile(path: Path | str, tpot_s: float, max_num_seqs: int = 256,
                            decode_context: float | None = None) -> dict[str, float]:
    """`dopd_knobs` of a `fulcrum profile` JSON file. The decode context defaults to the
    profile's own decode prompt length plus half its outputs (the fit's measured range)."""
    import json

    from benchmarks.sim.perf import FittedModel

    data = json.loads(Path(path).read_text())
    perf = FittedModel.load(Path(path))
    if decode_context is None:
        decode_context = profile_decode_context(data)
    lengths = data.get("prefill") or []
    measured = tuple(sorted({int(p[0]) for p in lengths})) or PROMPT_LENGTHS
    if len(measured) < 3:
        measured = PROMPT_LENGTHS
    return dopd_knobs(perf, tpot_s, max_num_seqs, decode_context, measured)


def arrow_knobs(perf: StepTimeModel, tpot_s: float, max_num_seqs: int = 256,
                prompt_tokens: int = 2048, decode_context: float = 1000.0) -> dict[str, float]:
    """Arrow's capacity knobs on `perf`: one worker's prefill throughput at a typical
    prompt (for the prefill pool's busy fraction) and its decode slots: the largest batch
    (up to `max_num_seqs`) whose step at `decode_context` tokens per sequence meets
    `tpot_s` (a bigger batch misses TPOT even with slots free)."""
    seconds = perf.iteration_time(prompt_tokens, prompt_tokens * prompt_tokens / 2, 0, 0.0)
    best = 1
    for batch in range(1, max_num_seqs + 1):
        if perf.iteration_time(0, 0.0, batch, batch * decode_context) > tpot_s:
            break
        best = batch
    return {"prefill_tokens_per_s": prompt_tokens / seconds, "decode_slots": int(best)}
