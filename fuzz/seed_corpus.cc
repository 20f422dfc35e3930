// Writes the seed corpus of every harness: small valid inputs and edge cases, one file each,
// into DIR/<harness>/ (the committed fuzz/corpus is its output). Deterministic.
// Usage: seed_corpus DIR
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "client/npy.h"
#include "fuzz/fuzz_common.h"
#include "simserve/v1/similarity.pb.h"

namespace simserve::fuzz {
namespace {

namespace fs = std::filesystem;

// `count` little-endian floats of a small repeating pattern.
std::string Floats(int64_t count) {
  std::string bytes(static_cast<size_t>(count) * 4, '\0');
  for (int64_t i = 0; i < count; ++i) {
    const float value = static_cast<float>(i % 7) * 0.5F - 1.5F;
    std::memcpy(&bytes[static_cast<size_t>(i) * 4], &value, 4);
  }
  return bytes;
}

// Floats(count) with element `index` replaced by `value`.
std::string FloatsWith(int64_t count, int64_t index, float value) {
  std::string bytes = Floats(count);
  std::memcpy(&bytes[static_cast<size_t>(index) * 4], &value, 4);
  return bytes;
}

// `count` 2-byte elements (bfloat16 / float16 patterns; finite in both).
std::string Halves(int64_t count) {
  std::string bytes;
  for (int64_t i = 0; i < count; ++i) {
    bytes.push_back(static_cast<char>(0x00));
    bytes.push_back(static_cast<char>(0x3c + (i % 3)));
  }
  return bytes;
}

v1::Tensor Shape(std::initializer_list<int64_t> shape, v1::DataType dtype = v1::FLOAT32) {
  v1::Tensor t;
  for (int64_t d : shape) t.add_shape(d);
  t.set_dtype(dtype);
  return t;
}

int64_t Elements(const v1::Tensor& t) {
  int64_t n = 1;
  for (int64_t d : t.shape()) n *= d;
  return n;
}

v1::Tensor Raw(std::initializer_list<int64_t> shape, v1::DataType dtype = v1::FLOAT32) {
  v1::Tensor t = Shape(shape, dtype);
  t.set_raw(dtype == v1::FLOAT32 ? Floats(Elements(t)) : Halves(Elements(t)));
  return t;
}

v1::Tensor Values(std::initializer_list<int64_t> shape) {
  v1::Tensor t = Shape(shape);
  for (int64_t i = 0; i < Elements(t); ++i) t.mutable_values()->add_values(0.25F * (i % 5));
  return t;
}

class Writer {
 public:
  explicit Writer(const fs::path& dir) : dir_(dir) {}
  void Write(const std::string& harness, const std::string& name, const std::string& bytes) {
    fs::create_directories(dir_ / harness);
    std::ofstream(dir_ / harness / name, std::ios::binary) << bytes;
    ++files_;
    bytes_ += bytes.size();
  }
  void Summary() const {
    std::printf("seed_corpus: %d files, %zu bytes in %s\n", files_, bytes_, dir_.c_str());
  }

