"""fork() while another thread allocates through fullres's CPU pool: every child must run and exit 0.

Data-loader workers are forked from a training process whose other threads (autograd, oneDNN, the
pin-memory thread) allocate at any moment. PyTorch releases the GIL inside its operators, so a fork can
land while a thread is half-way through the pool's bookkeeping; the pool's fork handlers hold its lock
across fork() so that the child's copy is consistent. The stress runs in a subprocess (the allocator is
the process's)."""

import os
import shutil
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the pool is built for Linux"),
              pytest.mark.skipif(shutil.which(os.environ.get("CXX") or "g++") is None,
                                 reason="no C++ compiler: the pool is not built")]

FORKS = 1000

STRESS = """
import os, signal, sys, threading, time
import torch
from fullres.kernels import cpu_pool

torch.set_num_threads(1)
sys.setswitchinterval(1e-4)  # the forking thread gets the GIL back quickly after each wait
if sys.argv[2] == "pool":  # else the process's C allocator (glibc, or one given by LD_PRELOAD)
    cpu_pool.install()
def on_alarm(*_):
    raise TimeoutError
signal.signal(signal.SIGALRM, on_alarm)
forks = int(sys.argv[1])
stop = threading.Event()
allocations = [0]
kept = {}

def allocate(name):
    # small (<= 1 MiB) and large blocks, so that both pools split, merge and map segments
    sizes = [128, 4096, 70_000, 300_000, 2_000_000, 700_000, 64, 3_000_000]
    mine = kept.setdefault(name, [])
    while not stop.is_set():
        for n in sizes:
            mine.append(torch.empty(n))
            if len(mine) > 5:
                del mine[::2]
            allocations[0] += 1

threads = [threading.Thread(target=allocate, args=(name,), daemon=True) for name in range(2)]
for thread in threads:
    thread.start()
while allocations[0] < 100:
    time.sleep(0.001)
crashed, hung = [], 0
for _ in range(forks):
    pid = os.fork()
    if pid == 0:  # the child: free and allocate through the (inherited) allocator, then leave
        try:
            for blocks in kept.values():  # the parent's blocks, freed into the child's copy of the pool
                blocks.clear()
            ok = float(torch.ones(1000).sum()) == 1000.0 and float(torch.ones(300_000).sum()) == 300_000.0
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    signal.alarm(20)  # a child stuck on a lock that no thread of it holds: killed, counted
    try:
        _, status = os.waitpid(pid, 0)
    except TimeoutError:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        hung, status = hung + 1, None
    signal.alarm(0)
    if status is not None and not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
        crashed.append(os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
stop.set()
for thread in threads:
    thread.join()
print(forks, len(crashed), hung, allocations[0], cpu_pool.installed(), sorted(set(crashed)))
"""


def test_forking_while_a_thread_allocates_through_the_pool_crashes_no_child():
    done = subprocess.run([sys.executable, "-c", STRESS, str(FORKS), "pool"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    forks, crashed, hung, allocations, installed, signals = done.stdout.split(maxsplit=5)
    assert int(forks) == FORKS
    assert (int(crashed), int(hung), signals.strip()) == (0, 0, "[]")
    assert int(allocations) > FORKS  # the thread allocated all along
    assert installed == "True"
