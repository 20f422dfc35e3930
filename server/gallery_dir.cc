// GalleryDirectory: NAME.npy files as DIRECTORY galleries, rescanned periodically.
#include "server/gallery_dir.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <set>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "client/npy.h"
#include "server/log.h"

namespace simserve {
namespace {

// Reads input.size() bytes of `path` from `offset` into `input`. INVALID_ARGUMENT when the
// file is shorter (it changed while being read), UNKNOWN for I/O errors.
absl::Status ReadExactly(const std::string& path, size_t offset, std::span<std::byte> input) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::UnknownError(absl::StrCat("cannot open: ", std::strerror(errno)));
  size_t done = 0;
  absl::Status status;
  while (done < input.size()) {
    const ssize_t n =
        pread(fd, input.data() + done, input.size() - done, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      status = absl::UnknownError(absl::StrCat("read failed: ", std::strerror(errno)));
      break;
    }
    if (n == 0) {
      status = absl::InvalidArgumentError("the file got shorter while it was read");
      break;
    }
    done += static_cast<size_t>(n);
  }
  close(fd);
  return status;
}

}  // namespace

GalleryDirectory::GalleryDirectory(std::string dir, absl::Duration rescan_period,
                                   kernels::DataType storage_dtype, GalleryStore* store,
                                   ServerMetrics* metrics)
    : dir_(std::move(dir)),
      rescan_period_(rescan_period),
      storage_dtype_(storage_dtype),
      store_(store),
      metrics_(metrics) {}

GalleryDirectory::~GalleryDirectory() {
  MutexLock lock(&watch_mu_);
  watcher_.reset();  // waits for a running rescan
}

void GalleryDirectory::StartWatching() {
  MutexLock lock(&watch_mu_);
  if (watcher_ != nullptr) return;  // already watching
  watcher_ = std::make_unique<PeriodicThread>(rescan_period_, [this] { Rescan(); });
}

void GalleryDirectory::Rescan() {
  const ScanResult result = Scan();
  if (result.loaded + result.removed + result.failed > 0) {
    LogInfo(absl::StrCat("gallery_dir ", dir_, ": ", result.loaded, " loaded, ", result.removed,
                         " removed, ", result.failed, " failed; ", result.served, " served"));
  }
}

GalleryDirectory::ScanResult GalleryDirectory::Scan() {
  MutexLock lock(&scan_mu_);
  ScanResult result;
  std::map<std::string, std::pair<std::string, FileState>> present;  // name -> path, state
  if (DIR* dir = opendir(dir_.c_str()); dir != nullptr) {
    while (const dirent* entry = readdir(dir)) {
      const std::string file = entry->d_name;
      if (file.empty() || file[0] == '.' || !absl::EndsWith(file, ".npy")) continue;
      const std::string path = absl::StrCat(dir_, "/", file);
      struct stat st {};
      if (stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
      present[file.substr(0, file.size() - 4)] = {
          path, FileState{.mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 +
                                      st.st_mtim.tv_nsec,
                          .size = static_cast<int64_t>(st.st_size),
                          .inode = static_cast<int64_t>(st.st_ino)}};
    }
    closedir(dir);
  } else {
    LogWarning(absl::StrCat("gallery_dir ", dir_, " cannot be read: ", std::strerror(errno),
                            " (its galleries stay as they are)"));
    return result;
  }
  for (const auto& [name, file] : present) {
    const auto& [path, state] = file;
    auto seen = seen_.find(name);
    if (seen != seen_.end() && seen->second == state) continue;  // unchanged (loaded or bad)
    seen_[name] = state;
    if (absl::Status loaded = Load(name, path); loaded.ok()) {
      ++result.loaded;
    } else {
      ++result.failed;
      if (metrics_ != nullptr) metrics_->GalleryLoadFailed();
      LogWarning(
          absl::StrCat("gallery file ", path, " not loaded: ", loaded.message(),
                       store_->Get(name).ok() ? " (the previous version keeps serving)" : ""));
    }
  }
  for (auto it = seen_.begin(); it != seen_.end();) {
    if (present.count(it->first) > 0) {
      ++it;
      continue;
    }
    if (store_->Remove(it->first, GallerySource::kDirectory).ok()) {
      ++result.removed;
      LogInfo(absl::StrCat("gallery '", it->first, "' removed: its file left ", dir_));
    }
    it = seen_.erase(it);
  }
  for (const auto& gallery : store_->List()) {
    if (gallery->source == GallerySource::kDirectory) ++result.served;
  }
  return result;
}

absl::Status GalleryDirectory::Load(const std::string& name, const std::string& path) {
  auto file = npy::MappedFile::Open(path);
  if (!file.ok()) return file.status();
  const npy::Layout& layout = file->layout();
  if (layout.big_endian) return absl::InvalidArgumentError("big-endian .npy files are not served");
  kernels::DataType dtype = kernels::DataType::kFloat32;
  if (layout.dtype == npy::DType::kFloat16) {
    dtype = kernels::DataType::kFloat16;
  } else if (layout.dtype != npy::DType::kFloat32) {
    return absl::InvalidArgumentError(
        absl::StrCat("dtype ", npy::Name(layout.dtype), " is not served (float32 or float16)"));
  }
  auto spec = MakeGallerySpec(name, layout.shape, dtype, storage_dtype_);
  if (!spec.ok()) return spec.status();
  if (absl::Status room = store_->CheckRoom(name, GallerySource::kDirectory, spec->prepared_bytes);
      !room.ok()) {
    return room;
  }
  // The data is read with pread, not through the mapping: a file truncated while it loads
  // (np.save over it in place) then gives a short read, not a SIGBUS.
  const size_t offset = layout.data_offset;
  auto gallery = BuildGallery(
      *spec, GallerySource::kDirectory, path, /*threads=*/0,
      [&](std::span<std::byte> input) -> absl::Status { return ReadExactly(path, offset, input); });
  if (!gallery.ok()) return gallery.status();
  const absl::Duration prepare = (*gallery)->prepare_time;
  auto stored = store_->Put(*std::move(gallery));
  if (!stored.ok()) return stored.status();
  if (metrics_ != nullptr) metrics_->ObserveGalleryRegistration(absl::ToDoubleSeconds(prepare));
  LogInfo(absl::StrCat("gallery '", name, "' version ", (*stored)->version, " loaded from ", path,
                       ": ", (*stored)->bytes(), " bytes, prepared in ",
                       absl::FormatDuration(prepare)));
  return absl::OkStatus();
}

}  // namespace simserve
