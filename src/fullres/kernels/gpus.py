"""GPUs a training job can be planned for from any machine (``plan --gpu``, ``estimate --gpu``).

Each entry is the GPU's marketed memory, which ``--gpu`` makes the budget, and its multiprocessor count.
The marketed size is what NVIDIA names the card by ("80GB" is 80 GiB of HBM); the total a process can
use is a little less (an H100-80GB reports 79.6 GiB), and the CUDA context takes its share of what is left
(:data:`fullres.cost.dryrun.CUDA_RUNTIME_BYTES`). Give ``--memory`` for an exact budget.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int
    multiprocessors: int


GPUS: dict[str, GPU] = {gpu.name: gpu for gpu in (
    GPU("V100-32GB", 32 * 2**30, 80),
    GPU("A100-40GB", 40 * 2**30, 108),
    GPU("A100-80GB", 80 * 2**30, 108),
    GPU("H100-80GB", 80 * 2**30, 132),
    GPU("H200", 141 * 2**30, 132),
    GPU("L40S", 48 * 2**30, 142),
    GPU("RTX4090", 24 * 2**30, 128),
)}

# Where no GPU is visible the dry run cannot ask for one's multiprocessors (they size the bias-gradient
# sum's buffer, which grows with them): the most of any listed GPU, so the buffer is not underestimated.
MODELLED_MULTIPROCESSORS = max(gpu.multiprocessors for gpu in GPUS.values())


def gpu_named(name: str) -> GPU:
    """The GPU of :data:`GPUS` called `name` (case and a missing dash ignored); ValueError naming the choices."""
    wanted = name.replace("-", "").lower()
    for gpu in GPUS.values():
        if gpu.name.replace("-", "").lower() == wanted:
            return gpu
    raise ValueError(f"unknown GPU {name!r}: choose one of {', '.join(GPUS)}")
