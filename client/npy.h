// A small, strict reader and writer for NumPy .npy files (format versions 1.0, 2.0, 3.0),
// enough for simserve-cli: float16/float32/float64/int32 arrays in C order.
#ifndef SIMSERVE_CLIENT_NPY_H_
#define SIMSERVE_CLIENT_NPY_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "client/dtype.h"

namespace simserve::npy {

// Element types this module understands (numpy descr '<f2', '<f4', '<f8', '<i4').
enum class DType { kFloat16, kFloat32, kFloat64, kInt32 };

// Bytes per element of `dtype`.
size_t SizeOf(DType dtype);
// The numpy name ("float16", "float32", "float64", "int32").
const char* Name(DType dtype);

// An array in C order with little-endian elements (big-endian files are byte-swapped on read).
struct Array {
  std::vector<int64_t> shape;  // empty for a 0-d array
  DType dtype = DType::kFloat32;
  ByteVector data;  // prod(shape) * SizeOf(dtype) bytes

  // prod(shape) (1 for a 0-d array).
  int64_t element_count() const;
};

// Where the array sits in an .npy file image, from its header.
struct Layout {
  std::vector<int64_t> shape;
  DType dtype = DType::kFloat32;
  bool big_endian = false;  // elements must be byte-swapped to be used here
  size_t data_offset = 0;   // bytes from the start of the file to the first element
  size_t data_size = 0;     // prod(shape) * SizeOf(dtype)
};

// Parses and checks the header of an .npy file image (errors as Parse) without copying.
absl::StatusOr<Layout> ParseLayout(std::span<const std::byte> file_bytes);

// Parses a whole .npy file image. Returns INVALID_ARGUMENT naming the problem for a bad
// magic, an unparsable header, an unsupported dtype, Fortran order, or a data length that
// does not match the shape.
absl::StatusOr<Array> Parse(std::span<const std::byte> file_bytes);

// Reads and parses `path`. NOT_FOUND / PERMISSION_DENIED / UNKNOWN for I/O errors (the
// message names the file); otherwise as Parse.
absl::StatusOr<Array> ReadFile(const std::string& path);

// A read-only memory mapping of an .npy file: the array bytes are used in place, without
// reading them into a buffer (simserve-cli sends float32 inputs straight from the page
// cache). Move-only; unmaps on destruction.
class MappedFile {
 public:
  // Maps `path` and parses its header. Errors as ReadFile.
  static absl::StatusOr<MappedFile> Open(const std::string& path);
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();

  const Layout& layout() const { return layout_; }
  // The whole file and the array's element bytes (as stored: check layout().big_endian).
  std::span<const std::byte> bytes() const;
  std::span<const std::byte> data() const;

 private:
  MappedFile() = default;
  void Unmap();

  void* base_ = nullptr;
  size_t size_ = 0;
  Layout layout_;
};

// A new .npy file (version 1.0, or 2.0 for a huge header) of a given shape and dtype,
// memory-mapped for writing: Create() writes the header and reserves the payload on disk,
// the caller fills data() in place — e.g. as the destination of a simserve::OutputRef, so
// that received results go straight into the page cache with no extra buffer or write()
// copy — and Close() unmaps and closes it. Move-only; the destructor closes too (errors
// ignored). The file is complete only after data() is fully written.
class MappedOutputFile {
 public:
  // Creates (or truncates) `path`. INVALID_ARGUMENT for a bad shape, UNKNOWN / NOT_FOUND /
  // PERMISSION_DENIED naming the file for I/O errors, including no space for the payload.
  static absl::StatusOr<MappedOutputFile> Create(const std::string& path,
                                                 std::span<const int64_t> shape, DType dtype);
  MappedOutputFile(MappedOutputFile&& other) noexcept;
  MappedOutputFile& operator=(MappedOutputFile&& other) noexcept;
  MappedOutputFile(const MappedOutputFile&) = delete;
  MappedOutputFile& operator=(const MappedOutputFile&) = delete;
  ~MappedOutputFile();

  // The array's element bytes (prod(shape) * SizeOf(dtype)), writable until Close().
  std::span<std::byte> data() const;
  // Unmaps and closes the file. UNKNOWN naming the file on failure.
  absl::Status Close();

 private:
  MappedOutputFile() = default;

  std::string path_;
  int fd_ = -1;
  void* base_ = nullptr;
  size_t size_ = 0;
  size_t data_offset_ = 0;
};

// Converts a floating-point array to float32 values (float16/float64 are converted,
// float32 is copied). INVALID_ARGUMENT for int32.
absl::StatusOr<std::vector<float>> ToFloat32(const Array& array);

// Serialises a version 1.0 .npy image (version 2.0 if the header does not fit in 64 KiB).
// `data` must hold prod(shape) * SizeOf(dtype) little-endian bytes (INVALID_ARGUMENT
// otherwise).
absl::StatusOr<std::string> Serialize(std::span<const int64_t> shape, DType dtype,
                                      std::span<const std::byte> data);

// Writes an .npy file at `path` (created or truncated). Errors as Serialize, or UNKNOWN
// naming the file for I/O errors.
absl::Status WriteFile(const std::string& path, std::span<const int64_t> shape, DType dtype,
                       std::span<const std::byte> data);

}  // namespace simserve::npy

#endif  // SIMSERVE_CLIENT_NPY_H_
