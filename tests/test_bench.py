"""`make bench` measures the real trainer and a bare loop on the same model."""

import math

from meebs.bench import run_case


def test_trainer_and_floor_report_steps_and_memory():
    for case in ("demo", "demo-floor"):
        perf = run_case(case, steps=3, extra=[])
        assert perf["steps"] == 3
        assert 0 < perf["seconds_per_step"] < 10
        assert math.isclose(perf["steps_per_second"], 1 / perf["seconds_per_step"])
        assert perf["peak_rss_gib"] > 0.1
        assert perf["process_to_first_step_s"] > perf["time_to_first_step_s"] >= 0
