// .npy parsing: the header is a Python dict literal, parsed here by a tiny tokenizer that
// accepts exactly what numpy writes (and older variants: double quotes, "3L" dims).
#include "client/npy.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"

namespace simserve::npy {
namespace {

constexpr absl::string_view kMagic = "\x93NUMPY";

// The three entries of a .npy header dict.
struct Header {
  std::string descr;
  bool fortran_order = false;
  std::vector<int64_t> shape;
  bool has_descr = false;
  bool has_order = false;
  bool has_shape = false;
};

// Recursive-descent parser over the header text.
class HeaderParser {
 public:
  explicit HeaderParser(absl::string_view text) : text_(text) {}

  absl::StatusOr<Header> Parse() {
    Header header;
    SkipSpace();
    if (!Consume('{')) return Error("expected '{'");
    while (true) {
      SkipSpace();
      if (Consume('}')) break;
      auto key = ParseString();
      if (!key.ok()) return key.status();
      SkipSpace();
      if (!Consume(':')) return Error("expected ':' after key");
      SkipSpace();
      if (*key == "descr") {
        auto descr = ParseString();
        if (!descr.ok()) return descr.status();
        header.descr = *descr;
        header.has_descr = true;
      } else if (*key == "fortran_order") {
        if (ConsumeWord("True")) {
          header.fortran_order = true;
        } else if (ConsumeWord("False")) {
          header.fortran_order = false;
        } else {
          return Error("fortran_order must be True or False");
        }
        header.has_order = true;
      } else if (*key == "shape") {
        auto shape = ParseTuple();
        if (!shape.ok()) return shape.status();
        header.shape = *std::move(shape);
        header.has_shape = true;
      } else {
        return Error(absl::StrCat("unexpected key '", *key, "'"));
      }
      SkipSpace();
      if (Consume(',')) continue;
      SkipSpace();
      if (Consume('}')) break;
      return Error("expected ',' or '}'");
    }
    if (!header.has_descr || !header.has_order || !header.has_shape) {
      return Error("header lacks one of 'descr', 'fortran_order', 'shape'");
    }
    return header;
  }

