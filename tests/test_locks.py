"""Runs that start together on one data folder: one builds each part, the others wait and read it;
a lock left by a killed run is taken over."""

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nano_dit.feature_cache import load_cache
from nano_dit.locks import BuildLock, Holder

PREPARE = """
import json, os, pathlib, sys, time
from nano_dit.config import parse_config
from nano_dit.data import prepare_data
gate = pathlib.Path(sys.argv[1])
(gate / str(os.getpid())).touch()  # imported: ready
while not (gate / "go").exists():  # all three begin the data phase at once
    time.sleep(0.01)
report = prepare_data(parse_config(sys.argv[2:]))
print(json.dumps({"pid": os.getpid(), "encoded": report.encoded, "notes": report.notes}))
"""


def test_three_runs_started_together_encode_the_set_once(tmp_path):
    # An empty data folder: the synthetic set, the stand-in encoders and the cache are all missing.
    args = ["--num-images", "12", "--resolution", "16", "--shards", str(tmp_path / "shards")]
    args += ["--cache", str(tmp_path / "cache"), "--stand-in-encoders", str(tmp_path / "encoders")]
    env, gate = {**os.environ, "HF_HUB_OFFLINE": "1"}, tmp_path / "gate"
    gate.mkdir()
    command = [sys.executable, "-c", PREPARE, str(gate), *args]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for _ in range(3)]
    while len(list(gate.iterdir())) < 3 and all(run.poll() is None for run in runs):
        time.sleep(0.05)
    (gate / "go").touch()
    results = []
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err.decode()[-3000:]
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    # Each sample encoded once, by one run; the other two read its cache, and said so.
    for kind in ("latents", "image"):
        assert sum(r["encoded"][kind] for r in results) == 12, results
    builders = [r for r in results if r["encoded"]["latents"]]
    readers = [r for r in results if not r["encoded"]["latents"]]
    assert len(builders) == 1 and len(readers) == 2
    for r in readers:  # each waited for the first part, the synthetic set, and found the rest built
        assert any(n.startswith("the synthetic set") for n in r["notes"]), r
        assert all(f"built by process {builders[0]['pid']} on host" in n for n in r["notes"]), r
    _, buckets = load_cache(tmp_path / "cache")
    assert sum(len(b) for b in buckets) == 12
    assert not list(tmp_path.glob("*.lock"))  # every lock released


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _leave_lock(target, holder: Holder):
    path = target.with_name(target.name + ".lock")
    path.write_text(json.dumps(holder.__dict__))
    return path


def test_a_lock_left_by_a_dead_process_is_taken_over_at_once_with_a_warning(tmp_path, caplog):
    pid = _dead_pid()
    _leave_lock(tmp_path / "cache", Holder(socket.gethostname(), pid, "old", time.time()))
    start = time.monotonic()
    with caplog.at_level(logging.WARNING), BuildLock(tmp_path / "cache", "the feature cache", stale_after=60) as lock:
        assert time.monotonic() - start < 5  # not the 60 s of silence: its process is known gone
        assert lock.waited_for is None  # nobody built it: this process does
    assert f"left by process {pid} on host {socket.gethostname()} (its process is gone)" in caplog.text
    assert not (tmp_path / "cache.lock").exists()


def test_a_silent_lock_of_another_host_is_taken_over_after_its_time(tmp_path, caplog):
    _leave_lock(tmp_path / "cache", Holder("elsewhere", 1, "old", time.time()))
    start = time.monotonic()
    with (
        caplog.at_level(logging.WARNING),
        BuildLock(tmp_path / "cache", "the feature cache", stale_after=0.5, poll=0.05),
    ):
        waited = time.monotonic() - start
    assert 0.5 <= waited < 5
    assert "left by process 1 on host elsewhere (no sign of life for 0.5 s)" in caplog.text


def test_a_live_holder_is_waited_for_however_long_it_takes_and_named(tmp_path, caplog, capsys):
    """The holder's heartbeat keeps its lock alive past `stale_after`; the waiter gets it only
    when it is released, and says whom it waited for."""
    held, release = threading.Event(), threading.Event()

    def hold():
        with BuildLock(tmp_path / "cache", "the feature cache", heartbeat=0.05):
            held.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    threading.Timer(1.0, release.set).start()  # held 1 s: three times stale_after
    waiter = BuildLock(tmp_path / "cache", "the feature cache", stale_after=0.3, poll=0.05)
    with caplog.at_level(logging.WARNING), waiter as lock:
        assert release.is_set()  # not taken over: it was alive
    holder.join()
    assert "taking over" not in caplog.text
    assert lock.waited_for is not None and lock.waited_for.pid == os.getpid() and lock.waited >= 0.9
    assert f"built by process {os.getpid()}" in lock.note
    assert "data: waiting for process" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["", '{"host": "h"'])
def test_a_lock_file_cut_short_is_judged_by_its_age(tmp_path, content, caplog):
    (tmp_path / "cache.lock").write_text(content)
    with (
        caplog.at_level(logging.WARNING),
        BuildLock(tmp_path / "cache", "the feature cache", stale_after=0.3, poll=0.05),
    ):
        pass
    assert "taking over" in caplog.text


def _take_and_release(folder: str, times: int) -> None:
    for _ in range(times):
        with BuildLock(Path(folder) / "cache", "the feature cache", heartbeat=60):
            pass


def test_a_lock_is_never_seen_without_its_owner(tmp_path):
    """Another process takes and releases the lock 500 times while this one reads the lock file as
    fast as it can: every read finds the owner whole (a waiter names whom it waits for). A lock
    created empty and written after would be read empty thousands of times here."""
    import multiprocessing

    taker = multiprocessing.get_context("spawn").Process(target=_take_and_release, args=(str(tmp_path), 500))
    taker.start()
    path, seen, ownerless = tmp_path / "cache.lock", 0, 0
    while taker.is_alive():
        try:
            text = path.read_text()
        except FileNotFoundError:
            continue
        seen += 1
        try:
            Holder(**json.loads(text))
        except (json.JSONDecodeError, TypeError):
            ownerless += 1
    taker.join()
    assert taker.exitcode == 0 and seen > 0
    assert ownerless == 0, f"{ownerless} of {seen} reads found a lock without its owner"
