// Size classes: multiples of 1/8 of the next power of two (at most 12.5 % waste), so that
// the same request shape always maps to the same class and finds its buffers again.
#include "server/aligned_buffer.h"

#include <bit>
#include <cstdlib>
#include <utility>

namespace simserve {
namespace {

constexpr size_t kAlignment = 64;

size_t RoundUp(size_t bytes, size_t multiple) {
  return (bytes + multiple - 1) / multiple * multiple;
}

size_t SizeClass(size_t bytes) {
  if (bytes < BufferPool::kMinPooledBytes) return RoundUp(std::max<size_t>(bytes, 1), kAlignment);
  const size_t step = std::bit_ceil(bytes) / 8;
  return RoundUp(bytes, step);
}

std::byte* RawAllocate(size_t capacity) {
  return static_cast<std::byte*>(std::aligned_alloc(kAlignment, capacity));
}

}  // namespace

AlignedBuffer::~AlignedBuffer() { Reset(); }

AlignedBuffer::AlignedBuffer(AlignedBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      capacity_(std::exchange(other.capacity_, 0)),
      pool_(std::move(other.pool_)) {}

AlignedBuffer& AlignedBuffer::operator=(AlignedBuffer&& other) noexcept {
  if (this != &other) {
    Reset();
    data_ = std::exchange(other.data_, nullptr);
    capacity_ = std::exchange(other.capacity_, 0);
    pool_ = std::move(other.pool_);
  }
  return *this;
}

void AlignedBuffer::Reset() {
  if (data_ == nullptr) return;
  if (pool_ != nullptr) {
    pool_->Return(data_, capacity_);
  } else {
    std::free(data_);
  }
  data_ = nullptr;
  capacity_ = 0;
  pool_.reset();
}

std::shared_ptr<BufferPool> BufferPool::Create(int64_t capacity_bytes) {
  return std::shared_ptr<BufferPool>(new BufferPool(capacity_bytes));
}

BufferPool::~BufferPool() {
  MutexLock lock(&mu_);
  for (auto& [capacity, data] : free_) std::free(data);
}

AlignedBuffer BufferPool::Allocate(int64_t bytes) {
  const size_t capacity = SizeClass(bytes <= 0 ? 1 : static_cast<size_t>(bytes));
  if (capacity < kMinPooledBytes || capacity_bytes_ <= 0) {
    return AlignedBuffer(RawAllocate(capacity), capacity, nullptr);
  }
  {
    MutexLock lock(&mu_);
    auto it = free_.find(capacity);
    if (it != free_.end()) {
      std::byte* data = it->second;
      free_.erase(it);
      cached_bytes_ -= static_cast<int64_t>(capacity);
      return AlignedBuffer(data, capacity, shared_from_this());
    }
  }
  std::byte* data = RawAllocate(capacity);
  if (data == nullptr) return AlignedBuffer();
  return AlignedBuffer(data, capacity, shared_from_this());
}

void BufferPool::Return(std::byte* data, size_t capacity) {
  {
    MutexLock lock(&mu_);
    if (cached_bytes_ + static_cast<int64_t>(capacity) <= capacity_bytes_) {
      free_.emplace(capacity, data);
      cached_bytes_ += static_cast<int64_t>(capacity);
      return;
    }
  }
  std::free(data);
}

int64_t BufferPool::Clear() {
  std::multimap<size_t, std::byte*> freed;
  int64_t bytes = 0;
  {
    MutexLock lock(&mu_);
    freed.swap(free_);
    bytes = std::exchange(cached_bytes_, 0);
  }
  for (auto& [capacity, data] : freed) std::free(data);
  return bytes;
}

int64_t BufferPool::cached_bytes() const {
  MutexLock lock(&mu_);
  return cached_bytes_;
}

AlignedBuffer AllocateAligned(int64_t bytes) {
  const size_t capacity = SizeClass(bytes <= 0 ? 1 : static_cast<size_t>(bytes));
  std::byte* data = RawAllocate(capacity);
  if (data == nullptr) return AlignedBuffer();
  return AlignedBuffer(data, capacity, nullptr);
}

}  // namespace simserve
