"""The bias-gradient sum's buffer on a GPU: the measurements behind
fullres.memory.dryrun.cuda_bias_gradient_buffer_bytes (and tests/test_cuda_allocator.py's table).

For channels-last and contiguous (1, C, S, S, S) tensors, fp32 and bf16, prints the peak that
``x.sum((0, 2, 3, 4))`` (what convolution_backward computes for the bias) allocates beyond its input and
its 512-byte output block, beside the model's prediction for this GPU's multiprocessor count.

    python benchmarks/cuda_sum_buffer.py
"""

import sys

import torch

from fullres.memory.dryrun import cuda_bias_gradient_buffer_bytes


def main() -> int:
    if not torch.cuda.is_available():
        print("cuda_sum_buffer.py: error: needs a CUDA device", file=sys.stderr)
        return 2
    multiprocessors = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name(0)}, {multiprocessors} multiprocessors, torch {torch.__version__}")
    print(f"{'dtype':<9}{'layout':<8}{'C':>5}{'side':>6}{'measured B':>14}{'model B':>14}")
    for dtype in (torch.float32, torch.bfloat16):
        for layout in ("cl", "contig"):
            for channels in (1, 8, 32, 128, 256):
                for side in (16, 32, 64, 128):
                    x = torch.randn(1, channels, side, side, side, device="cuda", dtype=dtype)
                    if layout == "cl":
                        x = x.contiguous(memory_format=torch.channels_last_3d)
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    out = x.sum((0, 2, 3, 4))
                    torch.cuda.synchronize()
                    measured = torch.cuda.max_memory_allocated() - base - 512
                    model = cuda_bias_gradient_buffer_bytes(x, multiprocessors)
                    print(f"{str(dtype)[6:]:<9}{layout:<8}{channels:>5}{side:>6}{measured:>14,}{model:>14,}")
                    del x, out
    return 0


if __name__ == "__main__":
    sys.exit(main())
