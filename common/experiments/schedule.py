"""Running a table's runs side by side: steps with dependencies, at most `jobs` at once.

A paper table on one machine is a handful of independent chains (CLAF stage 1 fit → predict → MPPN per
dataset, a GLANCE fit per dataset). One after another, a 2-core CPU idles through every single-threaded
stretch (data loading, NMS, evaluation: 141 % CPU on average for `make reproduce-table3 DATA=demo`); two
chains at once with one thread each keep both cores busy. The runs are subprocesses, so a thread per
running step only waits.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

__all__ = ["Step", "run_steps", "serialized", "threads_per_job"]

#: errors a failed run raises (`launch` → RuntimeError; missing files; bad settings), reported, not crashed on
RUN_ERRORS = (RuntimeError, FileNotFoundError, ValueError)


@dataclass(frozen=True)
class Step:
    """One unit of work: `run` it once every step named in `after` has succeeded.

    Attributes:
        key: unique name other steps refer to.
        what: how progress and failure messages name it.
        run: the work; raises one of ``RUN_ERRORS`` on failure.
        after: keys of the steps it needs (keys not among the steps count as done).
    """

    key: str
    what: str
    run: Callable[[], None]
    after: tuple[str, ...] = ()


def serialized(echo: Callable[[str], None]) -> Callable[[str], None]:
    """`echo` that prints one whole line at a time when called from several steps' threads."""
    lock = threading.Lock()

    def locked(line: str) -> None:
        with lock:
            echo(line)

    return locked


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """Threads each of `jobs` concurrent runs gets so that together they fill the cores (at least 1)."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // max(1, jobs))


def run_steps(
    steps: Sequence[Step],
    jobs: int = 1,
    keep_going: bool = True,
    echo: Callable[[str], None] = print,
) -> list[str]:
    """Run `steps` in dependency order, up to `jobs` at once, earlier steps first among the ready ones.

    A failed step is reported and the steps that need it are not run (each reported too); with
    ``keep_going`` False nothing new starts after the first failure, the running steps finish, and that
    failure is raised. Returns one message per step that failed or was not run. Steps that print from
    their threads should print through the same ``serialized(echo)`` as this gets.
    """
    jobs = max(1, jobs)
    keys = [s.key for s in steps]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate step keys in {keys}")
    known = set(keys)
    pending = list(steps)
    done: set[str] = set()
    failed: set[str] = set()
    failures: list[str] = []
    first_error: BaseException | None = None
    running: dict[Future, Step] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            blocked = True
            while blocked:  # a skipped step can block the steps after it
                blocked = False
                for step in list(pending):
                    needed = [k for k in step.after if k in failed]
                    if needed:
                        pending.remove(step)
                        failed.add(step.key)
                        what = next(s.what for s in steps if s.key == needed[0])
                        failures.append(f"{step.what}: not run because {what} failed")
                        echo(f"SKIPPED {step.what}: {what} failed")
                        blocked = True
            if first_error is None or keep_going:
                for step in [s for s in pending if all(k in done or k not in known for k in s.after)]:
                    if len(running) >= jobs:
                        break
                    pending.remove(step)
                    running[pool.submit(step.run)] = step
            if not running:
                if pending and (first_error is None or keep_going):
                    raise ValueError(f"steps wait on each other: {[s.key for s in pending]}")
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                step = running.pop(future)
                try:
                    future.result()
                except RUN_ERRORS as err:
                    failed.add(step.key)
                    failures.append(f"{step.what}: {err}")
                    echo(
                        f"FAILED {step.what}{' (continuing)' if keep_going else ''}: {str(err).splitlines()[0]}"
                    )
                    first_error = first_error or err
                else:
                    done.add(step.key)
    if first_error is not None and not keep_going:
        raise first_error
    return failures