 private:
  fs::path dir_;
  int files_ = 0;
  size_t bytes_ = 0;
};

void ComputeRequests(Writer& w) {
  const char* h = "compute_request_fuzzer";
  v1::ComputeRequest r;
  *r.mutable_a() = Raw({2, 3});
  *r.mutable_b() = Raw({4, 3});
  w.Write(h, "cosine_2d", r.SerializeAsString());
  r.set_metric(v1::DOT);
  r.set_top_k(2);
  w.Write(h, "dot_top2", r.SerializeAsString());
  r.Clear();
  *r.mutable_a() = Raw({2, 3, 4}, v1::BFLOAT16);
  *r.mutable_b() = Raw({2, 5, 4}, v1::FLOAT16);
  r.set_metric(v1::EUCLIDEAN);
  r.set_output_dtype(v1::BFLOAT16);
  r.set_precision(v1::BF16);
  r.set_max_chunk_bytes(24);
  w.Write(h, "euclidean_3d_half", r.SerializeAsString());
  r.Clear();
  *r.mutable_a() = Values({1, 2, 2});
  *r.mutable_b() = Values({1, 3, 2});
  r.set_metric(v1::SQUARED_EUCLIDEAN);
  r.set_epsilon(1e-3F);
  r.set_output_dtype(v1::FLOAT16);
  w.Write(h, "values_sq_euclidean", r.SerializeAsString());
  r.Clear();
  *r.mutable_a() = Raw({2, 4});
  r.set_gallery("g");
  r.set_top_k(1);
  w.Write(h, "gallery", r.SerializeAsString());
  r.set_gallery_version(-1);
  w.Write(h, "gallery_bad_version", r.SerializeAsString());
  // Edge cases: each breaks one rule.
  r.Clear();
  *r.mutable_a() = Raw({2, 3});
  *r.mutable_b() = Raw({4, 3});
  r.mutable_a()->set_raw(Floats(5));
  w.Write(h, "raw_length_mismatch", r.SerializeAsString());
  r.mutable_a()->set_raw(FloatsWith(6, 4, std::numeric_limits<float>::infinity()));
  w.Write(h, "inf_in_a", r.SerializeAsString());
  r.mutable_a()->set_raw(Floats(6));
  r.set_top_k(5);
  w.Write(h, "top_k_over_m", r.SerializeAsString());
  r.set_top_k(0);
  r.mutable_b()->set_shape(0, int64_t{1} << 62);
  w.Write(h, "shape_overflow", r.SerializeAsString());
  r.mutable_b()->set_shape(0, 0);
  w.Write(h, "zero_dim", r.SerializeAsString());
  *r.mutable_b() = Raw({4});
  w.Write(h, "rank_1", r.SerializeAsString());
  // Tensor a sent twice: protobuf merges the two, the last data wins.
  v1::ComputeRequest twice;
  *twice.mutable_a() = Values({2, 3});
  w.Write(h, "a_twice", r.SerializeAsString() + twice.SerializeAsString());
  w.Write(h, "unknown_field", r.SerializeAsString() + std::string("\xa0\x06\x05", 3));
  w.Write(h, "empty", "");
}

std::string UploadHeader(const v1::ComputeRequest& request) { return request.SerializeAsString(); }

void Uploads(Writer& w) {
  const char* h = "upload_fuzzer";
  v1::ComputeRequest header;
  *header.mutable_a() = Shape({2, 3, 4});
  *header.mutable_b() = Shape({2, 5, 4});
  header.set_max_chunk_bytes(40);
  const std::string a = Floats(24);
  const std::string b = Floats(40);
  // Header, all of b, then a in two pieces; a second one interleaved per batch entry.
  std::string in(1, '\0');
  AppendRecord(&in, 1, UploadHeader(header));
  AppendRecord(&in, 3, b);
  AppendRecord(&in, 2 | 4, a.substr(0, 30));
  AppendRecord(&in, 2 | 8, a.substr(30));
  w.Write(h, "header_b_a", in);
  in.assign(1, '\0');
  AppendRecord(&in, 1, UploadHeader(header));
  AppendRecord(&in, 3, b.substr(0, 80));
  AppendRecord(&in, 2, a.substr(0, 48));
  AppendRecord(&in, 3, b.substr(80));
  AppendRecord(&in, 2, a.substr(48));
  w.Write(h, "interleaved", in);
  // The same as messages as received, in slices.
  in.assign(1, '\0');
  v1::UploadRequest message;
  *message.mutable_header()->mutable_request() = header;
  AppendRecord(&in, 0 | 12, message.SerializeAsString());
  message.set_b_data(b);
  AppendRecord(&in, 0 | 4, message.SerializeAsString());
  message.set_a_data(a);
  AppendRecord(&in, 0, message.SerializeAsString());
  w.Write(h, "messages", in);
  // Small limits: reading pauses after each few bytes (pieces of 8 bytes).
  v1::ComputeRequest small;
  *small.mutable_a() = Shape({3, 2}, v1::FLOAT16);
  *small.mutable_b() = Shape({4, 2});
  small.set_top_k(2);
  small.set_metric(v1::EUCLIDEAN);
  in.assign(1, '\1');
  AppendRecord(&in, 1, UploadHeader(small));
  const std::string sb = Floats(8);
  for (size_t at = 0; at < sb.size(); at += 8) AppendRecord(&in, 3, sb.substr(at, 8));
  AppendRecord(&in, 2, Halves(6));
  w.Write(h, "small_limits_paused", in);
  // A gallery plays b.
  v1::ComputeRequest gallery;
  *gallery.mutable_a() = Shape({2, 4});
  gallery.set_gallery("g");
  in.assign(1, '\0');
  AppendRecord(&in, 1, UploadHeader(gallery));
  AppendRecord(&in, 2, Floats(8));
  w.Write(h, "gallery", in);
  // The client goes away before record 2; the first write fails; the server drains.
  in[0] = static_cast<char>(2 | (2 << 4));
  w.Write(h, "cancel", in);
  in[0] = 4;
  w.Write(h, "write_fails", in);
  in[0] = 8;
  w.Write(h, "draining", in);
  // Sequencing errors.
  in.assign(1, '\0');
  AppendRecord(&in, 2, Floats(2));
  w.Write(h, "data_before_header", in);
  in.assign(1, '\0');
  AppendRecord(&in, 1, UploadHeader(gallery));
  AppendRecord(&in, 1, UploadHeader(gallery));
  w.Write(h, "second_header", in);
  in.assign(1, '\0');
  AppendRecord(&in, 1, UploadHeader(small));
  AppendRecord(&in, 0, "");
  w.Write(h, "empty_message", in);
  in.assign(1, '\0');
  AppendRecord(&in, 1, UploadHeader(small));
  AppendRecord(&in, 2, Halves(7));
  w.Write(h, "too_much_a", in);
}

void Npy(Writer& w) {
  const char* h = "npy_fuzzer";
  auto write = [&](const char* name, std::vector<int64_t> shape, npy::DType dtype) {
    int64_t count = 1;
    for (int64_t d : shape) count *= d;
    const std::string data(static_cast<size_t>(count) * npy::SizeOf(dtype), '\x3c');
    auto image = npy::Serialize(shape, dtype, std::as_bytes(std::span(data.data(), data.size())));
    if (image.ok()) w.Write(h, name, *image);
    return image.ok() ? *image : std::string();
  };
  write("f4_2d", {3, 4}, npy::DType::kFloat32);
  write("f2_3d", {2, 2, 3}, npy::DType::kFloat16);
  write("f8_1d", {5}, npy::DType::kFloat64);
  write("i4", {2, 2}, npy::DType::kInt32);
  write("scalar", {}, npy::DType::kFloat32);
  write("empty", {0, 3}, npy::DType::kFloat32);
  // Variants numpy also writes or reads: big-endian, version 2, double quotes, Fortran order.
  const std::string image = write("f4_2x2", {2, 2}, npy::DType::kFloat32);
  std::string big = image;
  big.replace(big.find("<f4"), 3, ">f4");
  w.Write(h, "big_endian", big);
  std::string quoted = image;
  for (char& c : quoted) c = c == '\'' ? '"' : c;
  w.Write(h, "double_quotes", quoted);
  std::string fortran = image;
  fortran.replace(fortran.find("False"), 5, "True ");
  w.Write(h, "fortran", fortran);
  std::string v2 = image.substr(0, 8) + std::string("\x76\x00\x00\x00", 4) + image.substr(10);
  v2[6] = 2;
  w.Write(h, "version2", v2);
  w.Write(h, "truncated", image.substr(0, image.size() - 3));
  std::string long_dims = image;
  long_dims.replace(long_dims.find("(2, 2)"), 6, "(2L,2)");
  w.Write(h, "python2_long", long_dims);
}

void Galleries(Writer& w) {
  const char* h = "gallery_fuzzer";
  v1::GalleryHeader header;
  header.set_name("cat");
  header.add_shape(5);
  header.add_shape(4);
  std::string in(1, '\0');
  AppendRecord(&in, 1, header.SerializeAsString());
  AppendRecord(&in, 2, Floats(20).substr(0, 33));
  AppendRecord(&in, 2 | 4, Floats(20).substr(33));
  w.Write(h, "f32_2d", in);
  // As received, half storage, 3D, cosine top-1 query (options bits).
  v1::GalleryHeader half = header;
  half.clear_shape();
  for (int64_t d : {2, 3, 4}) half.add_shape(d);
  half.set_dtype(v1::FLOAT16);
  half.set_storage_dtype(v1::BFLOAT16);
  in.assign(1, '\x04');
  v1::RegisterGalleryRequest message;
  *message.mutable_header() = half;
  AppendRecord(&in, 0, message.SerializeAsString());
  message.set_data(Halves(24));
  AppendRecord(&in, 0 | 8, message.SerializeAsString());
  w.Write(h, "f16_3d_bf16_storage", in);
  in[0] = 0x03;
  w.Write(h, "sq_euclidean_query", in);
  // Errors: data first, too many and too few bytes, a NaN, a bad name, a second header.
  in.assign(1, '\0');
  AppendRecord(&in, 2, Floats(4));
  w.Write(h, "data_before_header", in);
  in.assign(1, '\0');
  AppendRecord(&in, 1, header.SerializeAsString());
  AppendRecord(&in, 2, Floats(21));
  w.Write(h, "too_many_bytes", in);
  in.assign(1, '\0');
  AppendRecord(&in, 1, header.SerializeAsString());
  AppendRecord(&in, 2, Floats(19));
  w.Write(h, "too_few_bytes", in);
  in.assign(1, '\0');
  AppendRecord(&in, 1, header.SerializeAsString());
  AppendRecord(&in, 2, FloatsWith(20, 7, std::numeric_limits<float>::quiet_NaN()));
  w.Write(h, "nan", in);
  v1::GalleryHeader bad = header;
  bad.set_name("bad name");
  in.assign(1, '\0');
  AppendRecord(&in, 1, bad.SerializeAsString());
  w.Write(h, "bad_name", in);
  in.assign(1, '\0');
  AppendRecord(&in, 1, header.SerializeAsString());
  AppendRecord(&in, 1, header.SerializeAsString());
  w.Write(h, "second_header", in);
}

}  // namespace
}  // namespace simserve::fuzz

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  simserve::fuzz::Writer writer(argv[1]);
  simserve::fuzz::ComputeRequests(writer);
  simserve::fuzz::Uploads(writer);
  simserve::fuzz::Npy(writer);
  simserve::fuzz::Galleries(writer);
  writer.Summary();
  return 0;
}
