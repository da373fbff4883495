import os
import shutil
import subprocess
import sys


def run_python(code: str, *args: str, **env) -> str:
    import os

    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
                          env={**os.environ, **env}).stdout.strip()


def test_training_malloc_policy_follows_the_strategy_and_the_environment():
    code = ("import sys; from fullres.job.config import Strategy; from fullres.kernels.malloc import set_training_malloc_policy as s; "
            "print(s(None), s(Strategy(channels_last=True)), s(Strategy(checkpointing=True)), s(Strategy(slabs=2)))")
    assert run_python(code, FULLRES_MALLOC="fixed") == "fixed fixed fixed fixed"  # glibc: thresholds fixed
    pool = "pool" if shutil.which(os.environ.get("CXX") or "g++") else "None"  # fp32 channels-last: the CPU pool
    assert run_python(code, FULLRES_MALLOC="") == f"None {pool} fixed fixed"
    assert run_python(code, FULLRES_MALLOC="default") == "None None None None"
    assert run_python(code, FULLRES_MALLOC="cached") == "cached cached cached cached"


FRAGMENTATION = """
import sys, torch
from fullres.kernels.malloc import set_training_malloc_policy
if sys.argv[1] == "policy":
    set_training_malloc_policy(force=True)
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
big = torch.ones(4 * 2**20); del big             # freeing a 16 MiB mmapped block raises glibc's threshold
before = rss()
blocks = [torch.ones(2**18) for _ in range(256)]  # 256 x 1 MiB
kept = blocks[1::2]; del blocks                   # free every other one: holes in the heap
print((rss() - before) / 2**20 - 128)             # MiB resident beyond the 128 MiB still alive
"""


def test_freed_blocks_leave_the_process_only_under_the_policy():
    """The mechanism behind the policy: glibc's dynamic threshold puts 1 MiB blocks in its heap after a
    16 MiB block was freed, and freed holes there stay resident; with fixed thresholds they do not."""
    def resident_after_free(mode: str) -> float:
        return float(subprocess.run([sys.executable, "-c", FRAGMENTATION, mode], capture_output=True, text=True,
                                    check=True).stdout)

    assert resident_after_free("default") > 64
    assert resident_after_free("policy") < 8


REUSE = """
import resource, sys, torch
from fullres.kernels.malloc import set_training_malloc_policy
print(set_training_malloc_policy(), end=" ")
def step():
    blocks = [torch.ones(16 * 2**20) for _ in range(4)]  # 4 x 64 MiB, above glibc's largest mmap threshold
    del blocks
for _ in range(3):  # the heap settles: a hole left by an aligned block is too small for the same request
    step()
counts = []
for _ in range(3):  # pages faulted in by a settled step; the fewest of three (one may still regrow the heap)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(counts))
"""


def test_cached_policy_reuses_freed_large_blocks_without_faulting_them_in_again():
    """The mechanism behind FULLRES_MALLOC=cached: by default every block above 32 MiB is mmapped and its
    pages are faulted in afresh each time (256 MiB: ~65,000 faults); cached, once the heap has settled
    (posix_memalign's holes are a little too small for the same request, so it grows for a few steps), none."""
    def faults(policy: str) -> tuple[str, int]:
        name, count = run_python(REUSE, FULLRES_MALLOC=policy).split()
        return name, int(count)

    assert faults("default")[1] > 60_000
    name, count = faults("cached")
    assert name == "cached" and count < 1_000


def test_an_unknown_allocator_policy_is_refused_in_one_line(tmp_path):
    import os

    done = subprocess.run([sys.executable, "-m", "fullres", "estimate", "--shape", "16", "16", "16", "--batch", "1"],
                          capture_output=True, text=True, env={**os.environ, "FULLRES_MALLOC": "cache"}, cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr.strip() == ("fullres estimate: error: FULLRES_MALLOC='cache' is not an allocator policy: "
                                   "use one of pool, fixed, cached, default, or unset it")


MKL_BUFFERS = """
import json, sys, torch
from fullres.job.config import Strategy
from fullres.kernels.malloc import mkl_held_buffers, set_training_malloc_policy
torch.set_num_threads(2)
set_training_malloc_policy(Strategy(precision=sys.argv[1], checkpointing=True, channels_last=True))
first = mkl_held_buffers()
cl = torch.channels_last_3d
for channels, rows in ((4, 12), (16, 8), (32, 18), (64, 6)):  # ATen's slow path: N x C x D x H <= 20480
    x = torch.randn(1, channels, rows, 16, 24).to(memory_format=cl).requires_grad_()
    w = torch.randn(channels, channels, 3, 3, 3).to(memory_format=cl).requires_grad_()
    torch.nn.functional.conv3d(x, w, padding=(0, 1, 1)).sum().backward()
print(json.dumps([first, mkl_held_buffers()]))
"""


def test_fp32_jobs_start_with_mkls_largest_gemm_buffers_and_never_add_one():
    """MKL keeps a new SGEMM buffer whenever a request outgrows those it holds, so what a job holds would
    depend on the order of its slow-path convolutions; an fp32 job under the fixed thresholds holds the largest
    from the start, and the slow path's forward and backward GEMMs at four sizes add nothing to it."""
    import json

    import pytest

    first, after = json.loads(run_python(MKL_BUFFERS, "fp32", FULLRES_MALLOC=""))
    if first is None:
        pytest.skip("this torch has no MKL, or does not export its memory statistics")
    assert first[0] > 0 and first[1] >= 1  # held before any convolution ran
    assert after == first
    first, after = json.loads(run_python(MKL_BUFFERS, "bf16", FULLRES_MALLOC=""))
    assert first == [0, 0]  # a bf16 job does not hold them (its convolutions run in oneDNN)
