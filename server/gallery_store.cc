// GalleryStore: named galleries, versions, LRU eviction of uploaded ones within a budget.
#include "server/gallery_store.h"

#include <algorithm>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/convert.h"
#include "server/log.h"

namespace simserve {
namespace {

bool NameCharOk(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == '-';
}

int64_t NowUnixMs() { return absl::ToUnixMillis(absl::Now()); }

absl::Status NotFound(absl::string_view name) {
  return absl::NotFoundError(absl::StrCat("no gallery named '", name,
                                          "' on this server (register it with RegisterGallery, "
                                          "or check ListGalleries)"));
}

}  // namespace

absl::Status ValidateGalleryName(absl::string_view name) {
  if (name.empty() || name.size() > 128 || !std::all_of(name.begin(), name.end(), NameCharOk)) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad gallery name '", name.substr(0, 140),
                     "': use 1 to 128 characters of A-Z, a-z, 0-9, '.', '_' and '-'"));
  }
  return absl::OkStatus();
}

absl::StatusOr<GallerySpec> MakeGallerySpec(absl::string_view name,
                                            const std::vector<int64_t>& shape,
                                            kernels::DataType dtype,
                                            kernels::DataType storage_dtype) {
  if (absl::Status status = ValidateGalleryName(name); !status.ok()) return status;
  if (shape.size() != 2 && shape.size() != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat("gallery '", name, "' has rank ", shape.size(),
                     "; expected [M, D] (compared with every batch entry of A) or [batch, M, D]"));
  }
  for (const int64_t dim : shape) {
    if (dim <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("gallery '", name, "' has a dimension ", dim,
                                                     "; every dimension must be positive"));
    }
  }
  GallerySpec spec;
  spec.name = std::string(name);
  spec.shape = shape;
  spec.dtype = dtype;
  spec.storage_dtype = storage_dtype;
  const size_t off = shape.size() == 3 ? 1 : 0;
  spec.dims = {.entries = shape.size() == 3 ? shape[0] : 1, .m = shape[off], .d = shape[off + 1]};
  int64_t rows = 0;  // GalleryShape::rows() would overflow first
  int64_t elements = 0;
  constexpr int64_t kMaxElements = int64_t{1} << 40;
  if (__builtin_mul_overflow(spec.dims.entries, spec.dims.m, &rows) ||
      __builtin_mul_overflow(rows, spec.dims.d, &elements) || elements > kMaxElements) {
    return absl::InvalidArgumentError(
        absl::StrCat("gallery '", name, "' is too large (more than 2^40 elements)"));
  }
  if (spec.dims.m > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat("gallery '", name, "' has ", spec.dims.m,
                                                   " rows; at most 2^31-1 (int32 top-k indices)"));
  }
  spec.input_bytes = elements * static_cast<int64_t>(kernels::SizeOf(dtype));
  spec.prepared_bytes = kernels::PreparedGallery::BytesFor(spec.dims, storage_dtype);
  return spec;
}

absl::StatusOr<std::unique_ptr<Gallery>> FinishGallery(
    const GallerySpec& spec, std::unique_ptr<kernels::GalleryBuilder> builder, GallerySource source,
    std::string path, int threads, absl::Time started) {
  const std::span<std::byte> input = builder->input();
  const int64_t elements = spec.dims.rows() * spec.dims.d;
  if (absl::Status finite = CheckFinite(absl::StrCat("gallery '", spec.name, "'"), input.data(),
                                        elements, spec.dtype, 0, threads);
      !finite.ok()) {
    return finite;
  }
  auto prepared = builder->Build(threads);
  if (!prepared.ok()) return prepared.status();
  auto gallery = std::make_unique<Gallery>();
  gallery->name = spec.name;
  gallery->shape = spec.shape;
  gallery->dtype = spec.dtype;
  gallery->source = source;
  gallery->path = std::move(path);
  gallery->registered = absl::Now();
  gallery->prepare_time = gallery->registered - started;
  gallery->prepared = *std::move(prepared);
  return gallery;
}

absl::StatusOr<std::unique_ptr<Gallery>> BuildGallery(
    const GallerySpec& spec, GallerySource source, std::string path, int threads,
    const std::function<absl::Status(std::span<std::byte>)>& fill) {
  const absl::Time started = absl::Now();
  auto builder = kernels::GalleryBuilder::Create(spec.dims, spec.dtype, spec.storage_dtype);
  if (!builder.ok()) return builder.status();
  if (absl::Status filled = fill((*builder)->input()); !filled.ok()) return filled;
  return FinishGallery(spec, *std::move(builder), source, std::move(path), threads, started);
}

GalleryStore::GalleryStore(int64_t memory_budget, ServerMetrics* metrics)
    : memory_budget_(memory_budget), metrics_(metrics) {
  MutexLock lock(&mu_);
  UpdateMetricsLocked();
}

absl::StatusOr<std::shared_ptr<const Gallery>> GalleryStore::Acquire(absl::string_view name,
                                                                     int64_t version) {
  if (version < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("gallery_version must be 0 (current) or a version >= 1, got ", version));
  }
  std::shared_ptr<const Gallery> gallery;
  {
    MutexLock lock(&mu_);
    auto it = galleries_.find(name);
    if (it != galleries_.end()) gallery = it->second;
  }
  if (metrics_ != nullptr) metrics_->GalleryLookup(gallery != nullptr);
  if (gallery == nullptr) return NotFound(name);
  if (version != 0 && version != gallery->version) {
    return absl::FailedPreconditionError(absl::StrCat("gallery '", name, "' is at version ",
                                                      gallery->version,
                                                      ", the call asked for version ", version));
  }
  return gallery;
}

