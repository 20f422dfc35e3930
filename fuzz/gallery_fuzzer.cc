// gallery_fuzzer: gallery registration from arbitrary sequences of RegisterGalleryRequest
// messages. Each message arrives as a grpc::ByteBuffer and is decoded in place
// (codec::DecodeRegisterGalleryRequest); the header becomes a spec (GallerySpecFromHeader),
// is checked against the store (GalleryStore::CheckRoom) and creates the GalleryBuilder;
// data pieces are copied into its input at their offsets; at the end of the stream the
// gallery is checked and prepared (FinishGallery), stored (GalleryStore::Put) and queried
// once through the kernel (SimilarityEngine::Prepare with the prepared gallery). The order
// rules (header first and once, no more and no fewer bytes than declared) are RegisterCall's
// in service.cc, restated here because that reactor interleaves them with its copy tasks.
// Declared sizes are capped at kMaxGalleryBytes so the fuzzer does not exhaust memory;
// the server's own limits (MakeGallerySpec, the store's budget) still apply below that.
//
// Input (fuzz_common.h framing): options byte (bits 0-1: the query's metric, bit 2: top-k),
// then records whose kind is 0: a serialized RegisterGalleryRequest as received, 1: a header
// (the payload is a GalleryHeader), 2 and 3: a data piece.
//
// Oracles: errors are INVALID_ARGUMENT or RESOURCE_EXHAUSTED; a built gallery has the
// shape, storage and byte count its spec states (PreparedGallery::BytesFor), finite norms
// and unit rows, is stored under the next version, and answers a query of its dimensions.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "fuzz/fuzz_common.h"
#include "fuzz/fuzz_server.h"
#include "google/protobuf/stubs/logging.h"
#include "kernels/gallery.h"
#include "kernels/similarity.h"
#include "server/convert.h"
#include "server/gallery_store.h"
#include "server/wire_codec.h"
#include "simserve/v1/similarity.pb.h"

