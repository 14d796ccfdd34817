"""`common.experiments.schedule.run_steps`: dependency order, runs side by side, failures and what they block."""

from __future__ import annotations

import threading
import time

import pytest

from common.experiments.schedule import Step, run_steps, serialized, threads_per_job


class Recorder:
    """Steps that sleep and record when they started and ended (and how many ran at once)."""

    def __init__(self) -> None:
        self.spans: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0

    def step(self, key: str, after: tuple[str, ...] = (), seconds: float = 0.2, fail: bool = False) -> Step:
        def work() -> None:
            with self.lock:
                self.running += 1
                self.most = max(self.most, self.running)
            start = time.monotonic()
            time.sleep(seconds)
            with self.lock:
                self.running -= 1
                self.spans[key] = (start, time.monotonic())
            if fail:
                raise RuntimeError(f"{key} exited with status 1")

        return Step(key, f"run {key}", work, after)


def test_dependencies_come_first_and_independent_chains_overlap():
    r = Recorder()
    steps = [
        r.step("fit-a"),
        r.step("predict-a", ("fit-a",)),
        r.step("fit-b"),
        r.step("mppn-a", ("predict-a",)),
        r.step("glance"),
    ]
    assert run_steps(steps, jobs=2, echo=lambda _: None) == []
    assert set(r.spans) == {s.key for s in steps}
    for key, needs in (("predict-a", "fit-a"), ("mppn-a", "predict-a")):
        assert r.spans[key][0] >= r.spans[needs][1]
    assert r.most == 2
    # one at a time: never two at once, and the listed order among ready steps
    r1 = Recorder()
    run_steps([r1.step(s.key, s.after, 0.05) for s in steps], jobs=1, echo=lambda _: None)
    order = sorted(r1.spans, key=lambda k: r1.spans[k][0])
    assert r1.most == 1 and order == ["fit-a", "predict-a", "fit-b", "mppn-a", "glance"]


def test_a_failure_skips_what_needs_it_and_the_rest_still_runs():
    r, said = Recorder(), []
    steps = [r.step("fit-a", fail=True), r.step("predict-a", ("fit-a",)), r.step("mppn-a", ("predict-a",))]
    steps.append(r.step("glance"))
    failures = run_steps(steps, jobs=2, echo=said.append)
    assert set(r.spans) == {"fit-a", "glance"}
    assert failures[0] == "run fit-a: fit-a exited with status 1"
    assert sorted(failures[1:]) == [
        "run mppn-a: not run because run predict-a failed",
        "run predict-a: not run because run fit-a failed",
    ]
    assert any(line.startswith("FAILED run fit-a (continuing)") for line in said)


def test_stop_on_error_lets_running_steps_finish_and_starts_nothing_new():
    r = Recorder()
    steps = [r.step("bad", seconds=0.05, fail=True), r.step("long", seconds=0.3), r.step("later")]
    with pytest.raises(RuntimeError, match="bad exited"):
        run_steps(steps, jobs=2, keep_going=False, echo=lambda _: None)
    assert set(r.spans) == {"bad", "long"}


def test_steps_that_wait_on_each_other_are_an_error():
    r = Recorder()
    with pytest.raises(ValueError, match="wait on each other"):
        run_steps([r.step("a", ("b",)), r.step("b", ("a",))], echo=lambda _: None)
    with pytest.raises(ValueError, match="duplicate"):
        run_steps([r.step("a"), r.step("a")], echo=lambda _: None)


def test_threads_per_job_fill_the_cores():
    assert threads_per_job(1, cores=2) == 2
    assert threads_per_job(2, cores=2) == 1
    assert threads_per_job(4, cores=2) == 1
    assert threads_per_job(2, cores=16) == 8


def test_serialized_echo_prints_whole_lines_from_many_threads(capsys):
    import sys

    def write(line: str) -> None:  # print's text and its newline are two writes another thread can split
        sys.stdout.write(line)
        time.sleep(0.001)
        sys.stdout.write("\n")

    echo = serialized(write)
    threads = [threading.Thread(target=lambda i=i: [echo(f"step {i}") for _ in range(20)]) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 80 and all(line.startswith("step ") and len(line) == 6 for line in lines)
