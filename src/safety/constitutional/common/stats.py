"""Small statistics shared by the benchmark and judge reports."""
from __future__ import annotations

import math
from typing import Tuple

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


def wilson_interval(k: float, n: int, z: float = Z95) -> Tuple[float, float]:
    """Wilson score interval for k successes in n trials (Wilson 1927): good for small n and rates
    near 0 or 1, where the normal approximation gives intervals outside [0, 1]."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if k == 0 else max(0.0, centre - half)   # exact ends: no rounding past the estimate
    high = 1.0 if k == n else min(1.0, centre + half)
    return (low, high)
