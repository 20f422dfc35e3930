#include "server/shared_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"

namespace simserve {
namespace {

// POSIX shared-memory names: "/name" with no other slash (shm_open's portable form).
absl::Status ValidateKey(absl::string_view key) {
  const absl::string_view rest = key.size() > 1 ? key.substr(1) : "";
  if (key.empty() || key[0] != '/' || rest.empty() || rest == "." || rest == ".." ||
      rest.find('/') != absl::string_view::npos || key.size() > 255 ||
      key.find('\0') != absl::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("shared memory key '", key,
                     "' is not a POSIX shared-memory name: one leading '/' and no other, "
                     "e.g. \"/simserve_input\" (an object under /dev/shm)"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status SharedMemoryDisabledError() {
  return absl::FailedPreconditionError(
      "shared memory is off on this server (start it with --allow_shared_memory)");
}

SharedMemoryRegion::SharedMemoryRegion(SharedMemoryRegionInfo info, int fd, void* mapping,
                                       size_t mapping_size, std::byte* base)
    : info_(std::move(info)),
      fd_(fd),
      mapping_(mapping),
      mapping_size_(mapping_size),
      base_(base) {}

SharedMemoryRegion::~SharedMemoryRegion() {
  munmap(mapping_, mapping_size_);
  close(fd_);
}

absl::Status SharedMemoryRegion::CheckStillMapped() const {
  struct stat st {};
  if (fstat(fd_, &st) != 0 || static_cast<uint64_t>(st.st_size) < info_.offset + info_.byte_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("shared memory region '", info_.name, "': object ", info_.key,
                     " was shrunk below the registered range; register it again"));
  }
  return absl::OkStatus();
}

SharedMemoryRegistry::SharedMemoryRegistry(bool allowed, int max_regions, ServerMetrics* metrics)
    : allowed_(allowed), max_regions_(max_regions), metrics_(metrics) {}

absl::Status SharedMemoryRegistry::CheckAllowed() const {
  return allowed_ ? absl::OkStatus() : SharedMemoryDisabledError();
}

absl::Status SharedMemoryRegistry::Register(const std::string& name, const std::string& key,
                                            uint64_t offset, uint64_t byte_size) {
  if (absl::Status allowed = CheckAllowed(); !allowed.ok()) return allowed;
  if (name.empty()) return absl::InvalidArgumentError("shared memory region name is empty");
  if (absl::Status valid = ValidateKey(key); !valid.ok()) return valid;
  if (byte_size == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("shared memory region '", name, "': byte_size is 0"));
  }
  {
    MutexLock lock(&mu_);
    if (regions_.contains(name)) {
      return absl::AlreadyExistsError(
          absl::StrCat("shared memory region '", name, "' is already registered"));
    }
    if (static_cast<int>(regions_.size()) >= max_regions_) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "shared memory: ", max_regions_, " regions registered, the server's maximum"));
    }
  }
  // Mapped outside the lock: the object may be large and shm_open does file-system work.
  const int fd = shm_open(key.c_str(), O_RDWR, 0);
  if (fd < 0) {
    const int error = errno;
    const std::string why = absl::StrCat("shared memory key ", key, ": ", std::strerror(error));
    if (error == ENOENT) {
      return absl::NotFoundError(
          absl::StrCat(why, " (no such object on the server's host; is the server remote?)"));
    }
    return absl::InvalidArgumentError(why);
  }
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || offset > static_cast<uint64_t>(st.st_size) ||
      byte_size > static_cast<uint64_t>(st.st_size) - offset) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat("shared memory region '", name, "': offset ",
                                                   offset, " + byte_size ", byte_size,
                                                   " exceeds the ", st.st_size, " bytes of ", key));
  }
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  const uint64_t map_offset = offset / page * page;
  const size_t map_size = static_cast<size_t>(offset - map_offset + byte_size);
  void* mapping = mmap(nullptr, map_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                       static_cast<off_t>(map_offset));
  if (mapping == MAP_FAILED) {
    const int error = errno;
    close(fd);
    return absl::InvalidArgumentError(
        absl::StrCat("shared memory key ", key, ": mmap: ", std::strerror(error)));
  }
  auto region = std::make_shared<const SharedMemoryRegion>(
      SharedMemoryRegionInfo{.name = name, .key = key, .offset = offset, .byte_size = byte_size},
      fd, mapping, map_size, static_cast<std::byte*>(mapping) + (offset - map_offset));
  MutexLock lock(&mu_);
  if (!regions_.emplace(name, std::move(region)).second) {  // registered meanwhile
    return absl::AlreadyExistsError(
        absl::StrCat("shared memory region '", name, "' is already registered"));
  }
  PublishLocked();
  return absl::OkStatus();
}

absl::Status SharedMemoryRegistry::Unregister(const std::string& name) {
  if (absl::Status allowed = CheckAllowed(); !allowed.ok()) return allowed;
  std::map<std::string, std::shared_ptr<const SharedMemoryRegion>> removed;  // unmapped unlocked
  MutexLock lock(&mu_);
  if (name.empty()) {
    removed.swap(regions_);
  } else if (auto it = regions_.find(name); it != regions_.end()) {
    removed.insert(regions_.extract(it));
  }
  PublishLocked();
  return absl::OkStatus();
}

absl::StatusOr<std::vector<SharedMemoryRegionInfo>> SharedMemoryRegistry::Status(
    const std::string& name) const {
  if (absl::Status allowed = CheckAllowed(); !allowed.ok()) return allowed;
  std::vector<SharedMemoryRegionInfo> out;
  MutexLock lock(&mu_);
  if (name.empty()) {
    for (const auto& [unused, region] : regions_) out.push_back(region->info());
    return out;
  }
  auto it = regions_.find(name);
  if (it == regions_.end()) {
    return absl::NotFoundError(absl::StrCat("shared memory region '", name, "' is not registered"));
  }
  out.push_back(it->second->info());
  return out;
}

absl::StatusOr<SharedMemorySpan> SharedMemoryRegistry::Resolve(absl::string_view what,
                                                               const std::string& name,
                                                               int64_t offset,
                                                               int64_t byte_size) const {
  if (absl::Status allowed = CheckAllowed(); !allowed.ok()) return allowed;
  std::shared_ptr<const SharedMemoryRegion> region;
  {
    MutexLock lock(&mu_);
    auto it = regions_.find(name);
    if (it != regions_.end()) region = it->second;
  }
  if (region == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": unknown shared memory region '", name, "'"));
  }
  const auto size = static_cast<int64_t>(region->info().byte_size);
  if (offset < 0 || byte_size < 0 || offset > size || byte_size > size - offset) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": offset ", offset, " + byte_size ", byte_size,
                     " lies outside shared memory region '", name, "' of ", size, " bytes"));
  }
  if (absl::Status mapped = region->CheckStillMapped(); !mapped.ok()) return mapped;
  std::span<std::byte> bytes =
      region->bytes().subspan(static_cast<size_t>(offset), static_cast<size_t>(byte_size));
  return SharedMemorySpan{.bytes = bytes, .region = std::move(region)};
}

void SharedMemoryRegistry::PublishLocked() {
  if (metrics_ == nullptr) return;
  int64_t bytes = 0;
  for (const auto& [unused, region] : regions_) {
    bytes += static_cast<int64_t>(region->info().byte_size);
  }
  metrics_->SetSharedMemory(static_cast<int64_t>(regions_.size()), bytes);
}

}  // namespace simserve
