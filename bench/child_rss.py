"""Run a benchmark child process and sample its peak memory (the child and its workers)."""

from __future__ import annotations

import json
import subprocess
import time


def run_measured(argv: list[str], what: str) -> tuple[dict, int]:
    """The child's last stdout line (a JSON object) and the peak RSS, in bytes, of its process
    tree, sampled every 20 ms; a failed child ends the benchmark naming `what`."""
    import psutil

    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    parent, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    stdout, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed with exit code {proc.returncode}")
    return json.loads(stdout.strip().splitlines()[-1]), peak
