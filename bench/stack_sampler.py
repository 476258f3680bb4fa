"""Where a process's main thread spends its wall time, without a profiler on the box: a daemon thread samples the
main thread's Python stack every `interval` seconds and keeps the microseconds spent per stack, written
(atomically, every `flush_every` seconds and at exit) as collapsed stacks, `frame;frame;... microseconds` a line,
the format flame-graph tools read. A step that waits on the GPU shows as time in the wait (`_HostCopy.wait`); a
step that waits on the host shows as time in the Python code that launches the kernels.

`python bench/stack_sampler.py FILE [--under FUNC] [--top N]` prints the frames with the most time of their own
(self) and the share of the time under each frame (total), of the stacks that pass through FUNC.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import threading
import time
from pathlib import Path


class StackSampler(threading.Thread):
    def __init__(self, path: Path, interval: float = 0.01, flush_every: float = 30.0):
        super().__init__(daemon=True, name="stack-sampler")
        self.path, self.interval, self.flush_every = Path(path), interval, flush_every
        self.counts: collections.Counter = collections.Counter()
        self.main_id = threading.main_thread().ident
        self.stopped = threading.Event()

    def run(self) -> None:
        last_flush = last = time.monotonic()
        while not self.stopped.wait(self.interval):
            # weighted by the time since the last sample: while the main thread holds the GIL (Python, and torch
            # calls that keep it) this thread waits for it, so a plain count would favour code that releases it
            now = time.monotonic()
            waited, last = now - last, now
            frame = sys._current_frames().get(self.main_id)
            stack = []
            while frame is not None and len(stack) < 80:
                code = frame.f_code
                stack.append(f"{Path(code.co_filename).name}:{code.co_name}:{frame.f_lineno}")
                frame = frame.f_back
            self.counts[";".join(reversed(stack))] += round(waited * 1e6)
            if time.monotonic() - last_flush > self.flush_every:
                self.write()
                last_flush = time.monotonic()

    def write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(f"{stack} {n}\n" for stack, n in self.counts.copy().items()))
        os.replace(tmp, self.path)

    def stop(self) -> None:
        self.stopped.set()
        self.write()


def summarize(path: Path, under: str | None, top: int) -> None:
    self_counts: collections.Counter = collections.Counter()
    total_counts: collections.Counter = collections.Counter()
    n = 0
    for line in path.read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        if under and not any(f.split(":")[1] == under for f in frames):
            continue
        n += int(count)
        self_counts[frames[-1]] += int(count)
        for f in set(":".join(x.split(":")[:2]) for x in frames):
            total_counts[f] += int(count)
    print(f"{n / 1e6:.1f} s sampled{f' under {under}' if under else ''}")
    print("self:")
    for frame, c in self_counts.most_common(top):
        print(f"  {100 * c / max(n, 1):5.1f}%  {frame}")
    print("total:")
    for frame, c in total_counts.most_common(top):
        print(f"  {100 * c / max(n, 1):5.1f}%  {frame}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", type=Path)
    ap.add_argument("--under", default=None, help="only stacks through this function name (e.g. _train)")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args(argv)
    summarize(args.file, args.under, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
