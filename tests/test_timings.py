"""Phase timings: what each phase cost, in timings.json and RESULTS.md."""

import json
import time

import torch

from nano_dit.config import Thresholds
from nano_dit.report import write_report
from nano_dit.timings import PhaseTimer, RunTimings, phase, read_timings, timings_table


def test_phases_add_up_by_name_and_nothing_is_timed_without_a_timer():
    with phase("ignored"):  # no timer active: a no-op
        pass
    with PhaseTimer(torch.device("cpu")) as timer:
        for _ in range(2):
            with phase("sleep"):
                time.sleep(0.01)
        with phase("other"):
            pass
    assert list(timer.seconds) == ["sleep", "other"] and timer.counts == {"sleep": 2, "other": 1}
    assert 0.02 <= timer.seconds["sleep"] < 1.0 and "ignored" not in timer.seconds


def test_an_inner_timer_keeps_its_phases_to_itself():
    with PhaseTimer() as outer:
        with phase("validation"), PhaseTimer() as inner, phase("sampling"):
            pass
        with phase("after"):
            pass
    assert set(outer.seconds) == {"validation", "after"} and set(inner.seconds) == {"sampling"}


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

    write_report(tmp_path, Thresholds(), 10, scheme="exclusive-bag100")  # no validation, no log: still a report
    report = (tmp_path / "RESULTS.md").read_text()
    assert "## Where the time went" in report and "| data: encoding | 30.0 |" in report
    assert json.loads((tmp_path / "timings.json").read_text())["mixed_precision"] == "bf16"
