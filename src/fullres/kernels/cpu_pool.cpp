// A caching allocator for PyTorch's CPU tensors, with the rules of PyTorch's CUDA caching allocator.
//
// Why: glibc maps every block above 32 MiB afresh and the kernel faults its pages in on every training
// step (~400,000 faults, ~1 s of system time per 64^3 step); its heap keeps smaller blocks but in a way
// no estimate can follow (posix_memalign's holes). This pool keeps freed blocks for reuse, like the
// CUDA allocator does on a GPU, by rules simple enough that fullres's dry run replays them exactly
// (fullres/kernels/cuda_allocator.py, CachingAllocatorModel): requests rounded up to 512 bytes; best fit
// by (size, address) in a small (<= 1 MiB) or large pool; a new segment of 2 MiB for small requests,
// 20 MiB for 1-10 MiB ones, the request rounded up to 2 MiB above that; a block split when the rest is
// worth keeping (>= 512 bytes small, > 1 MiB large); a freed block merged with its free neighbours.
// Segments are mapped populated (MAP_POPULATE) and kept, so the resident memory the pool adds is exactly
// its reserved bytes; only when the kernel refuses a new segment are the wholly free ones unmapped and
// the mapping tried once more (as the CUDA allocator frees its cached blocks before reporting out of
// memory), so a failed allocation never leaves cached memory behind.
//
// fork(): handlers registered with pthread_atfork hold the pool's lock across the fork, so the child
// gets the pool's maps in a consistent state (not half-way through another thread's update) and its
// lock free; the child then serves its own allocations with plain malloc (data-loader workers).
//
// Built by fullres.kernels.cpu_pool with g++ against c10 only and driven through ctypes.

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <pthread.h>
#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <set>
#include <unordered_map>
#include <tuple>
#include <utility>
#include <vector>

namespace {

constexpr size_t kMinBlockSize = 512;
constexpr size_t kSmallSize = 1 << 20;
constexpr size_t kSmallBuffer = 2 << 20;
constexpr size_t kLargeBuffer = 20 << 20;
constexpr size_t kMinLargeAlloc = 10 << 20;
constexpr size_t kRoundLarge = 2 << 20;

size_t round_size(size_t size) {
  return size < kMinBlockSize ? kMinBlockSize : (size + kMinBlockSize - 1) / kMinBlockSize * kMinBlockSize;
}

size_t segment_size(size_t size) {
  if (size <= kSmallSize) return kSmallBuffer;
  if (size < kMinLargeAlloc) return kLargeBuffer;
  return (size + kRoundLarge - 1) / kRoundLarge * kRoundLarge;
}

struct Block {
  size_t size;
  bool small;
  bool in_use;
  uintptr_t segment;  // the segment's start: blocks of different segments never merge
  uintptr_t logical;  // the segment's address in the dry run's model (segments one after another)
};

// Free blocks are ordered by (size, the model's address), so ties go the way the model breaks them
// whatever addresses mmap returns.
using FreeKey = std::tuple<size_t, uintptr_t, uintptr_t>;  // size, model address, real address

struct Stats {
  int64_t allocated = 0, reserved = 0, peak_allocated = 0, peak_reserved = 0, segments = 0, fallback = 0,
          released = 0;
};

class Pool {
 public:
  void* malloc(size_t nbytes) {
    if (nbytes == 0) return nullptr;
    std::lock_guard<std::mutex> lock(mutex_);
    if (passthrough_) {  // a forked child (a data-loader worker): plain aligned malloc
      void* data = nullptr;
      if (posix_memalign(&data, 64, nbytes) != 0) return nullptr;
      stats_.fallback += 1;
      return data;
    }
    size_t size = round_size(nbytes);
    bool small = size <= kSmallSize;
    auto& pool = free_[small];
    auto it = pool.lower_bound({size, 0, 0});
    uintptr_t address;
    size_t block_size;
    if (it != pool.end()) {
      block_size = std::get<0>(*it);
      address = std::get<2>(*it);
      pool.erase(it);
    } else {
      block_size = segment_size(size);
      void* segment = map_segment(block_size);
      if (segment == MAP_FAILED && release_free_segments() > 0) segment = map_segment(block_size);
      if (segment == MAP_FAILED) return nullptr;
      address = reinterpret_cast<uintptr_t>(segment);
      blocks_[address] = {block_size, small, false, address, next_logical_};
      segments_[address] = block_size;
      next_logical_ += block_size + kMinBlockSize;  // the model's gap between segments
      stats_.reserved += block_size;
      stats_.segments += 1;
      if (stats_.reserved > stats_.peak_reserved) stats_.peak_reserved = stats_.reserved;
    }
    size_t remaining = block_size - size;
    if (small ? remaining >= kMinBlockSize : remaining > kSmallSize) {
      Block& block = blocks_[address];
      block.size = size;
      blocks_[address + size] = {remaining, small, false, block.segment, block.logical};
      pool.insert(free_key(address + size, remaining, block));
      block_size = size;
    }
    Block& taken = blocks_[address];
    taken.in_use = true;
    if (tracing_) {
      trace_.push_back(static_cast<int64_t>(nbytes));
      trace_.push_back(static_cast<int64_t>(taken.logical + (address - taken.segment)));
    }
    stats_.allocated += block_size;
    if (stats_.allocated > stats_.peak_allocated) stats_.peak_allocated = stats_.allocated;
    return reinterpret_cast<void*>(address);
  }

