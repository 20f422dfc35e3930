// upload_fuzzer: arbitrary sequences of UploadRequest messages through the server's own
// ComputeUpload sequencing (UploadAssembler, the code UploadCall adapts) into a real
// TilePipeline on a real compute pool and kernel engine, driven as gRPC drives the call
// (server/upload_call_driver.h: a message only while reading is allowed, a half-close after
// the last record, writes completed by a fake transport, the call on the heap like its
// reactor). Headers, a_data and b_data come in any order, any size and any number of
// slices; the input may also cancel the call, fail a write or drain the server.
//
// Input (fuzz_common.h framing): options byte, then records whose kind is 0: a serialized
// UploadRequest as received, 1: a header (the payload is a ComputeRequest), 2: an a_data
// piece, 3: a b_data piece.
//
// Oracles: the call finishes exactly once (the driver aborts otherwise) with a status of the
// API contract and releases its in-flight reservation and buffered bytes; when it succeeds,
// its tiles cover the output once, in order, with the bytes the kernel computes from the
// same inputs in one go.
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "fuzz/fuzz_common.h"
#include "fuzz/fuzz_server.h"
#include "google/protobuf/stubs/logging.h"
#include "kernels/similarity.h"
#include "prometheus/registry.h"
#include "server/call_setup.h"
#include "server/gallery_store.h"
#include "server/upload_call_driver.h"
#include "server/wire_codec.h"
#include "simserve/v1/similarity.pb.h"

namespace simserve::fuzz {
namespace {

// Options byte.
constexpr uint8_t kSmallLimits = 1;  // tiny limits, read-ahead, window and budget
constexpr uint8_t kCancel = 2;       // the client goes away before record (options >> 4)
constexpr uint8_t kFailWrite = 4;    // the first write fails (the client went away)
constexpr uint8_t kDraining = 8;     // the server is draining
// Record kinds.
constexpr uint8_t kMessage = 0;
constexpr uint8_t kHeader = 1;
constexpr uint8_t kAData = 2;
constexpr uint8_t kBData = 3;

// A problem this small is recomputed in one go to check the streamed tiles.
constexpr int64_t kMaxCheckedFlops = 1'000'000;

// A server's worth of shared objects, built once per process (libFuzzer calls the entry
// point once per input) and reused by every call, as a server reuses them.
struct State {
  State() {
    google::protobuf::SetLogHandler(nullptr);  // invalid UTF-8 in names is logged otherwise
    // Declared sizes are allocated when the header is admitted: bounded so that the fuzzer
    // does not exhaust memory (the rules are the same code as with the defaults).
    // The pool's in-flight bound (below) is 64 MiB for the same reason.
    normal.limits.max_input_elements = int64_t{1} << 20;
    small.limits = {.max_input_elements = 256,
                    .max_flops = 100'000,
                    .max_output_bytes = 4096,
                    .max_send_message_bytes = kMessageOverheadBytes + 512,
                    .default_chunk_bytes = 48,
                    .max_chunk_bytes = 96};
    small.compute.upload_read_ahead_bytes = 24;
    small.compute.stream_window = 1;
    engine = MakeEngine();
    // A gallery for requests that name one: "g", [3, 4].
    auto spec =
        MakeGallerySpec("g", {3, 4}, kernels::DataType::kFloat32, kernels::DataType::kFloat32);
    Check(spec.ok(), "gallery spec");
    auto gallery =
        BuildGallery(*spec, GallerySource::kUploaded, "", 1, [](std::span<std::byte> in) {
          std::fill(in.begin(), in.end(), std::byte{0x3f});  // 0.747f everywhere
          return absl::OkStatus();
        });
    Check(gallery.ok() && galleries.Put(*std::move(gallery)).ok(), "gallery");
  }

