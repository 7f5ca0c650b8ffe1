"""Hypothesis profiles for the fuzz tests (issue 19).

* `ci` (the default, what `make test` runs): 100 examples per parser, derandomized, so
  CI sees the same inputs on every run and stays fast.
* `fuzz` (`make fuzz`): 10,000 fresh random examples per parser, failures kept in
  `.hypothesis/` and replayed first next time.

Both give each example a deadline: a parser that takes seconds on a few hundred bytes is
a hang waiting for a larger input. `MEEBS_FUZZ_EXAMPLES=N` overrides the count.
"""

from __future__ import annotations

import os
from datetime import timedelta

from hypothesis import HealthCheck, settings

_SLOW_MACHINE = [HealthCheck.too_slow, HealthCheck.data_too_large]

settings.register_profile(
    "ci",
    max_examples=100,
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=5),
    suppress_health_check=_SLOW_MACHINE,
    print_blob=True,
)
settings.register_profile(
    "fuzz",
    max_examples=10_000,
    deadline=timedelta(seconds=5),
    suppress_health_check=_SLOW_MACHINE,
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
if "MEEBS_FUZZ_EXAMPLES" in os.environ:
    settings.register_profile(
        "override", max_examples=int(os.environ["MEEBS_FUZZ_EXAMPLES"]), parent=settings()
    )
    settings.load_profile("override")
