"""`make bench` measures the real trainer and a bare loop on the same model."""

import math

from meebs.training.bench import run_case


def test_trainer_and_floor_report_steps_and_memory():
    for case in ("demo", "demo-floor"):
        perf = run_case(case, steps=3, extra=[])
        assert perf["steps"] == 3
        assert 0 < perf["seconds_per_step"] < 10
        assert math.isclose(perf["steps_per_second"], 1 / perf["seconds_per_step"])
        assert perf["peak_rss_gib"] > 0.1
        assert perf["process_to_first_step_s"] > perf["time_to_first_step_s"] >= 0


def test_ratio_lines_compare_layer_paths_and_validation_share():
    from meebs.training.bench import ratio_lines

    def perf(seconds, rss):
        return {"seconds_per_step": seconds, "peak_rss_gib": rss}

    results = {
        "sd15-fast": perf(6.0, 8.0),
        "sd15-lycoris": perf(10.0, 10.0),
        "sd15-low-memory": perf(8.0, 5.0),
        "sd15-factored": perf(3.0, 4.0),
        "demo-full": {"validation_s": 1.0, "run_s": 20.0},
    }
    assert ratio_lines(results) == [
        "fast layer / lycoris: s/step 0.60x, peak_rss_gib 0.80x",
        "low-memory layer / lycoris: s/step 0.80x, peak_rss_gib 0.50x",
        "factored layer / lycoris: s/step 0.30x, peak_rss_gib 0.40x",
        "factored layer / fast: s/step 0.50x, peak_rss_gib 0.50x",
        "demo validation: 1.0 s of the 20.0 s run (5.0%)",
    ]
