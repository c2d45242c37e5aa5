"""Is the new generation's canary worse than the old generation? A one-sided two-proportion z-test.

Pure. Over the canary window the new generation's first worker answered `new_total` requests, `new_failed`
of them failed (5xx, or the app raised); the old generation's workers `old_total` and `old_failed`. The
hypothesis "the new code fails no more often than the old" is rejected, and the reload rolled back, when

    z = (p_new - p_old) / sqrt(p (1 - p) (1/new_total + 1/old_total)) > 2.326

(p: both pooled; 2.326 is the one-sided 1 % level): a rollback by chance is a 1-in-100 event when the new
code is as good as the old. Fewer than `MIN_REQUESTS` requests on either side judge nothing: the canary is
inconclusive and the reload fails (neither rolled back by chance nor promoted blindly), saying so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z_CRITICAL = 2.326  # one-sided, 1 %
MIN_REQUESTS = 20


@dataclass(frozen=True)
class Verdict:
    promote: bool
    text: str  # "canary: 21 of 104 requests failed vs 0 of 412 (z = 9.8 > 2.326)"


def judge(new_failed: int, new_total: int, old_failed: int, old_total: int, seconds: float,
          min_requests: int = MIN_REQUESTS, z_critical: float = Z_CRITICAL) -> Verdict:
    figures = f"canary: {new_failed} of {new_total} requests failed vs {old_failed} of {old_total}"
    if new_total < min_requests or old_total < min_requests:
        return Verdict(False, f"{figures} in {seconds:g}s: too few to judge (at least {min_requests} each);"
                              " inconclusive, not promoted")
    z = z_score(new_failed, new_total, old_failed, old_total)
    if z > z_critical:
        return Verdict(False, f"{figures} (z = {z:.1f} > {z_critical:g}): worse than the old generation")
    return Verdict(True, f"{figures} (z = {z:.1f} ≤ {z_critical:g})")


def z_score(new_failed: int, new_total: int, old_failed: int, old_total: int) -> float:
    p_new, p_old = new_failed / new_total, old_failed / old_total
    pooled = (new_failed + old_failed) / (new_total + old_total)
    if pooled in (0.0, 1.0):
        return 0.0  # nothing failed, or everything did on both sides: no difference to see
    return (p_new - p_old) / math.sqrt(pooled * (1 - pooled) * (1 / new_total + 1 / old_total))