 private:
  absl::Status Error(absl::string_view what) const {
    return absl::InvalidArgumentError(
        absl::StrCat(".npy header: ", what, " at offset ", pos_, " in \"", text_, "\""));
  }
  void SkipSpace() {
    while (pos_ < text_.size() && absl::ascii_isspace(static_cast<unsigned char>(text_[pos_]))) {
      ++pos_;
    }
  }
  bool Consume(char c) {
    if (pos_ < text_.size() && text_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  bool ConsumeWord(absl::string_view word) {
    if (text_.substr(pos_, word.size()) == word) {
      pos_ += word.size();
      return true;
    }
    return false;
  }
  absl::StatusOr<std::string> ParseString() {
    if (pos_ >= text_.size() || (text_[pos_] != '\'' && text_[pos_] != '"')) {
      return Error("expected a quoted string");
    }
    const char quote = text_[pos_++];
    const size_t end = text_.find(quote, pos_);
    if (end == absl::string_view::npos) return Error("unterminated string");
    std::string value(text_.substr(pos_, end - pos_));
    pos_ = end + 1;
    return value;
  }
  absl::StatusOr<std::vector<int64_t>> ParseTuple() {
    if (!Consume('(')) return Error("shape must be a tuple");
    std::vector<int64_t> dims;
    while (true) {
      SkipSpace();
      if (Consume(')')) break;
      const size_t start = pos_;
      while (pos_ < text_.size() && absl::ascii_isdigit(static_cast<unsigned char>(text_[pos_]))) {
        ++pos_;
      }
      int64_t dim = 0;
      if (pos_ == start || !absl::SimpleAtoi(text_.substr(start, pos_ - start), &dim)) {
        return Error("shape entries must be non-negative integers");
      }
      Consume('L');  // Python 2 long literal
      dims.push_back(dim);
      SkipSpace();
      if (Consume(',')) continue;
      SkipSpace();
      if (Consume(')')) break;
      return Error("expected ',' or ')' in shape");
    }
    return dims;
  }

  absl::string_view text_;
  size_t pos_ = 0;
};

// Maps a descr such as "<f4" to a dtype and whether the data needs a byte swap.
absl::Status ParseDescr(const std::string& descr, DType* dtype, bool* swap) {
  if (descr.size() != 3) {
    return absl::InvalidArgumentError(absl::StrCat("unsupported .npy dtype '", descr,
                                                   "' (need float16, float32, float64 or int32)"));
  }
  const char order = descr[0];
  const absl::string_view kind = absl::string_view(descr).substr(1);
  if (order != '<' && order != '>' && order != '=' && order != '|') {
    return absl::InvalidArgumentError(absl::StrCat("bad byte order in .npy dtype '", descr, "'"));
  }
  if (kind == "f2") {
    *dtype = DType::kFloat16;
  } else if (kind == "f4") {
    *dtype = DType::kFloat32;
  } else if (kind == "f8") {
    *dtype = DType::kFloat64;
  } else if (kind == "i4") {
    *dtype = DType::kInt32;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("unsupported .npy dtype '", descr,
                                                   "' (need float16, float32, float64 or int32)"));
  }
  *swap = order == '>';  // this code only runs on little-endian hosts (x86-64, arm64)
  return absl::OkStatus();
}

void ByteSwap(std::byte* data, size_t count, size_t width) {
  for (size_t i = 0; i < count; ++i) {
    std::reverse(data + i * width, data + (i + 1) * width);
  }
}

const char* Descr(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
      return "<f2";
    case DType::kFloat32:
      return "<f4";
    case DType::kFloat64:
      return "<f8";
    case DType::kInt32:
      return "<i4";
  }
  return "?";
}

// prod(shape) * element size, or an error on overflow.
absl::StatusOr<uint64_t> ByteCount(std::span<const int64_t> shape, DType dtype) {
  uint64_t count = 1;
  for (const int64_t dim : shape) {
    if (dim < 0) return absl::InvalidArgumentError("negative dimension in shape");
    if (dim != 0 && count > (uint64_t{1} << 62) / static_cast<uint64_t>(dim)) {
      return absl::InvalidArgumentError("shape product overflows");
    }
    count *= static_cast<uint64_t>(dim);
  }
  if (count > (uint64_t{1} << 62) / SizeOf(dtype)) {
    return absl::InvalidArgumentError("shape product overflows");
  }
  return count * SizeOf(dtype);
}

// Builds the magic, version, length and padded header dict for `shape` and `dtype`.
std::string BuildHeader(std::span<const int64_t> shape, DType dtype) {
  std::string dims = absl::StrJoin(shape, ", ");
  if (shape.size() == 1) dims += ",";
  std::string dict = absl::StrCat("{'descr': '", Descr(dtype),
                                  "', 'fortran_order': False, 'shape': (", dims, "), }");
  // Total header length (magic + version + length field + dict + '\n') is padded with
  // spaces to a multiple of 64, as numpy does.
  size_t prefix = kMagic.size() + 2 + 2;
  bool v2 = false;
  if (dict.size() + 1 + prefix > 65535) {
    prefix += 2;
    v2 = true;
  }
  const size_t unpadded = prefix + dict.size() + 1;
  dict.append((64 - unpadded % 64) % 64, ' ');
  dict.push_back('\n');
  std::string header(kMagic);
  header.push_back(static_cast<char>(v2 ? 2 : 1));
  header.push_back(0);
  const size_t len = dict.size();
  header.push_back(static_cast<char>(len & 0xFF));
  header.push_back(static_cast<char>((len >> 8) & 0xFF));
  if (v2) {
    header.push_back(static_cast<char>((len >> 16) & 0xFF));
    header.push_back(static_cast<char>((len >> 24) & 0xFF));
  }
  header += dict;
  return header;
}

struct FileCloser {
  void operator()(std::FILE* file) const { std::fclose(file); }
};
using FilePtr = std::unique_ptr<std::FILE, FileCloser>;

absl::Status IoError(const std::string& what, const std::string& path, int err) {
  const std::string message = absl::StrCat(what, " '", path, "': ", std::strerror(err));
  if (err == ENOENT) return absl::NotFoundError(message);
  if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(message);
  return absl::UnknownError(message);
}

}  // namespace

size_t SizeOf(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
      return 2;
    case DType::kFloat32:
    case DType::kInt32:
      return 4;
    case DType::kFloat64:
      return 8;
  }
  return 0;
}

const char* Name(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
      return "float16";
    case DType::kFloat32:
      return "float32";
    case DType::kFloat64:
      return "float64";
    case DType::kInt32:
      return "int32";
  }
  return "?";
}

int64_t Array::element_count() const {
  int64_t count = 1;
  for (const int64_t dim : shape) count *= dim;
  return count;
}

