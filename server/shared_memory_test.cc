#include "server/shared_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace simserve {
namespace {

// A POSIX shared-memory object of `size` bytes filled with 0, 1, 2, ...; unlinked at the end.
class ShmObject {
 public:
  explicit ShmObject(size_t size)
      : key_(absl::StrCat("/simserve_test_", getpid(), "_", counter_++)) {
    const int fd = shm_open(key_.c_str(), O_CREAT | O_RDWR | O_EXCL, 0600);
    EXPECT_GE(fd, 0);
    EXPECT_EQ(ftruncate(fd, static_cast<off_t>(size)), 0);
    std::string bytes(size, '\0');
    for (size_t i = 0; i < size; ++i) bytes[i] = static_cast<char>(i % 251);
    EXPECT_EQ(pwrite(fd, bytes.data(), size, 0), static_cast<ssize_t>(size));
    fd_ = fd;
  }
  ~ShmObject() {
    close(fd_);
    shm_unlink(key_.c_str());
  }
  const std::string& key() const { return key_; }
  void Truncate(size_t size) { ASSERT_EQ(ftruncate(fd_, static_cast<off_t>(size)), 0); }

 private:
  static inline int counter_ = 0;
  std::string key_;
  int fd_ = -1;
};

TEST(SharedMemoryRegistryTest, OffUnlessAllowed) {
  SharedMemoryRegistry registry(/*allowed=*/false, 8, nullptr);
  ShmObject object(4096);
  EXPECT_EQ(registry.Register("r", object.key(), 0, 16).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(registry.Status("").status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(registry.Resolve("tensor a", "r", 0, 4).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(registry.Unregister("").code(), absl::StatusCode::kFailedPrecondition);
}

TEST(SharedMemoryRegistryTest, RegisterResolvesTheRegisteredBytes) {
  SharedMemoryRegistry registry(true, 8, nullptr);
  ShmObject object(3 * 4096);
  // A region starting inside a page: the mapping is page-aligned underneath.
  ASSERT_TRUE(registry.Register("in", object.key(), 4100, 1000).ok());
  auto span = registry.Resolve("tensor a", "in", 10, 20);
  ASSERT_TRUE(span.ok()) << span.status();
  ASSERT_EQ(span->bytes.size(), 20u);
  for (size_t i = 0; i < 20; ++i) {
    EXPECT_EQ(static_cast<unsigned char>(span->bytes[i]), (4100 + 10 + i) % 251) << i;
  }
  auto status = registry.Status("in");
  ASSERT_TRUE(status.ok());
  ASSERT_EQ(status->size(), 1u);
  EXPECT_EQ((*status)[0].key, object.key());
  EXPECT_EQ((*status)[0].offset, 4100u);
  EXPECT_EQ((*status)[0].byte_size, 1000u);
  EXPECT_EQ(registry.Status("other").status().code(), absl::StatusCode::kNotFound);
}

TEST(SharedMemoryRegistryTest, RejectsBadKeysRangesAndNames) {
  SharedMemoryRegistry registry(true, 8, nullptr);
  ShmObject object(4096);
  for (const char* key : {"", "noslash", "/", "/a/b", "/..", "/.", "//x", "../x"}) {
    EXPECT_EQ(registry.Register("r", key, 0, 16).code(), absl::StatusCode::kInvalidArgument) << key;
  }
  EXPECT_EQ(registry.Register("r", "/simserve_test_does_not_exist", 0, 16).code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(registry.Register("r", object.key(), 0, 4097).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(registry.Register("r", object.key(), 4000, 97).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(registry.Register("r", object.key(), UINT64_MAX, 2).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(registry.Register("r", object.key(), 0, 0).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(registry.Register("", object.key(), 0, 16).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(registry.Register("r", object.key(), 0, 4096).ok());
  EXPECT_EQ(registry.Register("r", object.key(), 0, 16).code(), absl::StatusCode::kAlreadyExists);
  // Ranges inside the region only.
  EXPECT_EQ(registry.Resolve("tensor a", "r", 4000, 97).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(registry.Resolve("tensor a", "r", -1, 4).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(registry.Resolve("tensor a", "r", 0, -4).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(registry.Resolve("tensor a", "missing", 0, 4).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(registry.Resolve("tensor a", "r", 4000, 96).ok());
}

TEST(SharedMemoryRegistryTest, UnregisteredRegionStaysMappedForItsHolder) {
  SharedMemoryRegistry registry(true, 8, nullptr);
  ShmObject object(4096);
  ASSERT_TRUE(registry.Register("r", object.key(), 0, 4096).ok());
  auto span = registry.Resolve("tensor a", "r", 100, 8);
  ASSERT_TRUE(span.ok());
  ASSERT_TRUE(registry.Unregister("r").ok());
  EXPECT_EQ(registry.Resolve("tensor a", "r", 0, 8).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(static_cast<unsigned char>(span->bytes[0]), 100);  // still readable
  span->bytes[1] = std::byte{42};                              // and writable
  EXPECT_TRUE(registry.Unregister("never registered").ok());   // Triton: not an error
}

TEST(SharedMemoryRegistryTest, UnregisterAllAndTheRegionLimit) {
  SharedMemoryRegistry registry(true, 2, nullptr);
  ShmObject object(4096);
  ASSERT_TRUE(registry.Register("a", object.key(), 0, 16).ok());
  ASSERT_TRUE(registry.Register("b", object.key(), 16, 16).ok());
  EXPECT_EQ(registry.Register("c", object.key(), 0, 16).code(),
            absl::StatusCode::kResourceExhausted);
  auto all = registry.Status("");
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 2u);
  EXPECT_EQ((*all)[0].name, "a");
  ASSERT_TRUE(registry.Unregister("").ok());
  EXPECT_TRUE(registry.Status("")->empty());
  EXPECT_TRUE(registry.Register("c", object.key(), 0, 16).ok());
}

TEST(SharedMemoryRegistryTest, ShrunkObjectIsRefusedInsteadOfFaulting) {
  SharedMemoryRegistry registry(true, 8, nullptr);
  ShmObject object(8192);
  ASSERT_TRUE(registry.Register("r", object.key(), 0, 8192).ok());
  object.Truncate(100);
  EXPECT_EQ(registry.Resolve("tensor a", "r", 0, 8).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace simserve
