"""Start one Python process per rank of a gloo group (loopback, one thread each) and wait for all of them: the
spatial-parallelism tests' workers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_workers(script: Path, world: int, args: list[str], timeout: float = 240) -> None:
    """Run `script RANK WORLD ARGS...` for every rank at once; fail the test (with each failed rank's stderr)
    if one exits non-zero or any runs past `timeout` seconds (then all are killed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    processes = [subprocess.Popen([sys.executable, str(script), str(rank), str(world), *map(str, args)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for rank in range(world)]
    errors = []
    for rank, process in enumerate(processes):
        try:
            _, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            pytest.fail(f"rank {rank} did not end in {timeout:.0f} s")
        if process.returncode:
            errors.append(f"rank {rank}: {err[-3000:]}")
    assert not errors, "\n".join(errors)
