// compute_request_fuzzer: arbitrary bytes as a received simserve.v1.ComputeRequest, through
// the server's receive path. The bytes arrive as a grpc::ByteBuffer (one slice and three)
// and are decoded in place (codec::DecodeComputeRequest), then converted and validated
// (ConvertRequest) for every RequestKind with the default limits and with small ones; for
// accepted requests the NaN/Inf check (CheckFinite) runs over the views and, for problems
// of at most 1e6 flops, the kernel computes the result (kernels::SimilarityEngine), as the
// pipeline would. A request naming a gallery runs against a small prepared one.
//
// Oracles: the decoding does not depend on the slicing and equals protobuf's own parse
// (with the raw payloads put back); ConvertRequest gives the same answer for the decoded
// request with its payload sizes as for protobuf's parse; an accepted problem's sizes are
// consistent, its views lie inside the message and the kernel accepts it.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz/fuzz_common.h"
#include "fuzz/fuzz_server.h"
#include "google/protobuf/stubs/logging.h"
#include "kernels/gallery.h"
#include "kernels/similarity.h"
#include "server/aligned_buffer.h"
#include "server/config.h"
#include "server/convert.h"
#include "server/wire_codec.h"
#include "simserve/v1/similarity.pb.h"

namespace simserve::fuzz {
namespace {

// A problem this small is computed (the kernel under ASan costs about 1 ms per MFLOP).
constexpr int64_t kMaxComputedFlops = 1'000'000;

// Built once per process and kept across inputs, as a server keeps them: the engine (its
// primitive cache warms up as in production) and the gallery that `gallery` requests use.
struct State {
  State() {
    google::protobuf::SetLogHandler(nullptr);  // invalid UTF-8 in names is logged otherwise
    engine = MakeEngine();
    auto builder = kernels::GalleryBuilder::Create(kGallery, kernels::DataType::kFloat32,
                                                   kernels::DataType::kFloat32);
    Check(builder.ok(), "gallery builder");
    std::span<std::byte> input = (*builder)->input();
    for (size_t i = 0; i < input.size() / 4; ++i) {
      const float value = static_cast<float>(i % 5) - 2.0F;
      std::memcpy(input.data() + i * 4, &value, 4);
    }
    auto built = (*builder)->Build(1);
    Check(built.ok(), "gallery build");
    gallery = *std::move(built);
    small.max_input_elements = 64;
    small.max_flops = 4096;
    small.max_output_bytes = 512;
    small.max_send_message_bytes = kMessageOverheadBytes + 256;
    small.default_chunk_bytes = 64;
    small.max_chunk_bytes = 128;
  }