absl::StatusOr<Layout> ParseLayout(std::span<const std::byte> file_bytes) {
  const auto* chars = reinterpret_cast<const char*>(file_bytes.data());
  const absl::string_view file(chars, file_bytes.size());
  if (file.size() < 10 || file.substr(0, kMagic.size()) != kMagic) {
    return absl::InvalidArgumentError("not an .npy file (bad magic)");
  }
  const auto major = static_cast<uint8_t>(file[6]);
  size_t header_len = 0;
  size_t header_start = 0;
  if (major == 1) {
    header_len =
        static_cast<uint8_t>(file[8]) | (static_cast<size_t>(static_cast<uint8_t>(file[9])) << 8);
    header_start = 10;
  } else if (major == 2 || major == 3) {
    if (file.size() < 12) return absl::InvalidArgumentError(".npy file truncated in header");
    for (int i = 3; i >= 0; --i) {
      header_len = (header_len << 8) | static_cast<uint8_t>(file[8 + i]);
    }
    header_start = 12;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("unsupported .npy version ", major));
  }
  if (file.size() - header_start < header_len) {
    return absl::InvalidArgumentError(".npy file truncated in header");
  }
  auto header = HeaderParser(file.substr(header_start, header_len)).Parse();
  if (!header.ok()) return header.status();
  if (header->fortran_order) {
    return absl::InvalidArgumentError(
        ".npy array is in Fortran order; save it C-contiguous (np.ascontiguousarray)");
  }
  Layout layout;
  if (absl::Status s = ParseDescr(header->descr, &layout.dtype, &layout.big_endian); !s.ok()) {
    return s;
  }
  layout.shape = std::move(header->shape);
  auto expected = ByteCount(layout.shape, layout.dtype);
  if (!expected.ok()) return expected.status();
  layout.data_offset = header_start + header_len;
  layout.data_size = *expected;
  const size_t available = file.size() - layout.data_offset;
  if (available != *expected) {
    return absl::InvalidArgumentError(
        absl::StrCat(".npy data holds ", available, " bytes but shape and dtype need ", *expected));
  }
  return layout;
}

absl::StatusOr<Array> Parse(std::span<const std::byte> file_bytes) {
  auto layout = ParseLayout(file_bytes);
  if (!layout.ok()) return layout.status();
  Array array;
  array.shape = std::move(layout->shape);
  array.dtype = layout->dtype;
  const size_t size = layout->data_size;
  array.data.resize(size);
  if (size > 0) std::memcpy(array.data.data(), file_bytes.data() + layout->data_offset, size);
  if (layout->big_endian) {
    ByteSwap(array.data.data(), size / SizeOf(array.dtype), SizeOf(array.dtype));
  }
  return array;
}

absl::StatusOr<Array> ReadFile(const std::string& path) {
  FilePtr file(std::fopen(path.c_str(), "rb"));
  if (file == nullptr) return IoError("cannot open", path, errno);
  if (std::fseek(file.get(), 0, SEEK_END) != 0) return IoError("cannot seek", path, errno);
  const int64_t size = std::ftell(file.get());
  if (size < 0) return IoError("cannot size", path, errno);
  std::rewind(file.get());
  ByteVector bytes(static_cast<size_t>(size));
  if (size > 0 && std::fread(bytes.data(), 1, bytes.size(), file.get()) != bytes.size()) {
    return IoError("cannot read", path, errno != 0 ? errno : EIO);
  }
  auto array = Parse(bytes);
  if (!array.ok()) {
    return absl::Status(array.status().code(), absl::StrCat(path, ": ", array.status().message()));
  }
  return array;
}

absl::StatusOr<std::vector<float>> ToFloat32(const Array& array) {
  const auto count = static_cast<size_t>(array.element_count());
  std::vector<float> out(count);
  switch (array.dtype) {
    case DType::kFloat32:
      if (count > 0) std::memcpy(out.data(), array.data.data(), count * sizeof(float));
      return out;
    case DType::kFloat16:
      HalfToFloat(array.data.data(), count, out.data());
      return out;
    case DType::kFloat64:
      for (size_t i = 0; i < count; ++i) {
        double value = 0;
        std::memcpy(&value, array.data.data() + i * sizeof(double), sizeof(double));
        out[i] = static_cast<float>(value);
      }
      return out;
    case DType::kInt32:
      break;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("cannot convert a ", Name(array.dtype), " array to float32"));
}

absl::StatusOr<std::string> Serialize(std::span<const int64_t> shape, DType dtype,
                                      std::span<const std::byte> data) {
  auto expected = ByteCount(shape, dtype);
  if (!expected.ok()) return expected.status();
  if (data.size() != *expected) {
    return absl::InvalidArgumentError(
        absl::StrCat("data has ", data.size(), " bytes but shape needs ", *expected));
  }
  std::string out = BuildHeader(shape, dtype);
  out.append(reinterpret_cast<const char*>(data.data()), data.size());
  return out;
}

