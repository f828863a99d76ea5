import numpy as np
import pytest

import minicnn


@pytest.fixture(autouse=True)
def _fresh_state():
    """Every test starts from seed 0 and float32, whatever the test before it changed."""
    minicnn.seed(0)
    minicnn.set_default_dtype(np.float32)
    yield
    minicnn.set_default_dtype(np.float32)


@pytest.fixture
def float64():
    minicnn.set_default_dtype(np.float64)


def unique_values(rng, shape):
    """Random values with no ties (pooling tests: ties make argmax and finite differences disagree)."""
    n = int(np.prod(shape))
    return (rng.permutation(n).reshape(shape) + rng.uniform(0.1, 0.4, size=shape)) / n
