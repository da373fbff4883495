"""Kernels and allocators: the machine a job runs on (`device`), routing around CPU convolution kernels
that fail or crawl (`onednn`, and the drop-in layers that use it, `layers`), and the allocators whose
behaviour the cost model replays (`malloc`: glibc's heap policy; `cpu_pool`: fullres's caching CPU
allocator; `cuda_allocator`: a model of PyTorch's CUDA caching allocator)."""
