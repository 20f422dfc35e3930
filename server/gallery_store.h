// GalleryStore: the server's named galleries (kernels/gallery.h), their versions, sources
// and the memory budget. Uploaded galleries (RegisterGallery) are evicted least recently
// used first when a registration needs room; directory galleries (--gallery_dir) never are.
// A call holds the version it looked up (shared_ptr) until it ends, so replacing or deleting
// a gallery never disturbs running calls.
#ifndef SIMSERVE_SERVER_GALLERY_STORE_H_
#define SIMSERVE_SERVER_GALLERY_STORE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "kernels/gallery.h"
#include "server/metrics.h"
#include "server/mutex.h"

namespace simserve {

enum class GallerySource { kUploaded, kDirectory };

// One version of a gallery. Immutable once stored, except the last-used time.
struct Gallery {
  std::string name;
  std::vector<int64_t> shape;                             // as registered: [M, D] or [batch, M, D]
  kernels::DataType dtype = kernels::DataType::kFloat32;  // of the registered bytes
  GallerySource source = GallerySource::kUploaded;
  std::string path;  // kDirectory: the file
  absl::Time registered;
  absl::Duration prepare_time;
  std::unique_ptr<const kernels::PreparedGallery> prepared;
  int64_t version = 0;  // set by GalleryStore::Put
  mutable std::atomic<int64_t> last_used_unix_ms{0};

  int64_t bytes() const { return prepared->bytes(); }
  bool two_d() const { return shape.size() == 2; }
};

// Checks a gallery name: [A-Za-z0-9._-]{1,128}. INVALID_ARGUMENT otherwise.
absl::Status ValidateGalleryName(absl::string_view name);

// A validated description of a gallery to be built (from a RegisterGallery header or a
// .npy file): the one place that derives its sizes.
struct GallerySpec {
  std::string name;
  std::vector<int64_t> shape;  // [M, D] or [batch, M, D]
  kernels::GalleryShape dims;
  kernels::DataType dtype = kernels::DataType::kFloat32;          // of the raw bytes
  kernels::DataType storage_dtype = kernels::DataType::kFloat32;  // kept on the server
  int64_t input_bytes = 0;                                        // prod(shape) * sizeof(dtype)
  int64_t prepared_bytes = 0;  // what the prepared gallery holds (GalleryInfo.bytes)
};

// Checks name, rank (2 or 3) and positive dimensions, and derives the sizes.
// INVALID_ARGUMENT naming the problem.
absl::StatusOr<GallerySpec> MakeGallerySpec(absl::string_view name,
                                            const std::vector<int64_t>& shape,
                                            kernels::DataType dtype,
                                            kernels::DataType storage_dtype);

// Builds a gallery: `fill` writes the spec.input_bytes raw bytes into the span it is given,
// then they are checked for NaN/Inf (INVALID_ARGUMENT naming the flat index) and prepared
// (kernels::GalleryBuilder) with `threads` OpenMP threads (0: the thread's default). Heavy:
// call it on the compute pool or a loader thread, never on a gRPC thread.
absl::StatusOr<std::unique_ptr<Gallery>> BuildGallery(
    const GallerySpec& spec, GallerySource source, std::string path, int threads,
    const std::function<absl::Status(std::span<std::byte>)>& fill);

// The second half of BuildGallery for a caller that filled `builder` (created for `spec`)
// itself: the NaN/Inf check, the preparation and the Gallery. `started` is when the work on
// it began (Gallery::prepare_time counts from there).
absl::StatusOr<std::unique_ptr<Gallery>> FinishGallery(
    const GallerySpec& spec, std::unique_ptr<kernels::GalleryBuilder> builder, GallerySource source,
    std::string path, int threads, absl::Time started);

// Thread-safe.
class GalleryStore {
 public:
  // `metrics` may be null; otherwise it must outlive the store.
  GalleryStore(int64_t memory_budget, ServerMetrics* metrics);

  // The current version of `name` for a compute call (counted as a lookup hit or miss).
  // NOT_FOUND naming it when unknown; FAILED_PRECONDITION when `version` is not 0 and not
  // the current version; INVALID_ARGUMENT for a negative version.
  absl::StatusOr<std::shared_ptr<const Gallery>> Acquire(absl::string_view name, int64_t version);

  // Records that an admitted call uses `gallery` (its last-used time, for LRU eviction).
  static void MarkUsed(const Gallery& gallery);

  // Whether a gallery of `bytes` prepared bytes could be stored under `name` from `source`
  // (checked before its data is received). FAILED_PRECONDITION when an upload names a
  // directory gallery; RESOURCE_EXHAUSTED with the numbers when it exceeds the budget even
  // with every uploaded gallery evicted.
  absl::Status CheckRoom(absl::string_view name, GallerySource source, int64_t bytes) const;

  // Stores `gallery` under its name with the next version, replacing the current one
  // atomically and evicting least recently used uploaded galleries to fit. Errors as
  // CheckRoom (nothing is evicted then). Returns the stored version.
  absl::StatusOr<std::shared_ptr<const Gallery>> Put(std::unique_ptr<Gallery> gallery);

  // Removes `name`. NOT_FOUND when unknown; FAILED_PRECONDITION for a directory gallery
  // unless `source` is kDirectory (the directory loader removing it). The loader removes
  // only directory galleries (NOT_FOUND for an uploaded one of the same name).
  absl::StatusOr<std::shared_ptr<const Gallery>> Remove(absl::string_view name,
                                                        GallerySource source);

  // The current version of `name` (no last-used update), or NOT_FOUND.
  absl::StatusOr<std::shared_ptr<const Gallery>> Get(absl::string_view name) const;
  // All galleries, sorted by name.
  std::vector<std::shared_ptr<const Gallery>> List() const;
  // Bytes held by stored galleries.
  int64_t held_bytes() const;
  int64_t memory_budget() const { return memory_budget_; }

 private:
  absl::Status CheckRoomLocked(absl::string_view name, GallerySource source, int64_t bytes) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void UpdateMetricsLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int64_t memory_budget_;
  ServerMetrics* const metrics_;
  mutable Mutex mu_;
  std::map<std::string, std::shared_ptr<const Gallery>, std::less<>> galleries_
      ABSL_GUARDED_BY(mu_);
  // Last version handed out per name, kept across deletes so versions never repeat.
  std::map<std::string, int64_t, std::less<>> versions_ ABSL_GUARDED_BY(mu_);
};

}  // namespace simserve

#endif  // SIMSERVE_SERVER_GALLERY_STORE_H_
