"""Scheduling policies from the seed papers, each one small class behind `RoutingPolicy`.

- `arrow.ArrowRouting`: SLO-aware dispatch from online latency models (Arrow).
- `dopd_match.DOPDMatchPolicy`: length-aware matching of mixed-length requests (DOPD).
- `ares.AresDecodePolicy`: decode placement by current + predicted remaining tokens (ARES);
  `ares.MigrationPlanner` decides (never performs) decode migrations.

Per-worker state that a snapshot does not carry (fitted latency coefficients, predicted
remaining lengths) lives inside the policy object and is fed through explicit `observe_*`
methods, so the live gateway and the simulator drive a policy the same way.
"""
