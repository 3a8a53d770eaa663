"""linear_quantile agrees with numpy's default quantile method."""

import numpy as np
import pytest

from router.quantile import linear_quantile


@pytest.mark.parametrize("n", [1, 2, 3, 10, 511, 512])
@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.8, 0.9, 0.99, 1.0])
def test_matches_numpy(n: int, q: float) -> None:
    values = sorted(np.random.default_rng(n).exponential(300.0, n).tolist())
    assert linear_quantile(values, q) == pytest.approx(float(np.quantile(values, q)),
                                                       rel=1e-12, abs=1e-12)


def test_integers_and_bad_input() -> None:
    assert linear_quantile([1, 2, 3, 4], 0.5) == 2.5
    with pytest.raises(ValueError):
        linear_quantile([], 0.5)
    with pytest.raises(ValueError):
        linear_quantile([1.0], 1.5)
