// npy_fuzzer: arbitrary bytes as an .npy file image through client/npy.h, the reader of
// simserve-cli and of the server's --gallery_dir. Oracles: Parse succeeds exactly when
// ParseLayout does and agrees with it (shape, dtype, byte count, byte order), ToFloat32
// converts every floating-point array and refuses int32, and Serialize + Parse round-trips
// what was read.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

#include "client/npy.h"
#include "fuzz/fuzz_common.h"

namespace simserve::fuzz {
namespace {

using npy::DType;

void FuzzNpy(std::span<const std::byte> bytes) {
  auto layout = npy::ParseLayout(bytes);
  auto array = npy::Parse(bytes);
  Check(layout.ok() == array.ok(), "Parse and ParseLayout disagree on success");
  if (!array.ok()) {
    Check(array.status().code() == absl::StatusCode::kInvalidArgument,
          "a bad .npy image is not INVALID_ARGUMENT");
    return;
  }
  Check(array->shape == layout->shape && array->dtype == layout->dtype,
        "Parse and ParseLayout disagree on shape or dtype");
  const size_t width = npy::SizeOf(array->dtype);
  const auto count = static_cast<size_t>(array->element_count());
  Check(array->data.size() == layout->data_size && layout->data_size == count * width,
        "data size is not prod(shape) * sizeof(dtype)");
  Check(layout->data_offset + layout->data_size == bytes.size(), "the data does not end the file");
  // The elements are the file's, byte-swapped for a big-endian descr.
  for (size_t i = 0; i < count; ++i) {
    const std::byte* in = bytes.data() + layout->data_offset + i * width;
    const std::byte* out = array->data.data() + i * width;
    for (size_t k = 0; k < width; ++k) {
      Check(out[k] == in[layout->big_endian ? width - 1 - k : k], "element bytes differ");
    }
  }

  auto floats = npy::ToFloat32(*array);
  if (array->dtype == DType::kInt32) {
    Check(!floats.ok(), "int32 converted to float32");
  } else {
    Check(floats.ok() && floats->size() == count, "ToFloat32 lost elements");
    if (array->dtype == DType::kFloat32) {
      Check(count == 0 || std::memcmp(floats->data(), array->data.data(), count * 4) == 0,
            "float32 elements changed by ToFloat32");
    }
  }

  auto image = npy::Serialize(array->shape, array->dtype, array->data);
  Check(image.ok(), "a parsed array cannot be serialized");
  auto again = npy::Parse(std::as_bytes(std::span<const char>(image->data(), image->size())));
  Check(again.ok() && again->shape == array->shape && again->dtype == array->dtype &&
            std::equal(again->data.begin(), again->data.end(), array->data.begin(),
                       array->data.end()),
        "Serialize + Parse does not round-trip");
}

}  // namespace
}  // namespace simserve::fuzz

// libFuzzer's entry point; stateless.
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  simserve::fuzz::FuzzNpy({reinterpret_cast<const std::byte*>(data), size});
  return 0;
}
