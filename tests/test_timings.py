"""Phase timings: what each phase cost, in timings.json and RESULTS.md."""

import json
import time

import torch

from nano_dit.config import Thresholds
from nano_dit.report import ReportInputs, write_report
from nano_dit.timings import PhaseTimer, RunTimings, read_timings, timings_table


def test_phases_add_up_by_name():
    timer = PhaseTimer(torch.device("cpu"))
    for _ in range(2):
        with timer.phase("sleep"):
            time.sleep(0.01)
    with timer.phase("other"):
        pass
    assert list(timer.seconds) == ["sleep", "other"] and timer.counts == {"sleep": 2, "other": 1}
    assert 0.02 <= timer.seconds["sleep"] < 1.0


def test_the_loop_is_timed_less_the_phases_timed_inside_it(tmp_path):
    timer = PhaseTimer()
    timings = RunTimings(tmp_path, timer, {})
    timings.start_loop()
    with timer.phase("training: first step"):
        time.sleep(0.02)
    time.sleep(0.05)  # the loop's own work
    with timer.phase("validation"):
        time.sleep(0.2)
    timings.end_loop(steps=11, samples_per_step=4, device=torch.device("cpu"))
    assert 0.05 <= timer.seconds["training"] < 0.2  # neither the first step's time nor validation's
    assert timings.training["steps"] == 11 and timings.training["steps_per_s"] == 10 / timer.seconds["training"]


def test_the_run_report_shows_where_the_time_went(tmp_path):
    timer = PhaseTimer()
    timer.add("data: encoding", 30.0)
    timer.add("training", 60.0)
    timer.add("validation", 10.0)
    timings = RunTimings(tmp_path, timer, {"device": "cpu (2 threads)", "mixed_precision": "bf16", "compile": True})
    timings.note_training(steps=99, seconds=60.0, first_step=5.0, samples_per_step=8)
    timings.note_validation(1000, 10.0, {"setup": 1.0, "sampling": 7.0, "decoding": 1.0, "metrics": 1.0})
    timings.save()
    saved = read_timings(tmp_path)
    assert saved["training"]["steps"] == 100 and saved["training"]["steps_per_s"] == 99 / 60
    assert saved["phases"] == {"data: encoding": 30.0, "training": 60.0, "validation": 10.0}

    text = "\n".join(timings_table({**saved, "total_seconds": 100.0}))
    assert "| data: encoding | 30.0 | 30% |" in text and "| training | 60.0 | 60% |" in text
    assert "1.65 steps/s and 13.2 samples/s after the first step (which took 5.0 s, compiling)" in text
    assert "- step 1000: 10.0 s (setup 1.0 s, sampling 7.0 s, decoding 1.0 s, metrics 1.0 s)" in text

    write_report(
        tmp_path, ReportInputs(Thresholds(), 10, scheme="exclusive-bag100")
    )  # no validation, no log: still a report
    report = (tmp_path / "RESULTS.md").read_text()
    assert "## Where the time went" in report and "| data: encoding | 30.0 |" in report
    assert json.loads((tmp_path / "timings.json").read_text())["mixed_precision"] == "bf16"