  static constexpr kernels::GalleryShape kGallery = {.entries = 1, .m = 3, .d = 4};
  std::unique_ptr<kernels::SimilarityEngine> engine;
  std::unique_ptr<kernels::PreparedGallery> gallery;
  LimitsConfig defaults;
  LimitsConfig small;
};

// The process's State (libFuzzer calls the entry point once per input).
State& GetState() {
  static State state;
  return state;
}

// The bytes of `range` in `message`, gathered (what the pipeline's ingest copies).
std::string Gather(const codec::ReceivedMessage& message, codec::Range range) {
  std::string out;
  for (const auto span : message.Spans(range)) {
    out.append(reinterpret_cast<const char*>(span.data()), span.size());
  }
  return out;
}

// The decoded request with its raw payloads put back: what protobuf's parse gives.
v1::ComputeRequest Reassembled(const codec::DecodedComputeRequest& decoded,
                               const codec::ReceivedMessage& message) {
  v1::ComputeRequest request = decoded.request;
  if (decoded.a_raw) request.mutable_a()->set_raw(Gather(message, *decoded.a_raw));
  if (decoded.b_raw) request.mutable_b()->set_raw(Gather(message, *decoded.b_raw));
  return request;
}

void CheckSpec(const ProblemSpec& s, RequestKind kind, const LimitsConfig& limits) {
  const kernels::Shape& p = s.shape;
  Check(p.batch > 0 && p.n > 0 && p.m > 0 && p.d > 0, "non-positive dimension accepted");
  Check(s.a_bytes == p.batch * p.n * p.d * static_cast<int64_t>(kernels::SizeOf(s.a_dtype)),
        "a_bytes");
  Check(s.from_gallery
            ? s.b_bytes == 0
            : s.b_bytes == p.batch * p.m * p.d * static_cast<int64_t>(kernels::SizeOf(s.b_dtype)),
        "b_bytes");
  Check(s.flops == 2 * p.batch * p.n * p.m * p.d && s.flops <= limits.max_flops, "flops");
  Check(s.output_cols == (s.options.top_k > 0 ? s.options.top_k : p.m), "output_cols");
  Check(s.output_bytes == p.batch * p.n * (s.value_row_bytes + s.index_row_bytes) &&
            s.output_bytes <= limits.max_output_bytes,
        "output_bytes");
  Check(s.tile_rows >= 1 && s.tile_rows <= p.n, "tile_rows");
  Check(s.TileCount() >= p.batch && s.InflightBytes(kind, 3) >= s.a_bytes + s.b_bytes,
        "tiles or in-flight bytes");
  Check(s.OutputShape().size() == (s.two_d ? 2U : 3U), "output shape");
}

bool SameSpec(const ProblemSpec& x, const ProblemSpec& y) {
  return x.shape.batch == y.shape.batch && x.shape.n == y.shape.n && x.shape.m == y.shape.m &&
         x.shape.d == y.shape.d && x.a_dtype == y.a_dtype && x.b_dtype == y.b_dtype &&
         x.a_bytes == y.a_bytes && x.b_bytes == y.b_bytes && x.output_bytes == y.output_bytes &&
         x.chunk_bytes == y.chunk_bytes && x.tile_rows == y.tile_rows &&
         x.options.top_k == y.options.top_k && x.options.metric == y.options.metric;
}

// Copies `bytes` of a view into an aligned buffer (reading all of it: ASan checks that the
// view lies inside the message), as the pipeline's ingest does before the kernel runs.
AlignedBuffer Ingest(const kernels::ConstTensorView& view, int64_t bytes) {
  AlignedBuffer buffer = AllocateAligned(std::max<int64_t>(bytes, 1));
  Check(buffer.get() != nullptr, "allocation");
  std::memcpy(buffer.get(), view.data, static_cast<size_t>(bytes));
  return buffer;
}

void Compute(State& state, const ConvertedRequest& converted) {
  const ProblemSpec& spec = converted.spec;
  const AlignedBuffer a = Ingest(converted.a, spec.a_bytes);
  std::optional<AlignedBuffer> b;
  absl::StatusOr<std::unique_ptr<kernels::SimilarityJob>> job;
  if (spec.from_gallery) {
    job = state.engine->Prepare(spec.shape, spec.options, *state.gallery);
  } else {
    b = Ingest(converted.b, spec.b_bytes);
    job = state.engine->Prepare(spec.shape, spec.options, {b->get(), spec.b_dtype});
  }
  Check(job.ok(), "the kernel refuses a validated problem");
  Check((*job)->output_cols() == spec.output_cols &&
            (*job)->ValueBytes(1) == static_cast<size_t>(spec.value_row_bytes),
        "kernel and validation disagree on the output size");
  const int64_t rows = spec.shape.batch * spec.shape.n;
  std::vector<std::byte> values((*job)->ValueBytes(rows));
  std::vector<int32_t> indices(static_cast<size_t>(rows * spec.options.top_k));
  const absl::Status status =
      kernels::ComputeAll(**job, {a.get(), spec.a_dtype}, spec.tile_rows, values, indices);
  Check(status.ok(), "the kernel fails on a validated, finite problem");
  for (const int32_t index : indices) {
    Check(index >= 0 && index < spec.shape.m, "top-k index out of range");
  }
}

void FuzzComputeRequest(const uint8_t* data, size_t size) {
  State& state = GetState();
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  const auto one = Received(bytes, 1);
  const auto three = Received(bytes, 3);
  auto decoded = codec::DecodeComputeRequest(*one);
  auto decoded3 = codec::DecodeComputeRequest(*three);
  Check(decoded.ok() == decoded3.ok(), "decoding depends on the slicing");
  v1::ComputeRequest parsed;
  const bool parsed_ok = parsed.ParseFromArray(data, static_cast<int>(size));
  if (!decoded.ok()) {
    Check(decoded.status().code() == absl::StatusCode::kInvalidArgument, "decode error code");
    return;
  }
  // Protobuf accepts a few encodings the decoder refuses (groups); never the reverse.
  Check(parsed_ok, "the decoder accepts bytes protobuf refuses");
  const std::string reassembled = Reassembled(*decoded, *one).SerializeAsString();
  Check(reassembled == Reassembled(*decoded3, *three).SerializeAsString(),
        "decoding depends on the slicing");
  Check(reassembled == parsed.SerializeAsString(), "decoding differs from protobuf's parse");
  Check(decoded->a_raw.has_value() == (parsed.a().data_case() == v1::Tensor::kRaw) &&
            decoded->b_raw.has_value() == (parsed.b().data_case() == v1::Tensor::kRaw),
        "raw payload ranges differ from protobuf's oneof");

  const RawPayloadSizes raw_sizes{.a = decoded->a_raw ? decoded->a_raw->size : 0,
                                  .b = decoded->b_raw ? decoded->b_raw->size : 0};
  const GalleryDims gallery_dims{.rank = 2, .m = State::kGallery.m, .d = State::kGallery.d};
  const GalleryDims* gallery = parsed.gallery().empty() ? nullptr : &gallery_dims;
  for (const LimitsConfig* limits : {&state.defaults, &state.small}) {
    for (const RequestKind kind :
         {RequestKind::kUnary, RequestKind::kStream, RequestKind::kUpload}) {
      RejectReason reason = RejectReason::kDraining;
      auto in_place = ConvertRequest(decoded->request, kind, *limits, &reason, &raw_sizes, gallery);
      auto converted = ConvertRequest(parsed, kind, *limits, nullptr, nullptr, gallery);
      Check(in_place.status() == converted.status(),
            "validation differs between the in-place decoding and protobuf's parse");
      if (!converted.ok()) {
        const absl::StatusCode code = converted.status().code();
        Check(code == absl::StatusCode::kInvalidArgument ||
                  code == absl::StatusCode::kResourceExhausted,
              "validation error code");
        Check(code != absl::StatusCode::kResourceExhausted || reason != RejectReason::kDraining,
              "RESOURCE_EXHAUSTED without a reject reason");
        continue;
      }
      Check(SameSpec(in_place->spec, converted->spec), "the two conversions' problems differ");
      CheckSpec(converted->spec, kind, *limits);
      if (kind == RequestKind::kUpload) {
        Check(converted->a.data == nullptr && converted->b.data == nullptr, "upload views");
        continue;
      }
      const ProblemSpec& spec = converted->spec;
      const int64_t a_count = spec.a_bytes / static_cast<int64_t>(kernels::SizeOf(spec.a_dtype));
      absl::Status finite = CheckFinite("a", converted->a.data, a_count, spec.a_dtype, 0);
      if (finite.ok() && !spec.from_gallery) {
        const int64_t b_count = spec.b_bytes / static_cast<int64_t>(kernels::SizeOf(spec.b_dtype));
        finite = CheckFinite("b", converted->b.data, b_count, spec.b_dtype, 0);
      }
      if (finite.ok() && kind == RequestKind::kUnary && spec.flops <= kMaxComputedFlops) {
        Compute(state, *converted);
      }
    }
  }
}

}  // namespace
}  // namespace simserve::fuzz

// libFuzzer's entry point. State persists across calls (GetState).
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  simserve::fuzz::FuzzComputeRequest(data, size);
  return 0;
}
