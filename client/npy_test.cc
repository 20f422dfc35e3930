// Unit tests of the .npy reader/writer and the float16/bfloat16 conversions, checked against
// numpy itself: numpy writes files that we read, and reads files that we write.
#include "client/npy.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/dtype.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/dtype.h"

namespace simserve::npy {
namespace {

using ::testing::HasSubstr;

// A fresh temporary directory per test, removed afterwards.
class NpyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (std::filesystem::temp_directory_path() / "npy_test_XXXXXX").string();
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string Path(const std::string& name) const { return (dir_ / name).string(); }

  // Runs a Python snippet with numpy imported as np and `d` = the temp dir.
  void RunPython(const std::string& code) const {
    const std::string script = Path("script.py");
    {
      std::ofstream out(script);
      out << "import numpy as np, sys\nd = sys.argv[1]\n" << code << "\n";
    }
    const std::string cmd = absl::StrCat(SIMSERVE_PYTHON, " ", script, " ", dir_.string());
    ASSERT_EQ(std::system(cmd.c_str()), 0) << "python failed: " << code;
  }

  std::string ReadText(const std::string& name) const {
    std::ifstream in(Path(name));
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }

  std::filesystem::path dir_;
};

template <typename T>
std::vector<T> Elements(const Array& array) {
  std::vector<T> out(array.data.size() / sizeof(T));
  std::memcpy(out.data(), array.data.data(), array.data.size());
  return out;
}

TEST_F(NpyTest, ReadsFloat32WrittenByNumpy) {
  RunPython(
      "a = np.arange(2*3*4, dtype=np.float32).reshape(2, 3, 4) * 0.5 - 3\n"
      "np.save(d + '/a.npy', a)");
  auto array = ReadFile(Path("a.npy"));
  ASSERT_TRUE(array.ok()) << array.status();
  EXPECT_EQ(array->dtype, DType::kFloat32);
  EXPECT_EQ(array->shape, (std::vector<int64_t>{2, 3, 4}));
  const auto values = Elements<float>(*array);
  ASSERT_EQ(values.size(), 24U);
  for (size_t i = 0; i < values.size(); ++i) {
    EXPECT_EQ(values[i], static_cast<float>(i) * 0.5F - 3.0F) << i;
  }
}

TEST_F(NpyTest, MappedFileViewsTheSameBytesInPlace) {
  RunPython(
      "np.save(d + '/a.npy', np.linspace(-1, 1, 2*5*7, dtype=np.float32).reshape(2, 5, 7))\n"
      "np.save(d + '/be.npy', np.array([1.5, 2.0], dtype='>f4'))\n"
      "open(d + '/junk.npy', 'wb').write(b'not numpy at all')");
  auto mapped = MappedFile::Open(Path("a.npy"));
  ASSERT_TRUE(mapped.ok()) << mapped.status();
  auto read = ReadFile(Path("a.npy"));
  ASSERT_TRUE(read.ok());
  EXPECT_EQ(mapped->layout().shape, (std::vector<int64_t>{2, 5, 7}));
  EXPECT_EQ(mapped->layout().dtype, DType::kFloat32);
  EXPECT_FALSE(mapped->layout().big_endian);
  ASSERT_EQ(mapped->data().size(), read->data.size());
  EXPECT_EQ(std::memcmp(mapped->data().data(), read->data.data(), read->data.size()), 0);
  MappedFile moved = *std::move(mapped);  // the mapping survives a move
  EXPECT_EQ(std::memcmp(moved.data().data(), read->data.data(), read->data.size()), 0);

  auto big = MappedFile::Open(Path("be.npy"));
  ASSERT_TRUE(big.ok());
  EXPECT_TRUE(big->layout().big_endian);
  auto junk = MappedFile::Open(Path("junk.npy"));
  EXPECT_EQ(junk.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(junk.status().message(), HasSubstr("junk.npy"));
  EXPECT_EQ(MappedFile::Open(Path("none.npy")).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(NpyTest, ReadsFloat64AndConvertsToFloat32) {
  RunPython("np.save(d + '/a.npy', np.array([[1.0, -2.5], [1e-3, 3.0e38]], dtype=np.float64))");
  auto array = ReadFile(Path("a.npy"));
  ASSERT_TRUE(array.ok()) << array.status();
  EXPECT_EQ(array->dtype, DType::kFloat64);
  EXPECT_EQ(array->shape, (std::vector<int64_t>{2, 2}));
  auto floats = ToFloat32(*array);
  ASSERT_TRUE(floats.ok());
  EXPECT_EQ(*floats, (std::vector<float>{1.0F, -2.5F, 1e-3F, 3.0e38F}));
}

TEST_F(NpyTest, ReadsFloat16AndWidensLikeNumpy) {
  // Every finite float16 bit pattern; numpy's widening is the reference.
  RunPython(
      "bits = np.arange(65536, dtype=np.uint16)\n"
      "h = bits.view(np.float16)\n"
      "np.save(d + '/h.npy', h)\n"
      "np.save(d + '/f.npy', h.astype(np.float32))");
  auto half = ReadFile(Path("h.npy"));
  auto wide = ReadFile(Path("f.npy"));
  ASSERT_TRUE(half.ok()) << half.status();
  ASSERT_TRUE(wide.ok()) << wide.status();
  EXPECT_EQ(half->dtype, DType::kFloat16);
  auto ours = ToFloat32(*half);
  ASSERT_TRUE(ours.ok());
  const auto expected = Elements<float>(*wide);
  ASSERT_EQ(ours->size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    if (std::isnan(expected[i])) {
      EXPECT_TRUE(std::isnan((*ours)[i])) << i;
    } else {
      EXPECT_EQ((*ours)[i], expected[i]) << "bits " << i;
    }
  }
}

TEST_F(NpyTest, FloatToHalfRoundsLikeNumpy) {
  RunPython(
      "rng = np.random.default_rng(7)\n"
      "x = np.concatenate([rng.standard_normal(20000).astype(np.float32) * 10.0**rng.integers(-9, "
      "6, 20000),\n"
      "    np.array([0.0, -0.0, 65504, 65519.99, 65520, 1e9, -1e9, 6.1e-5, 5.96e-8, 2.98e-8,\n"
      "              2.99e-8, 1e-10, np.inf, -np.inf], dtype=np.float32)]).astype(np.float32)\n"
      "np.save(d + '/x.npy', x)\n"
      "with np.errstate(over='ignore'):\n    np.save(d + '/h.npy', x.astype(np.float16))");
  auto x = ReadFile(Path("x.npy"));
  auto h = ReadFile(Path("h.npy"));
  ASSERT_TRUE(x.ok() && h.ok());
  const auto inputs = Elements<float>(*x);
  const auto expected = Elements<uint16_t>(*h);
  ASSERT_EQ(inputs.size(), expected.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    ASSERT_EQ(kernels::FloatToF16(inputs[i]), expected[i]) << "value " << inputs[i];
  }
}

TEST_F(NpyTest, BFloat16MatchesTruncationReference) {
  // Reference: round-to-nearest-even on the upper 16 bits, computed with numpy integer ops.
  RunPython(
      "rng = np.random.default_rng(3)\n"
      "x = (rng.standard_normal(20000) * 10.0**rng.integers(-20, 20, 20000)).astype(np.float32)\n"
      "u = x.view(np.uint32).astype(np.uint64)\n"
      "r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)\n"
      "np.save(d + '/x.npy', x)\n"
      "np.save(d + '/r.npy', r.view(np.float16))");
  auto x = ReadFile(Path("x.npy"));
  auto r = ReadFile(Path("r.npy"));
  ASSERT_TRUE(x.ok() && r.ok());
  const auto inputs = Elements<float>(*x);
  const auto expected = Elements<uint16_t>(*r);
  for (size_t i = 0; i < inputs.size(); ++i) {
    ASSERT_EQ(kernels::FloatToBf16(inputs[i]), expected[i]) << inputs[i];
    const float back = kernels::Bf16ToFloat(expected[i]);
    uint32_t back_bits = 0;
    std::memcpy(&back_bits, &back, 4);
    ASSERT_EQ(back_bits, static_cast<uint32_t>(expected[i]) << 16);
  }
}

TEST_F(NpyTest, ReadsInt32BigEndianAndVersion2Files) {
  RunPython(
      "np.save(d + '/i.npy', np.array([[1, -2, 3]], dtype=np.int32))\n"
      "np.save(d + '/be.npy', np.array([1.5, -2.25, 7.0], dtype='>f4'))\n"
      "from numpy.lib import format as F\n"
      "with open(d + '/v2.npy', 'wb') as f:\n"
      "    a = np.array([[0.25, 4.0]], dtype=np.float32)\n"
      "    F.write_array(f, a, version=(2, 0))");
  auto ints = ReadFile(Path("i.npy"));
  ASSERT_TRUE(ints.ok()) << ints.status();
  EXPECT_EQ(ints->dtype, DType::kInt32);
  EXPECT_EQ(Elements<int32_t>(*ints), (std::vector<int32_t>{1, -2, 3}));
  auto be = ReadFile(Path("be.npy"));
  ASSERT_TRUE(be.ok()) << be.status();
  EXPECT_EQ(Elements<float>(*be), (std::vector<float>{1.5F, -2.25F, 7.0F}));
  auto v2 = ReadFile(Path("v2.npy"));
  ASSERT_TRUE(v2.ok()) << v2.status();
  EXPECT_EQ(v2->shape, (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(Elements<float>(*v2), (std::vector<float>{0.25F, 4.0F}));
}

TEST_F(NpyTest, ReadsScalarsAndEmptyArrays) {
  RunPython(
      "np.save(d + '/s.npy', np.float32(2.5))\n"
      "np.save(d + '/e.npy', np.zeros((0, 4), dtype=np.float32))\n"
      "np.save(d + '/v.npy', np.ones(5, dtype=np.float32))");
  auto scalar = ReadFile(Path("s.npy"));
  ASSERT_TRUE(scalar.ok()) << scalar.status();
  EXPECT_TRUE(scalar->shape.empty());
  EXPECT_EQ(Elements<float>(*scalar), std::vector<float>{2.5F});
  auto empty = ReadFile(Path("e.npy"));
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_EQ(empty->shape, (std::vector<int64_t>{0, 4}));
  EXPECT_TRUE(empty->data.empty());
  auto vec = ReadFile(Path("v.npy"));
  ASSERT_TRUE(vec.ok()) << vec.status();
  EXPECT_EQ(vec->shape, std::vector<int64_t>{5});
}

TEST_F(NpyTest, WrittenFilesLoadInNumpy) {
  std::vector<float> values(size_t{3} * 2 * 5);
  for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(i) * 0.25F - 1.0F;
  const std::vector<int64_t> shape = {3, 2, 5};
  ASSERT_TRUE(
      WriteFile(Path("f.npy"), shape, DType::kFloat32, std::as_bytes(std::span(values))).ok());
  std::vector<uint16_t> halves = {kernels::FloatToF16(1.0F), kernels::FloatToF16(-0.5F),
                                  kernels::FloatToF16(1024.0F)};
  const std::vector<int64_t> vshape = {3};
  ASSERT_TRUE(
      WriteFile(Path("h.npy"), vshape, DType::kFloat16, std::as_bytes(std::span(halves))).ok());
  std::vector<int32_t> ints = {7, -1, 0, 42};
  const std::vector<int64_t> ishape = {2, 2};
  ASSERT_TRUE(WriteFile(Path("i.npy"), ishape, DType::kInt32, std::as_bytes(std::span(ints))).ok());
  RunPython(
      "f = np.load(d + '/f.npy'); h = np.load(d + '/h.npy'); i = np.load(d + '/i.npy')\n"
      "ok = (f.dtype == np.float32 and f.shape == (3, 2, 5) and f.flags.c_contiguous and\n"
      "      np.array_equal(f.ravel(), np.arange(30, dtype=np.float32) * 0.25 - 1) and\n"
      "      h.dtype == np.float16 and h.tolist() == [1.0, -0.5, 1024.0] and\n"
      "      i.dtype == np.int32 and i.tolist() == [[7, -1], [0, 42]])\n"
      "open(d + '/verdict.txt', 'w').write('ok' if ok else repr((f, h, i)))");
  EXPECT_EQ(ReadText("verdict.txt"), "ok");
  // Header alignment: numpy pads the whole header to a multiple of 64 bytes.
  auto image = Serialize(shape, DType::kFloat32, std::as_bytes(std::span(values)));
  ASSERT_TRUE(image.ok());
  EXPECT_EQ((image->size() - values.size() * 4) % 64, 0U);
}

TEST_F(NpyTest, MappedOutputFilesAreWrittenInPlaceAndLoadInNumpy) {
  const std::vector<int64_t> shape = {2, 3, 4};
  {
    auto file = MappedOutputFile::Create(Path("m.npy"), shape, DType::kFloat32);
    ASSERT_TRUE(file.ok()) << file.status();
    ASSERT_EQ(file->data().size(), 2U * 3 * 4 * 4);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(file->data().data()) % 64, 0U) << "64-byte header";
    for (size_t i = 0; i < 24; ++i) {
      const float value = static_cast<float>(i) - 3.5F;
      std::memcpy(file->data().data() + 4 * i, &value, 4);
    }
    // The same bytes as WriteFile() would give.
    std::vector<float> values(24);
    std::memcpy(values.data(), file->data().data(), 96);
    auto image = Serialize(shape, DType::kFloat32, std::as_bytes(std::span(values)));
    ASSERT_TRUE(image.ok());
    MappedOutputFile moved = *std::move(file);
    ASSERT_TRUE(moved.Close().ok());
    EXPECT_EQ(ReadText("m.npy"), *image);
    EXPECT_TRUE(moved.data().empty());
    EXPECT_TRUE(moved.Close().ok()) << "closing twice is harmless";
  }
  {
    const std::vector<int64_t> empty_shape = {0, 5};
    auto empty = MappedOutputFile::Create(Path("e.npy"), empty_shape, DType::kInt32);
    ASSERT_TRUE(empty.ok()) << empty.status();
    EXPECT_TRUE(empty->data().empty());
  }  // the destructor closes
  RunPython(
      "m = np.load(d + '/m.npy'); e = np.load(d + '/e.npy')\n"
      "ok = (m.dtype == np.float32 and m.shape == (2, 3, 4) and\n"
      "      np.array_equal(m.ravel(), np.arange(24, dtype=np.float32) - 3.5) and\n"
      "      e.dtype == np.int32 and e.shape == (0, 5))\n"
      "open(d + '/verdict.txt', 'w').write('ok' if ok else repr((m, e)))");
  EXPECT_EQ(ReadText("verdict.txt"), "ok");
  const std::vector<int64_t> bad = {-1, 2};
  EXPECT_EQ(MappedOutputFile::Create(Path("bad.npy"), bad, DType::kFloat32).status().code(),
            absl::StatusCode::kInvalidArgument);
  const auto missing = MappedOutputFile::Create(Path("no/such/dir.npy"), shape, DType::kFloat32);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("dir.npy"));
}

TEST_F(NpyTest, RejectsFortranOrderAndUnsupportedTypes) {
  RunPython(
      "np.save(d + '/fo.npy', np.asfortranarray(np.ones((3, 2), dtype=np.float32)))\n"
      "np.save(d + '/c.npy', np.ones(3, dtype=np.complex64))\n"
      "np.save(d + '/u8.npy', np.ones(3, dtype=np.uint8))");
  auto fortran = ReadFile(Path("fo.npy"));
  EXPECT_EQ(fortran.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(fortran.status().message(), HasSubstr("Fortran order"));
  auto complex = ReadFile(Path("c.npy"));
  EXPECT_EQ(complex.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(complex.status().message(), HasSubstr("unsupported .npy dtype '<c8'"));
  auto bytes = ReadFile(Path("u8.npy"));
  EXPECT_EQ(bytes.status().code(), absl::StatusCode::kInvalidArgument);
  auto ints = ReadFile(Path("missing.npy"));
  EXPECT_EQ(ints.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(ints.status().message(), HasSubstr("missing.npy"));
}

TEST_F(NpyTest, RejectsTruncatedAndCorruptFiles) {
  std::vector<float> values(12, 1.0F);
  const std::vector<int64_t> shape = {3, 4};
  auto image = Serialize(shape, DType::kFloat32, std::as_bytes(std::span(values)));
  ASSERT_TRUE(image.ok());
  const auto as_bytes = [](const std::string& s) {
    return std::span(reinterpret_cast<const std::byte*>(s.data()), s.size());
  };
  ASSERT_TRUE(Parse(as_bytes(*image)).ok());

  auto truncated = Parse(as_bytes(image->substr(0, image->size() - 4)));
  EXPECT_EQ(truncated.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(truncated.status().message(), HasSubstr("44 bytes but shape and dtype need 48"));

  auto header_cut = Parse(as_bytes(image->substr(0, 30)));
  EXPECT_EQ(header_cut.status().code(), absl::StatusCode::kInvalidArgument);

  std::string bad_magic = *image;
  bad_magic[1] = 'X';
  EXPECT_THAT(Parse(as_bytes(bad_magic)).status().message(), HasSubstr("bad magic"));

  std::string bad_shape = *image;
  bad_shape.replace(bad_shape.find("(3, 4)"), 6, "(3, x)");
  EXPECT_EQ(Parse(as_bytes(bad_shape)).status().code(), absl::StatusCode::kInvalidArgument);

  // A hand-made header whose shape product overflows int64.
  std::string dict =
      "{'descr': '<f4', 'fortran_order': False, 'shape': (9999999999, 9999999999, 9999999999), }\n";
  std::string huge = std::string("\x93NUMPY\x01\x00", 8);
  huge.push_back(static_cast<char>(dict.size()));
  huge.push_back(0);
  huge += dict;
  auto overflow = Parse(as_bytes(huge));
  EXPECT_EQ(overflow.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(overflow.status().message(), HasSubstr("overflows"));

  EXPECT_EQ(Parse(as_bytes(std::string("\x93NUMPY"))).status().code(),
            absl::StatusCode::kInvalidArgument);

  const std::vector<int64_t> wrong = {5};
  EXPECT_EQ(Serialize(wrong, DType::kFloat32, std::as_bytes(std::span(values))).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace simserve::npy
