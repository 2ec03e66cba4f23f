"""Why a layer metric came out NaN, in words printed beside it (the job's last log lines, the run
description, `intraneuron show`, the `reason.L<l>/<name>` tags).

A layer metric summarises neurons (a median, a BH fraction), so it is NaN when no neuron gives it a
value. A bare `nan` reads as a bug; the reason says which neurons were left out and why, counted:
"no categories: K = 1 for 16 of 16 analysed neurons", "too few core tokens for 12 of 16 neurons".
Each analysis states its rules, most specific cause first, and `nan_reasons` applies them to
whichever metrics are NaN.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping

NO_VALUE = "no neuron has a finite value"  # the cause when no rule names a better one


def counted(kinds: Iterable[str], total: int, noun: str = "neurons") -> str:
    """Each kind with its count, most common first: "K = 1 for 14, K = 0 for 2 of 16 neurons"."""
    counts = Counter(kinds).most_common()
    if not counts:
        return f"0 {noun}"
    return ", ".join(f"{kind} for {n}" for kind, n in counts) + f" of {total} {noun}"


def nan_reasons(
    metrics: Mapping[str, float], rules: Iterable[tuple[str, str]], fallback: str = NO_VALUE
) -> dict[str, str]:
    """metric key -> reason, for each NaN metric: the reason of the first rule (key prefix, reason)
    whose prefix starts the key, else `fallback`. A rule with an empty reason does not apply."""
    rules = [(prefix, reason) for prefix, reason in rules if reason]
    return {
        key: next((reason for prefix, reason in rules if key.startswith(prefix)), fallback)
        for key, value in metrics.items()
        if isinstance(value, float) and math.isnan(value)
    }
