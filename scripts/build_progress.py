"""Copies a build's output (stdin) into a log file and prints a short progress summary of it.

    pip install -v ... 2>&1 | python scripts/build_progress.py BUILD_LOG

Printed: setup.py's "elastic_cuda: building ..." plan lines as soon as they appear (before any compiling), then
one line every few compiled files from ninja's "[n/N] <command>" lines, at most ~10 in all, so a CI log stays short
while a person sees the build move. Everything else goes only to the log.
"""
from __future__ import annotations

import math
import os
import re
import sys
import time

_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]\s+(.*)$")
_SOURCE = re.compile(r"\s-c\s+(\S+\.(?:cpp|cu|cc|c))(?:\s|$)")
_PLAN_PREFIX = "elastic_cuda: building"
_REPORTS = 10  # progress lines per build, at most (plus the last file)


def _source_name(command: str) -> str:
    m = _SOURCE.search(command)
    return os.path.basename(m.group(1)) if m else command.split()[0] if command.split() else "?"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Turns build output lines into the few lines worth printing (returns them, so tests can feed a fake log)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.start = clock()
        self.next_report = 1
        self.last_done = 0
        self.plan = None

    def feed(self, line: str) -> list[str]:
        line = line.strip()  # pip -v indents what the build prints by two spaces
        if line.startswith(_PLAN_PREFIX):  # setup.py prints it right before compiling: time from here
            self.start = self.clock()
            if line == self.plan:  # pip loads setup.py twice (metadata, then the build): say it once
                return []
            self.plan = line
            return [line]
        m = _NINJA_STEP.match(line)
        if not m:
            return []
        done, total = int(m.group(1)), int(m.group(2))
        if done <= self.last_done:  # a new ninja run: count its files afresh
            self.next_report = 1
        self.last_done = done
        if done < self.next_report and done != total:
            return []
        step = max(1, math.ceil(total / _REPORTS))
        self.next_report = (done // step + 1) * step
        return [f"elastic_cuda: compiled {done}/{total} ({_source_name(m.group(3))}), "
                f"{_duration(self.clock() - self.start)} so far"]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: ... | python scripts/build_progress.py BUILD_LOG", file=sys.stderr)
        return 2
    progress = Progress()
    with open(argv[0], "w") as log:
        for line in sys.stdin:
            log.write(line)
            log.flush()  # the log is what a person opens when the build fails or hangs: keep it current
            for out in progress.feed(line):
                print(out, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
