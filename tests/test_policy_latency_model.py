"""Online latency models recover known coefficients and answer from priors before data."""

import pytest

from router.policies.latency_model import (
    DecodeLatencyModel,
    LatencyModelBook,
    LatencyPriors,
    OnlinePolyFit,
    PrefillLatencyModel,
)


def test_prefill_model_recovers_a_quadratic():
    model = PrefillLatencyModel(forget=1.0)
    truth = lambda n: 3e-8 * n * n + 1.5e-4 * n + 0.01  # noqa: E731
    for n in (16, 64, 128, 256, 512, 1024, 2048):
        model.observe(n, truth(n))
    assert model.a == pytest.approx(3e-8, rel=1e-3)
    assert model.b == pytest.approx(1.5e-4, rel=1e-3)
    assert model.predict(1500) == pytest.approx(truth(1500), rel=1e-4)


def test_prefill_model_uses_priors_until_determined():
    model = PrefillLatencyModel(a=0.0, b=1e-3, c=0.5)
    model.observe(100, 9.0)
    model.observe(200, 9.0)  # two distinct lengths: a quadratic is not yet determined
    assert model.predict(100) == pytest.approx(0.6)
    model.observe(300, 9.0)
    assert model.predict(100) == pytest.approx(9.0, rel=1e-6)


def test_decode_model_fit_and_token_capacity():
    model = DecodeLatencyModel(forget=1.0)
    for b in (100, 1000, 5000, 10000):
        model.observe(b, 2e-6 * b + 0.03)
    assert model.m == pytest.approx(2e-6, rel=1e-6)
    assert model.c0 == pytest.approx(0.03, rel=1e-6)
    assert model.max_tokens_under(0.05) == pytest.approx(10000, rel=1e-6)
    assert model.max_tokens_under(0.02) == 0.0


def test_forgetting_follows_drift():
    fit = OnlinePolyFit(1, forget=0.8)
    for x in range(1, 50):
        fit.add(x, 1.0 * x)
    for x in range(1, 50):
        fit.add(x, 3.0 * x)  # the worker got three times slower
    slope = fit.coefficients()[1]
    assert slope == pytest.approx(3.0, rel=0.01)


def test_book_keeps_workers_apart():
    book = LatencyModelBook(LatencyPriors(decode_c0=0.01, decode_m=0.0))
    for b in (10, 20, 30):
        book.decode("slow").observe(b, 1.0)
    assert book.decode("slow").predict(10) == pytest.approx(1.0)
    assert book.decode("fast").predict(10) == pytest.approx(0.01)


def _solve_reference(aug):
    """The straightforward elimination `_solve` replaced (generators, key functions)."""
    n = len(aug)
    tol = 1e-12 * max(abs(v) for row in aug for v in row[:n])
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(aug[r][col]))
        if abs(aug[pivot][col]) <= tol:
            return None
        aug[col], aug[pivot] = aug[pivot], aug[col]
        head = aug[col]
        for r in range(col + 1, n):
            factor = aug[r][col] / head[col]
            if factor:
                row = aug[r]
                for c in range(col, n + 1):
                    row[c] -= factor * head[c]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        row = aug[r]
        acc = row[n] - sum(row[c] * out[c] for c in range(r + 1, n))
        out[r] = acc / row[r]
    return out


def test_solver_is_bit_identical_to_the_plain_elimination():
    import random

    from router.policies.latency_model import _solve

    rng = random.Random(3)
    for trial in range(3000):
        n = rng.choice((1, 2, 3, 4))
        aug = [[rng.choice((0.0, 1.0, -2.5, rng.uniform(-1e3, 1e3), rng.gauss(0, 1e-9)))
                for _ in range(n + 1)] for _ in range(n)]
        if trial % 7 == 0:
            aug[-1] = list(aug[0])  # singular
        got, want = _solve([list(r) for r in aug]), _solve_reference([list(r) for r in aug])
        assert repr(got) == repr(want), aug  # repr: -0.0 and nan count too
