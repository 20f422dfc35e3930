// A gallery: a B operand prepared once and used by many calls (SimilarityEngine::Prepare
// with a PreparedGallery instead of B's bytes). Plain C++; knows nothing of gRPC.
//
// What is kept, per row of B: the unit row (B / ||B||, norms accumulated in double, so tiny
// and huge rows are exact; a zero row stays zero) in the storage dtype, plus its L2 norm and
// squared norm as float32. Every metric reads these: cosine uses the unit rows as they are,
// dot rescales each column of the product by ||b||, the distances add ||b||^2, and the Keras
// epsilon clamp scales by min(1, ||b|| / sqrt(epsilon)). Memory: rows * d * sizeof(storage)
// + 8 bytes per row, i.e. 1.0x the float32 bytes for FLOAT32 storage, 0.5x for BFLOAT16 and
// FLOAT16.
#ifndef SIMSERVE_KERNELS_GALLERY_H_
#define SIMSERVE_KERNELS_GALLERY_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "absl/status/statusor.h"
#include "kernels/dtype.h"

namespace simserve::kernels {

// Dimensions of a gallery: `entries` batch entries (1 for a 2D gallery) of m rows of d.
struct GalleryShape {
  int64_t entries = 1;
  int64_t m = 1;
  int64_t d = 1;
  int64_t rows() const { return entries * m; }
};

// Immutable once built; thread-safe for any number of readers.
class PreparedGallery {
 public:
  ~PreparedGallery();
  PreparedGallery(const PreparedGallery&) = delete;
  PreparedGallery& operator=(const PreparedGallery&) = delete;

  const GalleryShape& shape() const { return shape_; }
  DataType storage_dtype() const { return storage_dtype_; }
  // Unit rows of batch entry `entry`: m * d elements of storage_dtype, C order.
  const std::byte* unit_rows(int64_t entry) const;
  // Per row of entry `entry`: ||b|| and ||b||^2 (m floats each).
  const float* norms(int64_t entry) const;
  const float* sq_norms(int64_t entry) const;
  // Heap bytes held (rows, norms, bookkeeping): BytesFor(shape(), storage_dtype()).
  int64_t bytes() const;
  // What a gallery of `shape` stored as `storage` holds, known before it is built: the one
  // definition of a gallery's memory.
  static int64_t BytesFor(const GalleryShape& shape, DataType storage);

 private:
  friend class GalleryBuilder;
  struct Storage;
  PreparedGallery(const GalleryShape& shape, DataType storage_dtype,
                  std::unique_ptr<Storage> storage);
  const GalleryShape shape_;
  const DataType storage_dtype_;
  std::unique_ptr<Storage> storage_;
};

// Builds a PreparedGallery from raw rows: the caller writes them into input(), then Build
// prepares them. When the input and storage element sizes are equal the rows are prepared
// in place (peak memory 1x the gallery), otherwise into a second buffer (peak 1.5x).
// Not thread-safe; Build runs on the calling thread's OpenMP team.
class GalleryBuilder {
 public:
  // INVALID_ARGUMENT for non-positive dims or more than 2^31 rows per entry (top-k indices
  // are int32); RESOURCE_EXHAUSTED when the buffers cannot be allocated.
  static absl::StatusOr<std::unique_ptr<GalleryBuilder>> Create(const GalleryShape& shape,
                                                                DataType input_dtype,
                                                                DataType storage_dtype);
  ~GalleryBuilder();
  GalleryBuilder(const GalleryBuilder&) = delete;
  GalleryBuilder& operator=(const GalleryBuilder&) = delete;

  // Where the raw rows go: shape.rows() * d elements of input_dtype, little-endian C order.
  // The caller checks them (finite values) before Build.
  std::span<std::byte> input();
  // The most bytes the builder holds until Build returns (the input, plus the prepared rows
  // when they cannot be built in place, plus the norms), for memory accounting.
  int64_t PeakBytes() const;
  // Prepares the rows with `threads` OpenMP threads (0: the calling thread's default).
  // Consumes the builder; call once.
  absl::StatusOr<std::unique_ptr<PreparedGallery>> Build(int threads = 0);

 private:
  GalleryBuilder() = default;
  GalleryShape shape_;
  DataType input_dtype_ = DataType::kFloat32;
  DataType storage_dtype_ = DataType::kFloat32;
  std::unique_ptr<PreparedGallery::Storage> storage_;
  bool built_ = false;
};

}  // namespace simserve::kernels

#endif  // SIMSERVE_KERNELS_GALLERY_H_
