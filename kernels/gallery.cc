// Gallery preparation: unit rows in the storage dtype plus float32 norms (gallery.h).
#include "kernels/gallery.h"

#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <new>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/row_ops.h"

namespace simserve::kernels {
namespace {

struct FreeDeleter {
  void operator()(std::byte* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<std::byte, FreeDeleter>;

// Uninitialised (pages are touched only when written). Big buffers are 2 MiB aligned and
// asked to use transparent huge pages: a query streams the whole gallery, and with 4 KiB
// pages every page costs a TLB miss and stops the hardware prefetcher at its boundary.
Buffer Allocate(size_t bytes) {
  constexpr size_t kHuge = size_t{2} << 20;
  if (bytes < kHuge) {
    return Buffer(static_cast<std::byte*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64)));
  }
  const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
  Buffer buffer(static_cast<std::byte*>(std::aligned_alloc(kHuge, rounded)));
#if defined(MADV_HUGEPAGE)
  if (buffer != nullptr) madvise(buffer.get(), rounded, MADV_HUGEPAGE);  // advice only
#endif
  return buffer;
}

// Rows prepared per step of Build: bounds the float32 scratch of FLOAT16 storage.
constexpr int64_t kBuildChunkRows = 4096;

}  // namespace

struct PreparedGallery::Storage {
  Buffer input;  // raw rows; becomes `rows` when prepared in place
  size_t input_bytes = 0;
  Buffer rows;  // unit rows in the storage dtype (null until Build, unless in place)
  size_t rows_bytes = 0;
  std::vector<float> norms;
  std::vector<float> sq_norms;
};

PreparedGallery::PreparedGallery(const GalleryShape& shape, DataType storage_dtype,
                                 std::unique_ptr<Storage> storage)
    : shape_(shape), storage_dtype_(storage_dtype), storage_(std::move(storage)) {}
PreparedGallery::~PreparedGallery() = default;

const std::byte* PreparedGallery::unit_rows(int64_t entry) const {
  return storage_->rows.get() + entry * shape_.m * shape_.d * SizeOf(storage_dtype_);
}
const float* PreparedGallery::norms(int64_t entry) const {
  return storage_->norms.data() + entry * shape_.m;
}
const float* PreparedGallery::sq_norms(int64_t entry) const {
  return storage_->sq_norms.data() + entry * shape_.m;
}
int64_t PreparedGallery::bytes() const { return BytesFor(shape_, storage_dtype_); }

int64_t PreparedGallery::BytesFor(const GalleryShape& shape, DataType storage) {
  return shape.rows() * shape.d * static_cast<int64_t>(SizeOf(storage)) +
         shape.rows() * 8 /* norm and squared norm */ +
         static_cast<int64_t>(sizeof(Storage) + sizeof(PreparedGallery));
}

absl::StatusOr<std::unique_ptr<GalleryBuilder>> GalleryBuilder::Create(const GalleryShape& shape,
                                                                       DataType input_dtype,
                                                                       DataType storage_dtype) {
  if (shape.entries <= 0 || shape.m <= 0 || shape.d <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("gallery dimensions must be positive, got [",
                                                   shape.entries, ", ", shape.m, ", ", shape.d,
                                                   "]"));
  }
  if (shape.m > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(
        absl::StrCat("a gallery holds at most 2^31-1 rows per batch entry, got ", shape.m));
  }
  int64_t elements = 0;
  if (__builtin_mul_overflow(shape.rows(), shape.d, &elements) || elements > (int64_t{1} << 40)) {
    return absl::InvalidArgumentError("gallery shape is too large");
  }
  auto builder = std::unique_ptr<GalleryBuilder>(new GalleryBuilder());
  builder->shape_ = shape;
  builder->input_dtype_ = input_dtype;
  builder->storage_dtype_ = storage_dtype;
  builder->storage_ = std::make_unique<PreparedGallery::Storage>();
  auto& storage = *builder->storage_;
  storage.input_bytes = static_cast<size_t>(elements) * SizeOf(input_dtype);
  storage.input = Allocate(storage.input_bytes);
  if (storage.input == nullptr) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot allocate ", storage.input_bytes, " bytes for the gallery"));
  }
  return builder;
}

GalleryBuilder::~GalleryBuilder() = default;

std::span<std::byte> GalleryBuilder::input() {
  return {storage_->input.get(), storage_->input_bytes};
}

int64_t GalleryBuilder::PeakBytes() const {
  const bool in_place = SizeOf(input_dtype_) == SizeOf(storage_dtype_);
  return static_cast<int64_t>(storage_->input_bytes) +
         (in_place ? shape_.rows() * 8 : PreparedGallery::BytesFor(shape_, storage_dtype_));
}

absl::StatusOr<std::unique_ptr<PreparedGallery>> GalleryBuilder::Build(int threads) {
  if (built_) return absl::FailedPreconditionError("GalleryBuilder::Build called twice");
  built_ = true;
  if (threads > 0) omp_set_num_threads(threads);
  auto& storage = *storage_;
  const RowOps& ops = BestRowOps();
  const int64_t rows = shape_.rows();
  const int64_t d = shape_.d;
  const ConstTensorView input{storage.input.get(), input_dtype_};
  try {
    storage.norms.resize(rows);
    storage.sq_norms.resize(rows);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("cannot allocate the gallery's norms");
  }
  ops.row_norms(input, rows, d, storage.norms.data());
  ops.squared_norms(input, rows, d, storage.sq_norms.data());

  const size_t in_size = SizeOf(input_dtype_);
  const size_t out_size = SizeOf(storage_dtype_);
  const bool in_place = in_size == out_size;
  std::byte* out = storage.input.get();
  if (!in_place) {
    storage.rows_bytes = static_cast<size_t>(rows * d) * out_size;
    storage.rows = Allocate(storage.rows_bytes);
    if (storage.rows == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cannot allocate ", storage.rows_bytes, " bytes for the gallery"));
    }
    out = storage.rows.get();
  }
  // FLOAT16 storage goes through float32 scratch (prepare_rows writes float32 or bf16).
  std::vector<float> scratch;
  if (storage_dtype_ == DataType::kFloat16) scratch.resize(std::min(rows, kBuildChunkRows) * d);
  for (int64_t begin = 0; begin < rows; begin += kBuildChunkRows) {
    const int64_t count = std::min(kBuildChunkRows, rows - begin);
    const ConstTensorView src{storage.input.get() + begin * d * in_size, input_dtype_};
    std::byte* dst = out + begin * d * out_size;
    // In place is safe: each row is read whole (its norm) before any element is written, and
    // element c is read before it is written at the same address.
    if (storage_dtype_ == DataType::kFloat16) {
      ops.prepare_rows(src, count, d, RowScaling::kUnitLength, 0.0F, false, scratch.data(),
                       nullptr);
      ops.convert_floats(scratch.data(), count * d, DataType::kFloat16, dst);
    } else {
      ops.prepare_rows(src, count, d, RowScaling::kUnitLength, 0.0F,
                       storage_dtype_ == DataType::kBFloat16, dst, nullptr);
    }
  }
  if (in_place) {
    storage.rows = std::move(storage.input);
    storage.rows_bytes = storage.input_bytes;
  } else {
    storage.input.reset();
  }
  storage.input_bytes = 0;
  return std::unique_ptr<PreparedGallery>(
      new PreparedGallery(shape_, storage_dtype_, std::move(storage_)));
}

}  // namespace simserve::kernels
