#include "server/aligned_buffer.h"

#include <cstdint>
#include <cstring>
#include <utility>

#include "gtest/gtest.h"

namespace simserve {
namespace {

TEST(BufferPool, FreedBuffersOfTheSameSizeClassAreReused) {
  auto pool = BufferPool::Create(int64_t{8} << 20);
  std::byte* first = nullptr;
  {
    AlignedBuffer a = pool->Allocate(1'000'000);
    ASSERT_TRUE(a);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(a.get()) % 64, 0U);
    EXPECT_GE(a.capacity(), 1'000'000U);
    std::memset(a.get(), 1, 1'000'000);
    first = a.get();
  }
  EXPECT_EQ(pool->cached_bytes(), 1 << 20);       // 1e6 rounds up to the 1 MiB class
  AlignedBuffer again = pool->Allocate(999'000);  // same size class
  EXPECT_EQ(again.get(), first);
  EXPECT_EQ(pool->cached_bytes(), 0);
}

TEST(BufferPool, CacheStaysWithinItsCapacityAndSmallBuffersAreNotPooled) {
  auto pool = BufferPool::Create(int64_t{3} << 20);
  {
    AlignedBuffer a = pool->Allocate(int64_t{2} << 20);
    AlignedBuffer b = pool->Allocate(int64_t{2} << 20);
  }
  EXPECT_EQ(pool->cached_bytes(), int64_t{2} << 20);  // the second did not fit: freed
  { AlignedBuffer small = pool->Allocate(1000); }
  EXPECT_EQ(pool->cached_bytes(), int64_t{2} << 20);
}

TEST(BufferPool, BuffersKeepThePoolAliveAndMoveOwnership) {
  AlignedBuffer outlives;
  {
    auto pool = BufferPool::Create(int64_t{8} << 20);
    AlignedBuffer a = pool->Allocate(int64_t{1} << 20);
    outlives = std::move(a);
    EXPECT_FALSE(a);  // NOLINT(bugprone-use-after-move): moved-from is empty by contract
  }
  ASSERT_TRUE(outlives);
  std::memset(outlives.get(), 0, outlives.capacity());  // still valid memory (ASan checks)
}

}  // namespace
}  // namespace simserve
