// AlignedBuffer: an owned, uninitialised, 64-byte aligned byte buffer (cache-line and
// AVX-512 aligned), and BufferPool, which keeps freed large buffers for reuse. A fresh
// buffer costs a page fault per 4 KiB on first touch (26-42 ms for 80 MB on the project's
// machines), more than copying into it; a reused one costs nothing.
#ifndef SIMSERVE_SERVER_ALIGNED_BUFFER_H_
#define SIMSERVE_SERVER_ALIGNED_BUFFER_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>

#include "absl/base/thread_annotations.h"
#include "server/mutex.h"

namespace simserve {

class BufferPool;

// Movable, not copyable. Returns its memory to its pool (or frees it) when destroyed, on
// whatever thread that happens (e.g. a gRPC thread releasing a sent slice).
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  ~AlignedBuffer();
  AlignedBuffer(AlignedBuffer&& other) noexcept;
  AlignedBuffer& operator=(AlignedBuffer&& other) noexcept;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;

  std::byte* get() const { return data_; }
  // Bytes usable at get() (at least the requested size).
  size_t capacity() const { return capacity_; }
  explicit operator bool() const { return data_ != nullptr; }
  friend bool operator==(const AlignedBuffer& b, std::nullptr_t) { return b.data_ == nullptr; }

 private:
  friend class BufferPool;
  friend AlignedBuffer AllocateAligned(int64_t bytes);
  AlignedBuffer(std::byte* data, size_t capacity, std::shared_ptr<BufferPool> pool)
      : data_(data), capacity_(capacity), pool_(std::move(pool)) {}
  void Reset();

  std::byte* data_ = nullptr;
  size_t capacity_ = 0;
  std::shared_ptr<BufferPool> pool_;  // null: freed, not pooled
};

// A cache of freed buffers, by size class. Thread-safe. Buffers hold a shared reference to
// their pool, so the pool lives until the last of them is gone.
class BufferPool : public std::enable_shared_from_this<BufferPool> {
 public:
  // Keeps at most `capacity_bytes` of free buffers; 0 disables caching.
  static std::shared_ptr<BufferPool> Create(int64_t capacity_bytes);
  ~BufferPool();
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;

  // `bytes` uninitialised bytes (at least one), 64-byte aligned; empty when out of memory.
  // Sizes of at least kMinPooledBytes are rounded up to a size class and reused.
  AlignedBuffer Allocate(int64_t bytes);

  // Bytes currently cached (free, kept for reuse).
  int64_t cached_bytes() const;
  // Frees every cached buffer (the server does when it goes quiet); returns the bytes freed.
  int64_t Clear();

  // Below this, malloc's own free lists already avoid fresh pages.
  static constexpr size_t kMinPooledBytes = size_t{64} << 10;

 private:
  friend class AlignedBuffer;
  explicit BufferPool(int64_t capacity_bytes) : capacity_bytes_(capacity_bytes) {}
  void Return(std::byte* data, size_t capacity);

  const int64_t capacity_bytes_;
  mutable Mutex mu_;
  std::multimap<size_t, std::byte*> free_ ABSL_GUARDED_BY(mu_);  // by capacity
  int64_t cached_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

// An unpooled buffer (tests, one-off use).
AlignedBuffer AllocateAligned(int64_t bytes);

}  // namespace simserve

#endif  // SIMSERVE_SERVER_ALIGNED_BUFFER_H_