void GalleryStore::MarkUsed(const Gallery& gallery) {
  gallery.last_used_unix_ms.store(NowUnixMs(), std::memory_order_relaxed);
}

absl::Status GalleryStore::CheckRoom(absl::string_view name, GallerySource source,
                                     int64_t bytes) const {
  MutexLock lock(&mu_);
  return CheckRoomLocked(name, source, bytes);
}

absl::Status GalleryStore::CheckRoomLocked(absl::string_view name, GallerySource source,
                                           int64_t bytes) const {
  int64_t directory_bytes = 0;
  int64_t uploaded_bytes = 0;
  for (const auto& [other, gallery] : galleries_) {
    if (other == name) {
      if (gallery->source == GallerySource::kDirectory && source == GallerySource::kUploaded) {
        return absl::FailedPreconditionError(
            absl::StrCat("gallery '", name,
                         "' is loaded from the server's gallery directory and cannot be "
                         "replaced over RPC; pick another name"));
      }
      continue;  // it is being replaced: its bytes are freed (once running calls end)
    }
    (gallery->source == GallerySource::kDirectory ? directory_bytes : uploaded_bytes) +=
        gallery->bytes();
  }
  if (directory_bytes + bytes > memory_budget_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "gallery '", name, "' needs ", bytes, " bytes but the gallery memory budget is ",
        memory_budget_, " bytes, of which directory galleries hold ", directory_bytes,
        " and uploaded galleries ", uploaded_bytes,
        " (evictable); raise --gallery_memory_bytes or use a smaller storage_dtype"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<const Gallery>> GalleryStore::Put(std::unique_ptr<Gallery> gallery) {
  const int64_t bytes = gallery->bytes();
  std::vector<std::string> evicted;
  std::shared_ptr<const Gallery> stored;
  {
    MutexLock lock(&mu_);
    if (absl::Status room = CheckRoomLocked(gallery->name, gallery->source, bytes); !room.ok()) {
      return room;
    }
    int64_t held = 0;
    for (const auto& [other, g] : galleries_) {
      if (other != gallery->name) held += g->bytes();
    }
    while (held + bytes > memory_budget_) {  // CheckRoom guarantees the uploaded ones suffice
      auto lru = galleries_.end();
      for (auto it = galleries_.begin(); it != galleries_.end(); ++it) {
        if (it->second->source != GallerySource::kUploaded || it->first == gallery->name) continue;
        if (lru == galleries_.end() ||
            it->second->last_used_unix_ms.load() < lru->second->last_used_unix_ms.load()) {
          lru = it;
        }
      }
      held -= lru->second->bytes();
      evicted.push_back(lru->first);
      galleries_.erase(lru);
    }
    gallery->version = ++versions_[gallery->name];
    gallery->last_used_unix_ms.store(NowUnixMs());
    stored = std::shared_ptr<const Gallery>(std::move(gallery));
    galleries_[stored->name] = stored;
    UpdateMetricsLocked();
  }
  for (const std::string& name : evicted) {
    if (metrics_ != nullptr) metrics_->GalleryEvicted();
    LogInfo(absl::StrCat("gallery '", name, "' evicted (least recently used) to make room for '",
                         stored->name, "'"));
  }
  return stored;
}

absl::StatusOr<std::shared_ptr<const Gallery>> GalleryStore::Remove(absl::string_view name,
                                                                    GallerySource source) {
  MutexLock lock(&mu_);
  auto it = galleries_.find(name);
  if (it == galleries_.end()) return NotFound(name);
  if (it->second->source != source && source == GallerySource::kDirectory) {
    return NotFound(name);  // the directory loader never removes an uploaded gallery
  }
  if (it->second->source == GallerySource::kDirectory && source != GallerySource::kDirectory) {
    return absl::FailedPreconditionError(
        absl::StrCat("gallery '", name,
                     "' is loaded from the server's gallery directory; remove its file "
                     "there instead of deleting it over RPC"));
  }
  std::shared_ptr<const Gallery> removed = std::move(it->second);
  galleries_.erase(it);
  UpdateMetricsLocked();
  return removed;
}

absl::StatusOr<std::shared_ptr<const Gallery>> GalleryStore::Get(absl::string_view name) const {
  MutexLock lock(&mu_);
  auto it = galleries_.find(name);
  if (it == galleries_.end()) return NotFound(name);
  return it->second;
}

std::vector<std::shared_ptr<const Gallery>> GalleryStore::List() const {
  MutexLock lock(&mu_);
  std::vector<std::shared_ptr<const Gallery>> all;
  all.reserve(galleries_.size());
  for (const auto& [name, gallery] : galleries_) all.push_back(gallery);
  return all;
}

int64_t GalleryStore::held_bytes() const {
  MutexLock lock(&mu_);
  int64_t held = 0;
  for (const auto& [name, gallery] : galleries_) held += gallery->bytes();
  return held;
}

void GalleryStore::UpdateMetricsLocked() const {
  if (metrics_ == nullptr) return;
  int64_t count[2] = {0, 0};
  int64_t bytes[2] = {0, 0};
  for (const auto& [name, gallery] : galleries_) {
    const int i = gallery->source == GallerySource::kDirectory ? 1 : 0;
    ++count[i];
    bytes[i] += gallery->bytes();
  }
  metrics_->SetGalleries(false, count[0], bytes[0]);
  metrics_->SetGalleries(true, count[1], bytes[1]);
}

}  // namespace simserve