  void free(void* data) {
    if (data == nullptr) return;
    std::lock_guard<std::mutex> lock(mutex_);
    uintptr_t address = reinterpret_cast<uintptr_t>(data);
    auto found = blocks_.find(address);
    if (found == blocks_.end() || !found->second.in_use) {  // a passthrough block of a forked child
      std::free(data);
      return;
    }
    Block block = found->second;
    if (tracing_) {
      trace_.push_back(-1);
      trace_.push_back(static_cast<int64_t>(block.logical + (address - block.segment)));
    }
    stats_.allocated -= block.size;
    blocks_.erase(found);
    size_t size = block.size;
    auto following = blocks_.find(address + size);
    if (following != blocks_.end() && !following->second.in_use && following->second.segment == block.segment) {
      free_[block.small].erase(free_key(following->first, following->second.size, block));
      size += following->second.size;
      blocks_.erase(following);
    }
    auto preceding = blocks_.lower_bound(address);
    if (preceding != blocks_.begin()) {
      --preceding;
      if (!preceding->second.in_use && preceding->second.segment == block.segment &&
          preceding->first + preceding->second.size == address) {
        free_[block.small].erase(free_key(preceding->first, preceding->second.size, block));
        size += preceding->second.size;
        address = preceding->first;
        blocks_.erase(preceding);
      }
    }
    blocks_[address] = {size, block.small, false, block.segment, block.logical};
    free_[block.small].insert(free_key(address, size, block));
  }

  Stats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return stats_;
  }

  // Requests as they come, two numbers each: (bytes asked, the block's model address) for an allocation,
  // (-1, model address) for a free. For tests and diagnosis.
  void trace(bool on) {
    std::lock_guard<std::mutex> lock(mutex_);
    tracing_ = on;
    if (on) trace_.clear();
  }

  size_t read_trace(int64_t* out, size_t capacity) {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t n = trace_.size() < capacity ? trace_.size() : capacity;
    if (out != nullptr) std::memcpy(out, trace_.data(), n * sizeof(int64_t));
    return trace_.size();
  }

  // pthread_atfork's handlers: the forking thread holds the lock across fork(), so no other thread is
  // inside the pool when the child's copy is made; both sides then release it (the child's only thread
  // is the one that took it).
  void before_fork() { mutex_.lock(); }
  void after_fork_in_parent() { mutex_.unlock(); }
  void after_fork_in_child() {
    passthrough_ = true;
    mutex_.unlock();
  }

  // Unmaps every segment that is one free block; returns how many. Called with the lock held.
  size_t release_free_segments() {
    size_t released = 0;
    for (auto it = segments_.begin(); it != segments_.end();) {
      auto block = blocks_.find(it->first);
      if (block == blocks_.end() || block->second.in_use || block->second.size != it->second) {
        ++it;
        continue;
      }
      free_[block->second.small].erase(free_key(block->first, block->second.size, block->second));
      blocks_.erase(block);
      munmap(reinterpret_cast<void*>(it->first), it->second);
      stats_.reserved -= static_cast<int64_t>(it->second);
      stats_.segments -= 1;
      stats_.released += 1;
      released += 1;
      it = segments_.erase(it);
    }
    return released;
  }

 private:
  static void* map_segment(size_t size) {
    return mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  }

  static FreeKey free_key(uintptr_t address, size_t size, const Block& of_segment) {
    return {size, of_segment.logical + (address - of_segment.segment), address};
  }

  std::mutex mutex_;
  bool passthrough_ = false;
  bool tracing_ = false;
  std::vector<int64_t> trace_;
  uintptr_t next_logical_ = 0;
  std::map<uintptr_t, Block> blocks_;            // every block by address, free or in use
  std::map<uintptr_t, size_t> segments_;         // every mapped segment: start -> size
  std::set<FreeKey> free_[2];  // [large, small]: free blocks
  Stats stats_;
};

Pool& pool() {
  static Pool* instance = new Pool();  // never destroyed: tensors may be freed during interpreter exit
  return *instance;
}

void delete_block(void* data) { pool().free(data); }

class PoolAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    void* data = pool().malloc(nbytes);
    if (nbytes > 0 && data == nullptr) throw std::bad_alloc();
    return {data, data, &delete_block, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &delete_block; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

PoolAllocator allocator;
c10::Allocator* previous = nullptr;

}  // namespace

extern "C" {

// Make the pool PyTorch's CPU allocator. Tensors made before keep their own deleters.
int fullres_pool_install() {
  static bool atfork = false;
  if (!atfork) {
    pthread_atfork([] { pool().before_fork(); }, [] { pool().after_fork_in_parent(); },
                   [] { pool().after_fork_in_child(); });
    atfork = true;
  }
  if (previous == nullptr) previous = c10::GetCPUAllocator();
  c10::SetCPUAllocator(&allocator, 0);
  return c10::GetCPUAllocator() == &allocator;
}

// Give PyTorch back the allocator it had; blocks already handed out are still freed into the pool.
int fullres_pool_uninstall() {
  if (previous == nullptr) return 0;
  c10::SetCPUAllocator(previous, 0);
  return c10::GetCPUAllocator() == previous;
}

int fullres_pool_installed() { return c10::GetCPUAllocator() == &allocator; }

// allocated, reserved, peak allocated, peak reserved, segments, passthrough allocations, segments released
void fullres_pool_stats(int64_t* out) {
  Stats s = pool().stats();
  out[0] = s.allocated;
  out[1] = s.reserved;
  out[2] = s.peak_allocated;
  out[3] = s.peak_reserved;
  out[4] = s.segments;
  out[5] = s.fallback;
  out[6] = s.released;
}

void fullres_pool_trace(int on) { pool().trace(on != 0); }

// Copies up to `capacity` entries of the trace into `out`; returns how many there are.
int64_t fullres_pool_read_trace(int64_t* out, int64_t capacity) {
  return static_cast<int64_t>(pool().read_trace(out, static_cast<size_t>(capacity)));
}

}  // extern "C"
