"""The CUDA memory model of the dry run, checked without a GPU: PyTorch's caching-allocator rules and the
bias-gradient reduction buffer, against hand-worked sequences and measurements from an H100."""

import pytest
import torch

from fullres.kernels.cuda_allocator import CachingAllocatorModel, round_size, segment_size
from fullres.cost.dryrun import cuda_bias_gradient_buffer_bytes

MIB = 2**20


def test_round_and_segment_sizes():
    assert round_size(1) == 512 and round_size(512) == 512 and round_size(513) == 1024
    assert segment_size(512) == 2 * MIB and segment_size(MIB) == 2 * MIB  # small pool
    assert segment_size(MIB + 512) == 20 * MIB and segment_size(10 * MIB - 512) == 20 * MIB  # shared large buffer
    assert segment_size(10 * MIB) == 10 * MIB and segment_size(11 * MIB) == 12 * MIB  # own segment, 2 MiB steps


def test_small_requests_share_a_segment_and_merge_back():
    allocator = CachingAllocatorModel()
    a, size_a = allocator.malloc(100)
    b, size_b = allocator.malloc(1000)
    assert (size_a, size_b) == (512, 1024) and allocator.reserved == 2 * MIB and allocator.allocated == 1536
    allocator.free(a)
    allocator.free(b)
    assert allocator.allocated == 0 and allocator.free_blocks[True] == [(2 * MIB, a)]  # one whole block again


def test_large_block_keeps_a_remainder_up_to_1_mib():
    allocator = CachingAllocatorModel()
    first, size = allocator.malloc(11 * MIB)  # a 12 MiB segment: the 1 MiB left over is not split off
    assert size == 12 * MIB and allocator.allocated == 12 * MIB
    allocator.free(first)
    again, size = allocator.malloc(10 * MIB + 512)  # served from the cached 12 MiB block: remainder > 1 MiB, split
    assert again == first and size == 10 * MIB + 512 and allocator.reserved == 12 * MIB
    middle, size = allocator.malloc(3 * MIB)  # 1-10 MiB: a new 20 MiB buffer, split
    assert size == 3 * MIB and allocator.reserved == 32 * MIB
    assert allocator.allocated == 13 * MIB + 512


def test_best_fit_takes_the_smallest_free_block():
    allocator = CachingAllocatorModel()
    big, _ = allocator.malloc(40 * MIB)
    small, _ = allocator.malloc(12 * MIB)
    allocator.free(big)
    allocator.free(small)
    address, size = allocator.malloc(12 * MIB)
    assert address == small and size == 12 * MIB and allocator.reserved == 52 * MIB


# (channels, side, bytes) measured on an H100 (132 multiprocessors), torch 2.11+cu130: peak of
# x.sum((0, 2, 3, 4)) for a channels-last (1, C, side, side, side) tensor, minus its 512-byte output.
H100_SUM_BUFFERS = [(8, 16, 0), (8, 32, 8704), (8, 64, 66048), (8, 128, 524800), (32, 16, 66048), (32, 32, 524800),
                    (32, 64, 4194816), (32, 128, 8651264), (128, 16, 4194816), (128, 32, 33554944),
                    (128, 64, 138412544), (128, 128, 138412544)]


@pytest.mark.parametrize("channels, side, measured", H100_SUM_BUFFERS)
def test_bias_gradient_buffer_matches_the_h100(channels, side, measured):
    grad = torch.empty(1, channels, side, side, side, device="meta").contiguous(memory_format=torch.channels_last_3d)
    assert cuda_bias_gradient_buffer_bytes(grad, multiprocessors=132) == measured


def test_contiguous_and_single_channel_gradients_need_no_buffer():
    assert cuda_bias_gradient_buffer_bytes(torch.empty(1, 128, 64, 64, 64, device="meta"), 132) == 0
    one = torch.empty(1, 1, 64, 64, 64, device="meta").contiguous(memory_format=torch.channels_last_3d)
    assert cuda_bias_gradient_buffer_bytes(one, 132) == 0
