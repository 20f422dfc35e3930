// GalleryDirectory: serves every NAME.npy file of --gallery_dir as a DIRECTORY gallery.
// Files are loaded before the server reports SERVING, then the directory is rescanned
// periodically: new or changed files are loaded beside the old version and swapped in
// atomically (GalleryStore::Put), removed files remove their gallery. A bad file is logged
// and counted (simserve_gallery_load_failures_total) once per version of the file and never
// stops the server; a gallery already loaded from an earlier version keeps serving.
#ifndef SIMSERVE_SERVER_GALLERY_DIR_H_
#define SIMSERVE_SERVER_GALLERY_DIR_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kernels/dtype.h"
#include "server/gallery_store.h"
#include "server/metrics.h"
#include "server/mutex.h"
#include "server/periodic_thread.h"

namespace simserve {

// Thread-safe. `store` and `metrics` (may be null) must outlive it.
class GalleryDirectory {
 public:
  GalleryDirectory(std::string dir, absl::Duration rescan_period, kernels::DataType storage_dtype,
                   GalleryStore* store, ServerMetrics* metrics);
  // Stops the rescans (waits for a running one).
  ~GalleryDirectory();
  GalleryDirectory(const GalleryDirectory&) = delete;
  GalleryDirectory& operator=(const GalleryDirectory&) = delete;

  // What one scan did.
  struct ScanResult {
    int loaded = 0;   // new or changed files now served
    int removed = 0;  // galleries whose file went away
    int failed = 0;   // files that could not be loaded
    int served = 0;   // directory galleries served after the scan
  };
  // Scans the directory now, on the calling thread (loading is heavy: not a gRPC thread).
  ScanResult Scan() ABSL_LOCKS_EXCLUDED(scan_mu_);
  // Starts rescanning every rescan_period on a background thread.
  void StartWatching() ABSL_LOCKS_EXCLUDED(watch_mu_);

 private:
  // A file as last seen: reloaded when any of these change.
  struct FileState {
    int64_t mtime_ns = 0;
    int64_t size = 0;
    int64_t inode = 0;
    bool operator==(const FileState&) const = default;
  };
  absl::Status Load(const std::string& name, const std::string& path);
  void Rescan() ABSL_LOCKS_EXCLUDED(scan_mu_);

  const std::string dir_;
  const absl::Duration rescan_period_;
  const kernels::DataType storage_dtype_;
  GalleryStore* const store_;
  ServerMetrics* const metrics_;
  Mutex scan_mu_;                                                    // one scan at a time
  std::map<std::string, FileState> seen_ ABSL_GUARDED_BY(scan_mu_);  // by gallery name
  Mutex watch_mu_;
  std::unique_ptr<PeriodicThread> watcher_ ABSL_GUARDED_BY(watch_mu_);
};

}  // namespace simserve

#endif  // SIMSERVE_SERVER_GALLERY_DIR_H_