namespace simserve::fuzz {
namespace {

constexpr int64_t kMaxGalleryBytes = int64_t{4} << 20;  // the harness's cap (see above)
constexpr int64_t kQueryRows = 2;

// Built once per process (libFuzzer calls the entry point once per input) and kept across
// inputs, as a server keeps them: the engine and the store (its versions and evictions
// carry over from input to input).
struct State {
  State() {
    google::protobuf::SetLogHandler(nullptr);  // invalid UTF-8 in names is logged otherwise
    engine = MakeEngine();
  }
  std::unique_ptr<kernels::SimilarityEngine> engine;
  GalleryStore store{2 * kMaxGalleryBytes, nullptr};
};

// The process's State.
State& GetState() {
  static State state;
  return state;
}

// The message of a record, serialized as a client would send it.
std::string MessageOf(const Record& record) {
  if ((record.kind & 3) == 0) return std::string(record.payload);
  v1::RegisterGalleryRequest request;
  if ((record.kind & 3) == 1) {
    // An unparsable payload leaves an empty header: an invalid one, still a header.
    (void)request.mutable_header()->ParseFromArray(record.payload.data(),
                                                   static_cast<int>(record.payload.size()));
  } else {
    request.set_data(std::string(record.payload));
  }
  return request.SerializeAsString();
}

void CheckError(const absl::Status& status) {
  Check(status.code() == absl::StatusCode::kInvalidArgument ||
            status.code() == absl::StatusCode::kResourceExhausted,
        "a registration error outside the API contract");
}

// A registration in progress: what RegisterCall holds between messages.
struct Registration {
  std::optional<GallerySpec> spec;
  std::unique_ptr<kernels::GalleryBuilder> builder;
  int64_t received = 0;
  absl::Time started;
};

// One message; false when the registration ends here (an error, or over the harness's cap).
bool Accept(State& state, Registration& r, const codec::ReceivedMessage& message) {
  auto decoded = codec::DecodeRegisterGalleryRequest(message);
  if (!decoded.ok()) {
    CheckError(decoded.status());
    return false;
  }
  if (decoded->part == v1::RegisterGalleryRequest::kHeader) {
    if (r.spec.has_value()) return false;  // a second header
    auto spec = GallerySpecFromHeader(decoded->header);
    if (!spec.ok()) {
      CheckError(spec.status());
      return false;
    }
    Check(spec->input_bytes ==
              spec->dims.rows() * spec->dims.d * static_cast<int64_t>(kernels::SizeOf(spec->dtype)),
          "input_bytes is not prod(shape) * sizeof(dtype)");
    Check(
        spec->prepared_bytes == kernels::PreparedGallery::BytesFor(spec->dims, spec->storage_dtype),
        "prepared_bytes");
    if (spec->input_bytes > kMaxGalleryBytes || spec->prepared_bytes > kMaxGalleryBytes) {
      return false;  // the harness's cap
    }
    if (absl::Status room =
            state.store.CheckRoom(spec->name, GallerySource::kUploaded, spec->prepared_bytes);
        !room.ok()) {
      CheckError(room);
      return false;
    }
    auto builder = kernels::GalleryBuilder::Create(spec->dims, spec->dtype, spec->storage_dtype);
    Check(builder.ok(), "a valid spec's builder cannot be created");
    Check(static_cast<int64_t>((*builder)->input().size()) == spec->input_bytes &&
              (*builder)->PeakBytes() >= spec->input_bytes,
          "the builder's input is not the spec's");
    r.spec = *std::move(spec);
    r.builder = *std::move(builder);
    r.started = absl::Now();
    return true;
  }
  if (decoded->part != v1::RegisterGalleryRequest::kData || !r.spec.has_value()) return false;
  const int64_t offset = r.received;
  r.received += decoded->data.size;
  if (r.received > r.spec->input_bytes) return false;  // more bytes than declared
  std::byte* out = r.builder->input().data() + offset;
  for (const auto span : message.Spans(decoded->data)) {
    std::memcpy(out, span.data(), span.size());
    out += span.size();
  }
  return true;
}

// Queries `gallery` with kQueryRows rows of ones per batch entry.
void Query(State& state, const kernels::PreparedGallery& gallery, uint8_t options) {
  const kernels::GalleryShape& g = gallery.shape();
  const kernels::Shape shape{.batch = g.entries, .n = kQueryRows, .m = g.m, .d = g.d};
  kernels::Options query{.metric = static_cast<kernels::Metric>(options & 3)};
  if ((options & 4) != 0) query.top_k = std::min<int64_t>(g.m, 3);
  auto job = state.engine->Prepare(shape, query, gallery);
  Check(job.ok(), "a stored gallery refuses a query of its dimensions");
  const std::vector<float> a(static_cast<size_t>(shape.batch * shape.n * shape.d), 1.0F);
  const int64_t rows = shape.batch * shape.n;
  std::vector<std::byte> values((*job)->ValueBytes(rows));
  std::vector<int32_t> indices(static_cast<size_t>(rows * query.top_k));
  Check(
      kernels::ComputeAll(**job, {reinterpret_cast<const std::byte*>(a.data())}, 0, values, indices)
          .ok(),
      "a query against a stored gallery fails");
  for (const int32_t index : indices) Check(index >= 0 && index < g.m, "top-k index");
}

void FuzzGallery(const uint8_t* data, size_t size) {
  State& state = GetState();
  const Framed input = ParseFramed(data, size);
  Registration r;
  for (const Record& record : input.records) {
    if (!Accept(state, r, *Received(MessageOf(record), record.slices()))) return;
  }
  if (!r.spec.has_value() || r.received != r.spec->input_bytes) return;  // too few bytes
  auto gallery =
      FinishGallery(*r.spec, std::move(r.builder), GallerySource::kUploaded, "", 1, r.started);
  if (!gallery.ok()) {
    CheckError(gallery.status());
    return;
  }
  const kernels::PreparedGallery& prepared = *(*gallery)->prepared;
  Check(prepared.shape().entries == r.spec->dims.entries && prepared.shape().m == r.spec->dims.m &&
            prepared.shape().d == r.spec->dims.d &&
            prepared.storage_dtype() == r.spec->storage_dtype &&
            (*gallery)->bytes() == r.spec->prepared_bytes,
        "the prepared gallery is not what its spec states");
  const int64_t d = prepared.shape().d;
  for (int64_t e = 0; e < prepared.shape().entries; ++e) {
    for (int64_t j = 0; j < prepared.shape().m; ++j) {
      const float norm = prepared.norms(e)[j];
      Check(!std::isnan(norm) && norm >= 0 && prepared.sq_norms(e)[j] >= 0, "bad norm");
      if (prepared.storage_dtype() != kernels::DataType::kFloat32) continue;
      for (int64_t k = 0; k < d; ++k) {  // unit rows: every element within [-1, 1]
        float unit = 0;
        std::memcpy(&unit, prepared.unit_rows(e) + (j * d + k) * 4, 4);
        Check(std::fabs(unit) <= 1.0001F, "a unit row element outside [-1, 1]");
      }
    }
  }
  const int64_t previous =
      state.store.Get(r.spec->name).ok() ? (*state.store.Get(r.spec->name))->version : 0;
  auto stored = state.store.Put(*std::move(gallery));
  if (!stored.ok()) {
    CheckError(stored.status());
    return;
  }
  Check((*stored)->version > previous, "a new version is not newer");
  Query(state, *(*stored)->prepared, input.options);
}

}  // namespace
}  // namespace simserve::fuzz

// libFuzzer's entry point. State persists across calls (GetState).
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  simserve::fuzz::FuzzGallery(data, size);
  return 0;
}
