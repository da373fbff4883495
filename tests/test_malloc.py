import subprocess
import sys


def run_python(code: str, **env) -> str:
    import os

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, **env}).stdout.strip()


def test_training_malloc_policy_follows_the_strategy_and_the_environment():
    code = ("import sys; from fullres.config import Strategy; from fullres.memory.malloc import set_training_malloc_policy as s; "
            "print(s(None), s(Strategy()), s(Strategy(checkpointing=True)), s(Strategy(slabs=2)))")
    assert run_python(code, FULLRES_MALLOC="fixed") == "True True True True"  # glibc: thresholds fixed
    assert run_python(code, FULLRES_MALLOC="") == "False False True True"  # memory-saving strategies only
    assert run_python(code, FULLRES_MALLOC="default") == "False False False False"


FRAGMENTATION = """
import sys, torch
from fullres.memory.malloc import set_training_malloc_policy
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
