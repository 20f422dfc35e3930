// SharedMemoryRegistry: Triton's system shared-memory extension for both front ends. A
// client on the same host creates a POSIX shared-memory object (shm_open, a file under
// /dev/shm), registers a part of it as a named region, and then names the region, an offset
// and a size instead of sending tensor bytes; results can be written into a region too.
// Off unless --allow_shared_memory. A call holds the regions it uses (shared_ptr), so
// unregistering a region never unmaps memory under a running call.
#ifndef SIMSERVE_SERVER_SHARED_MEMORY_H_
#define SIMSERVE_SERVER_SHARED_MEMORY_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/metrics.h"
#include "server/mutex.h"

namespace simserve {

// What a region was registered as (SystemSharedMemoryStatus).
struct SharedMemoryRegionInfo {
  std::string name;
  std::string key;
  uint64_t offset = 0;
  uint64_t byte_size = 0;
};

// One mapped region. Immutable; unmapped when the last holder lets go.
class SharedMemoryRegion {
 public:
  SharedMemoryRegion(SharedMemoryRegionInfo info, int fd, void* mapping, size_t mapping_size,
                     std::byte* base);
  ~SharedMemoryRegion();
  SharedMemoryRegion(const SharedMemoryRegion&) = delete;
  SharedMemoryRegion& operator=(const SharedMemoryRegion&) = delete;

  const SharedMemoryRegionInfo& info() const { return info_; }
  // The region's bytes: [info.offset, info.offset + info.byte_size) of the object.
  std::span<std::byte> bytes() const { return {base_, info_.byte_size}; }
  // OK if the object still covers the region. A client that shrinks the object under a
  // registered region would make reads fault (SIGBUS): checked at every use.
  absl::Status CheckStillMapped() const;

 private:
  const SharedMemoryRegionInfo info_;
  const int fd_;
  void* const mapping_;
  const size_t mapping_size_;
  std::byte* const base_;
};

// Bytes a request names inside a region, and the region that keeps them mapped.
struct SharedMemorySpan {
  std::span<std::byte> bytes;
  std::shared_ptr<const SharedMemoryRegion> region;
};

// Thread-safe. Every method returns FAILED_PRECONDITION when shared memory is not allowed.
class SharedMemoryRegistry {
 public:
  // `metrics` (borrowed, may be null) gets the region count and mapped bytes.
  SharedMemoryRegistry(bool allowed, int max_regions, ServerMetrics* metrics);

  bool allowed() const { return allowed_; }

  // Maps [offset, offset + byte_size) of the POSIX shared-memory object `key` as `name`.
  // INVALID_ARGUMENT: empty name, key not "/name" (one leading slash, no other, not "." or
  // ".."), byte_size 0, offset + byte_size beyond the object; NOT_FOUND: no such object;
  // ALREADY_EXISTS: `name` is registered; RESOURCE_EXHAUSTED: max_regions reached.
  absl::Status Register(const std::string& name, const std::string& key, uint64_t offset,
                        uint64_t byte_size) ABSL_LOCKS_EXCLUDED(mu_);
  // Removes `name` ("" = every region). Unknown names are not an error (Triton's rule).
  // Calls that hold the region keep it mapped until they end.
  absl::Status Unregister(const std::string& name) ABSL_LOCKS_EXCLUDED(mu_);
  // `name`'s registration, or every region's for "" (sorted by name). NOT_FOUND if unknown.
  absl::StatusOr<std::vector<SharedMemoryRegionInfo>> Status(const std::string& name) const
      ABSL_LOCKS_EXCLUDED(mu_);
  // The bytes [offset, offset + byte_size) of region `name`, for `what` (e.g. "tensor a"),
  // named in error messages. INVALID_ARGUMENT for an unknown region, a range outside it, or
  // an object shrunk since registration.
  absl::StatusOr<SharedMemorySpan> Resolve(absl::string_view what, const std::string& name,
                                           int64_t offset, int64_t byte_size) const
      ABSL_LOCKS_EXCLUDED(mu_);

 private:
  absl::Status CheckAllowed() const;
  void PublishLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const bool allowed_;
  const int max_regions_;
  ServerMetrics* const metrics_;
  mutable Mutex mu_;
  std::map<std::string, std::shared_ptr<const SharedMemoryRegion>> regions_ ABSL_GUARDED_BY(mu_);
};

// The error of a shared-memory request while shared memory is off.
absl::Status SharedMemoryDisabledError();

}  // namespace simserve

#endif  // SIMSERVE_SERVER_SHARED_MEMORY_H_