absl::Status WriteFile(const std::string& path, std::span<const int64_t> shape, DType dtype,
                       std::span<const std::byte> data) {
  auto expected = ByteCount(shape, dtype);
  if (!expected.ok()) return expected.status();
  if (data.size() != *expected) {
    return absl::InvalidArgumentError(
        absl::StrCat("data has ", data.size(), " bytes but shape needs ", *expected));
  }
  const std::string header = BuildHeader(shape, dtype);
  FilePtr file(std::fopen(path.c_str(), "wb"));
  if (file == nullptr) return IoError("cannot create", path, errno);
  if (std::fwrite(header.data(), 1, header.size(), file.get()) != header.size() ||
      (!data.empty() && std::fwrite(data.data(), 1, data.size(), file.get()) != data.size())) {
    return IoError("cannot write", path, errno != 0 ? errno : EIO);
  }
  if (std::fclose(file.release()) != 0) return IoError("cannot close", path, errno);
  return absl::OkStatus();
}

absl::StatusOr<MappedFile> MappedFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return IoError("cannot open", path, errno);
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return IoError("cannot stat", path, err);
  }
  MappedFile file;
  file.size_ = static_cast<size_t>(st.st_size);
  if (file.size_ > 0) {
    void* base = ::mmap(nullptr, file.size_, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);
    if (base == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      return IoError("cannot map", path, err);
    }
    file.base_ = base;
  }
  ::close(fd);
  auto layout = ParseLayout(file.bytes());
  if (!layout.ok()) {
    return absl::Status(layout.status().code(),
                        absl::StrCat(path, ": ", layout.status().message()));
  }
  file.layout_ = *std::move(layout);
  return file;
}

MappedFile::MappedFile(MappedFile&& other) noexcept
    : base_(std::exchange(other.base_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      layout_(std::move(other.layout_)) {}

MappedFile& MappedFile::operator=(MappedFile&& other) noexcept {
  if (this != &other) {
    Unmap();
    base_ = std::exchange(other.base_, nullptr);
    size_ = std::exchange(other.size_, 0);
    layout_ = std::move(other.layout_);
  }
  return *this;
}

MappedFile::~MappedFile() { Unmap(); }

void MappedFile::Unmap() {
  if (base_ != nullptr) ::munmap(base_, size_);
  base_ = nullptr;
}

std::span<const std::byte> MappedFile::bytes() const {
  return {static_cast<const std::byte*>(base_), size_};
}

std::span<const std::byte> MappedFile::data() const {
  return bytes().subspan(layout_.data_offset, layout_.data_size);
}

absl::StatusOr<MappedOutputFile> MappedOutputFile::Create(const std::string& path,
                                                          std::span<const int64_t> shape,
                                                          DType dtype) {
  auto data_size = ByteCount(shape, dtype);
  if (!data_size.ok()) return data_size.status();
  const std::string header = BuildHeader(shape, dtype);
  MappedOutputFile file;
  file.path_ = path;
  file.data_offset_ = header.size();
  file.size_ = header.size() + static_cast<size_t>(*data_size);
  file.fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (file.fd_ < 0) return IoError("cannot create", path, errno);
  // Reserve the blocks now: a full disk is an error here, not a SIGBUS while writing.
  if (const int err = ::posix_fallocate(file.fd_, 0, static_cast<off_t>(file.size_)); err != 0) {
    return IoError("cannot allocate space for", path, err);
  }
  void* base = ::mmap(nullptr, file.size_, PROT_READ | PROT_WRITE, MAP_SHARED, file.fd_, 0);
  if (base == MAP_FAILED) return IoError("cannot map", path, errno);
  file.base_ = base;
  std::memcpy(file.base_, header.data(), header.size());
  return file;
}

MappedOutputFile::MappedOutputFile(MappedOutputFile&& other) noexcept
    : path_(std::move(other.path_)),
      fd_(std::exchange(other.fd_, -1)),
      base_(std::exchange(other.base_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      data_offset_(std::exchange(other.data_offset_, 0)) {}

MappedOutputFile& MappedOutputFile::operator=(MappedOutputFile&& other) noexcept {
  if (this != &other) {
    (void)Close();
    path_ = std::move(other.path_);
    fd_ = std::exchange(other.fd_, -1);
    base_ = std::exchange(other.base_, nullptr);
    size_ = std::exchange(other.size_, 0);
    data_offset_ = std::exchange(other.data_offset_, 0);
  }
  return *this;
}

MappedOutputFile::~MappedOutputFile() { (void)Close(); }

std::span<std::byte> MappedOutputFile::data() const {
  if (base_ == nullptr) return {};
  return {static_cast<std::byte*>(base_) + data_offset_, size_ - data_offset_};
}

absl::Status MappedOutputFile::Close() {
  absl::Status status;
  if (base_ != nullptr && ::munmap(base_, size_) != 0) {
    status = IoError("cannot unmap", path_, errno);
  }
  base_ = nullptr;
  if (fd_ >= 0 && ::close(fd_) != 0 && status.ok()) {
    status = IoError("cannot close", path_, errno);
  }
  fd_ = -1;
  return status;
}

}  // namespace simserve::npy