  ServerConfig normal;
  ServerConfig small;
  prometheus::Registry registry;
  ServerMetrics metrics{registry, {"fuzz", "", ""}, {}};
  ServiceStats stats;
  std::shared_ptr<BufferPool> buffers = BufferPool::Create(int64_t{16} << 20);
  ComputePool pool{ComputePool::Options{.workers = 2, .max_inflight_bytes = int64_t{64} << 20},
                   &metrics};
  // With the small limits: one worker and a budget that uploads outgrow while they arrive.
  ComputePool tight_pool{
      ComputePool::Options{
          .workers = 1, .max_inflight_bytes = 1024, .max_inflight_bytes_per_peer = 768},
      &metrics};
  GalleryStore galleries{int64_t{1} << 20, &metrics};
  std::atomic<bool> draining{false};
  std::unique_ptr<kernels::SimilarityEngine> engine;
};

// The process's State.
State& GetState() {
  static State state;
  return state;
}

// The serialized UploadRequest of a record.
std::string MessageOf(const Record& record) {
  v1::UploadRequest request;
  switch (record.kind & 3) {
    case kMessage:
      return std::string(record.payload);
    case kHeader:
      // An unparsable payload leaves an empty request: an invalid header, still a header.
      (void)request.mutable_header()->mutable_request()->ParseFromArray(
          record.payload.data(), static_cast<int>(record.payload.size()));
      break;
    case kAData:
      request.set_a_data(std::string(record.payload));
      break;
    case kBData:
      request.set_b_data(std::string(record.payload));
      break;
  }
  return request.SerializeAsString();
}

// What the client sent of a and b, in order (the reference's inputs).
struct Sent {
  std::string a;
  std::string b;
  void Add(const codec::ReceivedMessage& message) {
    auto decoded = codec::DecodeUploadRequest(message);
    if (!decoded.ok()) return;
    std::string* to = decoded->part == v1::UploadRequest::kAData   ? &a
                      : decoded->part == v1::UploadRequest::kBData ? &b
                                                                   : nullptr;
    if (to == nullptr) return;
    for (const auto span : message.Spans(decoded->data)) {
      to->append(reinterpret_cast<const char*>(span.data()), span.size());
    }
  }
};

// A successful call's tiles against the kernel run in one go on what was sent.
void CheckTiles(State& state, const ProblemSpec& spec, const Sent& sent,
                const std::vector<std::unique_ptr<TileOutput>>& tiles) {
  int64_t batch = 0;
  int64_t row = 0;
  for (size_t i = 0; i < tiles.size(); ++i) {
    const TileOutput& tile = *tiles[i];
    Check(tile.batch == batch && tile.row_offset == row && tile.first == (i == 0),
          "tiles out of order");
    Check(tile.rows >= 1 && tile.rows <= spec.tile_rows && row + tile.rows <= spec.shape.n,
          "tile rows");
    Check(tile.values_bytes == tile.rows * spec.value_row_bytes &&
              tile.indices_bytes == tile.rows * spec.index_row_bytes,
          "tile sizes");
    row += tile.rows;
    if (row == spec.shape.n) {
      row = 0;
      ++batch;
    }
  }
  Check(batch == spec.shape.batch && row == 0, "tiles do not cover the output");
  Check(static_cast<int64_t>(sent.a.size()) == spec.a_bytes &&
            static_cast<int64_t>(sent.b.size()) == spec.b_bytes,
        "a successful call received other byte counts than its shapes");
  if (spec.flops > kMaxCheckedFlops) return;
  const AlignedBuffer a = AllocateAligned(spec.a_bytes);
  const AlignedBuffer b = AllocateAligned(std::max<int64_t>(spec.b_bytes, 1));
  std::memcpy(a.get(), sent.a.data(), sent.a.size());
  if (!sent.b.empty()) std::memcpy(b.get(), sent.b.data(), sent.b.size());
  absl::StatusOr<std::unique_ptr<kernels::SimilarityJob>> job;
  if (spec.from_gallery) {
    auto gallery = state.galleries.Get("g");
    Check(gallery.ok(), "gallery");
    job = state.engine->Prepare(spec.shape, spec.options, *(*gallery)->prepared);
  } else {
    job = state.engine->Prepare(spec.shape, spec.options, {b.get(), spec.b_dtype});
  }
  Check(job.ok(), "the kernel refuses a problem the call computed");
  const int64_t rows = spec.shape.batch * spec.shape.n;
  std::vector<std::byte> values((*job)->ValueBytes(rows));
  std::vector<int32_t> indices(static_cast<size_t>(rows * spec.options.top_k));
  Check(kernels::ComputeAll(**job, {a.get(), spec.a_dtype}, spec.tile_rows, values, indices).ok(),
        "the reference computation fails");
  for (const auto& tile : tiles) {
    const int64_t first = tile->batch * spec.shape.n + tile->row_offset;
    Check(std::memcmp(tile->values.get(), values.data() + first * spec.value_row_bytes,
                      static_cast<size_t>(tile->values_bytes)) == 0,
          "a streamed tile differs from the one-go result");
    Check(tile->indices_bytes == 0 ||
              std::memcmp(tile->indices.get(), indices.data() + first * spec.options.top_k,
                          static_cast<size_t>(tile->indices_bytes)) == 0,
          "streamed top-k indices differ from the one-go result");
  }
}

void FuzzUpload(const uint8_t* data, size_t size) {
  State& state = GetState();
  const Framed input = ParseFramed(data, size);
  state.draining = (input.options & kDraining) != 0;
  const bool small = (input.options & kSmallLimits) != 0;
  ComputePool& pool = small ? state.tight_pool : state.pool;
  const ServiceEnv env{small ? state.small : state.normal,
                       state.engine.get(),
                       &pool,
                       &state.metrics,
                       &state.stats,
                       state.buffers.get(),
                       &state.galleries,
                       &state.draining};
  UploadBehaviour behaviour{.fail_first_write = (input.options & kFailWrite) != 0};
  if ((input.options & kCancel) != 0) behaviour.cancel_before = input.options >> 4;
  std::vector<std::shared_ptr<codec::ReceivedMessage>> messages;
  for (const Record& record : input.records) {
    messages.push_back(Received(MessageOf(record), record.slices()));
  }
  const DrivenUpload upload = DriveUpload(env, messages, behaviour);
  Sent sent;
  for (size_t i = 0; i < upload.delivered; ++i) sent.Add(*messages[i]);
  Check(pool.inflight_bytes() == 0, "the in-flight reservation outlives the call");
  Check(state.stats.stream_buffered_bytes.load() == 0, "buffered tile bytes outlive the call");
  switch (upload.status.code()) {
    case absl::StatusCode::kOk:
      CheckTiles(state, upload.spec, sent, upload.tiles);
      break;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kResourceExhausted:
    case absl::StatusCode::kCancelled:
    case absl::StatusCode::kNotFound:            // an unknown gallery
    case absl::StatusCode::kFailedPrecondition:  // a gallery version that is not current
    case absl::StatusCode::kUnavailable:         // draining
      break;
    default:
      Check(false, "a status outside the API contract");
  }
}

}  // namespace
}  // namespace simserve::fuzz

// libFuzzer's entry point. State persists across calls (GetState).
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  simserve::fuzz::FuzzUpload(data, size);
  return 0;
}
