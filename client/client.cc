// Implementation of simserve::Client over gRPC's public generic API: every Compute call
// sends a grpc::ByteBuffer whose tensor slices reference the caller's memory (client/wire.h)
// and decodes the received ByteBuffers itself, so that every result byte is copied exactly
// once, from the received slices into its final place (the caller's OutputRef or the
// Result's buffers). Calls run on grpc::GenericStub's async API (PrepareUnaryCall,
// PrepareCall), each on a private CompletionQueue driven by the calling thread. RegisterGallery
// is a client stream on the same machinery; the other gallery calls are small typed unary
// calls.
#include "client/client.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "client/wire.h"
#include "grpcpp/client_context.h"
#include "grpcpp/completion_queue.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/async_stream.h"
#include "grpcpp/support/async_unary_call.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/channel_arguments.h"
#include "kernels/dtype.h"

namespace simserve {
namespace {

// Framing slack assumed when the server does not report message_overhead_bytes (older
// servers; today's value of the server's own definition).
constexpr int64_t kDefaultMessageOverheadBytes = 4096;
constexpr int64_t kGrpcDefaultMessageBytes = int64_t{4} << 20;

std::string MethodName(const char* method) {
  return absl::StrCat("/", v1::Similarity::service_full_name(), "/", method);
}

// The one place that turns a gRPC status into an absl::Status (the codes are numerically
// identical by design).
absl::Status ToAbsl(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

double MillisSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

// A ComputeRequest with shapes, dtypes and options but no tensor data (the data goes into
// the wire encoding by reference); without `b` for a gallery call.
v1::ComputeRequest RequestHeader(const TensorRef& a, const TensorRef& b,
                                 const ComputeOptions& options) {
  v1::ComputeRequest request;
  request.mutable_a()->mutable_shape()->Assign(a.shape.begin(), a.shape.end());
  request.mutable_a()->set_dtype(a.dtype);
  if (options.gallery.empty()) {
    request.mutable_b()->mutable_shape()->Assign(b.shape.begin(), b.shape.end());
    request.mutable_b()->set_dtype(b.dtype);
  } else {  // the gallery plays B: `b` stays absent
    request.set_gallery(options.gallery);
    request.set_gallery_version(options.gallery_version);
  }
  request.set_metric(options.metric);
  request.set_output_dtype(options.output_dtype);
  request.set_precision(options.precision);
  request.set_top_k(options.top_k);
  request.set_epsilon(options.epsilon);
  request.set_max_chunk_bytes(options.max_chunk_bytes);
  return request;
}

// Reads simserve-{queue,compute,total}-ms from the trailing metadata.
ServerTimings ParseTimings(const grpc::ClientContext& context) {
  ServerTimings timings;
  const auto& trailers = context.GetServerTrailingMetadata();
  const auto read = [&trailers](const char* key) -> std::optional<double> {
    const auto it = trailers.find(key);
    double value = 0;
    if (it == trailers.end() ||
        !absl::SimpleAtod(absl::string_view(it->second.data(), it->second.size()), &value)) {
      return std::nullopt;
    }
    return value;
  };
  timings.queue_ms = read("simserve-queue-ms");
  timings.compute_ms = read("simserve-compute-ms");
  timings.total_ms = read("simserve-total-ms");
  return timings;
}

// Checks that `out` has exactly the sizes `spec` needs.
absl::Status CheckOutputRef(const OutputSpec& spec, const OutputRef& out) {
  if (static_cast<int64_t>(out.values.size()) != spec.values_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("OutputRef.values has ", out.values.size(), " bytes; the result [",
                     absl::StrJoin(spec.shape, ","), "] of ", v1::DataType_Name(spec.dtype),
                     " needs ", spec.values_bytes));
  }
  const int64_t want_indices = spec.indices_bytes / static_cast<int64_t>(sizeof(int32_t));
  if (static_cast<int64_t>(out.indices.size()) != want_indices) {
    return absl::InvalidArgumentError(
        absl::StrCat("OutputRef.indices has ", out.indices.size(), " elements; the result [",
                     absl::StrJoin(spec.shape, ","), "] needs ", want_indices,
                     spec.indices_bytes == 0 ? " (dense results have no indices)" : ""));
  }
  return absl::OkStatus();
}

// The sizes of a result of `shape` and `dtype` (top-k adds an int32 index per element).
// RESOURCE_EXHAUSTED when a partial product of the shape or the byte total overflows int64.
absl::StatusOr<OutputSpec> SizedSpec(std::vector<int64_t> shape, v1::DataType dtype, bool top_k) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  const int64_t per_element = ElementBytes(dtype) + (top_k ? 4 : 0);
  int64_t elements = 1;
  bool overflow = false;
  for (const int64_t dim : shape) {
    if (dim > 0 && elements > kMax / dim) {
      overflow = true;
      break;
    }
    elements *= dim;
  }
  if (overflow || elements > kMax / per_element) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the result [", absl::StrJoin(shape, ","), "] would exceed 2^63 bytes"));
  }
  OutputSpec spec;
  spec.shape = std::move(shape);
  spec.dtype = dtype;
  spec.elements = elements;
  spec.values_bytes = elements * ElementBytes(dtype);
  spec.indices_bytes = top_k ? elements * 4 : 0;
  return spec;
}

// The result a request gives. For a dense gallery call the gallery's M is not known here:
// the spec's last dimension is then -1 (and its sizes 0) until the result's first message.
absl::StatusOr<OutputSpec> ExpectedOutput(const TensorRef& a, const TensorRef& b,
                                          const ComputeOptions& options) {
  if (options.gallery.empty()) return OutputSize(a.shape, b.shape, options);
  if (!b.shape.empty() || !b.data.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("b must be empty (TensorRef{}) when ComputeOptions::gallery names the "
                     "gallery that plays B (gallery '",
                     options.gallery, "', b of shape [", absl::StrJoin(b.shape, ","), "] and ",
                     b.data.size(), " bytes)"));
  }
  const int64_t dim = a.shape.empty() ? 0 : a.shape.back();
  auto spec = OutputSize(a.shape, std::vector<int64_t>{0, dim}, options);
  if (!spec.ok() || options.top_k > 0) return spec;
  spec->shape.back() = -1;
  spec->elements = 0;
  spec->values_bytes = 0;
  return spec;
}

// A CompletionQueue private to one call, driven by the calling thread: gRPC's async API.
// The thread that waits in Next() also polls the connection, as with the synchronous API,
// so nothing is handed to gRPC's callback threads (ClientBidiReactor measured 10-25 % more
// client CPU per seed call than this, at the same wall time; see client/README.md).
class CallQueue {
 public:
  // The operations a call can have in flight.
  enum class Op : uint8_t { kStart, kWrite, kRead, kFinish };

  CallQueue() = default;
  CallQueue(const CallQueue&) = delete;
  CallQueue& operator=(const CallQueue&) = delete;
  ~CallQueue() {
    queue_.Shutdown();
    void* tag = nullptr;
    bool ok = false;
    while (queue_.Next(&tag, &ok)) {
    }
  }

  grpc::CompletionQueue* get() { return &queue_; }
  // The tag of `op`: the address of its byte in tags_.
  void* Tag(Op op) { return &tags_[static_cast<size_t>(op)]; }
  // Waits for the next completed operation; false only after Shutdown.
  bool Next(Op* op, bool* ok) {
    void* tag = nullptr;
    if (!queue_.Next(&tag, ok)) return false;
    *op = static_cast<Op>(static_cast<char*>(tag) - tags_.data());
    return true;
  }

 private:
  grpc::CompletionQueue queue_;
  std::array<char, 4> tags_{};
};

// Runs one streaming call — ComputeStream, ComputeUpload or RegisterGallery (on the wire
// every streaming method is a bidi stream; a server stream has one request, a client stream
// one response). The requests (encoded, referencing the caller's tensors) are written one
// after another, the last one with the half-close, while the next response is always being
// read: each is handed to `on_message(grpc::ByteBuffer&)` as soon as it arrives (full
// duplex, one thread), which decodes it and copies its payload into place. A non-OK status
// from `on_message` (a malformed result) cancels the call and is returned in place of the
// gRPC status.
template <typename OnMessage>
absl::Status RunStream(grpc::GenericStub& stub, const std::string& method,
                       grpc::ClientContext* context, const std::vector<grpc::ByteBuffer>& requests,
                       OnMessage on_message) {
  using Op = CallQueue::Op;
  CallQueue queue;
  const auto call = stub.PrepareCall(context, method, queue.get());
  call->StartCall(queue.Tag(Op::kStart));
  Op op{};
  bool ok = false;
  if (!queue.Next(&op, &ok)) return absl::InternalError("completion queue shut down");
  bool writing = false;
  bool reading = false;
  size_t next_request = 0;
  const auto write_next = [&] {
    if (next_request == requests.size()) return;
    const grpc::ByteBuffer& request = requests[next_request++];
    if (next_request == requests.size()) {
      call->WriteLast(request, grpc::WriteOptions(), queue.Tag(Op::kWrite));
    } else {
      call->Write(request, queue.Tag(Op::kWrite));
    }
    writing = true;
  };
  grpc::ByteBuffer response;
  absl::Status assembly_status;
  if (ok) {  // else the call never started: Finish says why
    write_next();
    call->Read(&response, queue.Tag(Op::kRead));
    reading = true;
  }
  while ((writing || reading) && queue.Next(&op, &ok)) {
    if (op == Op::kWrite) {
      writing = false;
      if (ok) write_next();  // else the call is over: stop writing, Finish says why
    } else if (op == Op::kRead) {
      reading = false;
      if (!ok) continue;  // end of the stream (or a failed call)
      if (assembly_status.ok()) {
        assembly_status = on_message(response);
        if (!assembly_status.ok()) context->TryCancel();
      }
      call->Read(&response, queue.Tag(Op::kRead));  // drain after a cancel too
      reading = true;
    }
  }
  grpc::Status status;
  call->Finish(&status, queue.Tag(Op::kFinish));
  while (queue.Next(&op, &ok) && op != Op::kFinish) {
  }
  if (!assembly_status.ok()) return assembly_status;
  return ToAbsl(status);
}

// The requests of a ComputeUpload call: the header, then each batch entry's B and then its
// A, in pieces of at most `piece` bytes that reference the caller's memory. The server
// computes batch entry k as soon as B[k] and A[k] are in, so interleaving overlaps the
// upload with the computation from the first entry on (all of B first would make every
// tile wait for the whole of B).
std::vector<grpc::ByteBuffer> UploadRequests(const TensorRef& a, const TensorRef& b,
                                             const ComputeOptions& options, size_t piece) {
  std::vector<grpc::ByteBuffer> requests;
  const size_t batch =
      a.shape.size() == 3 && a.shape[0] > 0 ? static_cast<size_t>(a.shape[0]) : size_t{1};
  requests.reserve(1 + 2 * batch + (a.data.size() + b.data.size()) / piece);
  v1::UploadRequest header;
  *header.mutable_header()->mutable_request() = RequestHeader(a, b, options);
  requests.push_back(wire::EncodeMessage(header));
  // Batch entry k of a tensor: bytes [k * size / batch, (k + 1) * size / batch).
  auto entry = [batch](std::span<const std::byte> data, size_t k) {
    const size_t begin = k * data.size() / batch;
    return data.subspan(begin, (k + 1) * data.size() / batch - begin);
  };
  for (size_t k = 0; k < batch; ++k) {
    for (const auto& [field, data] : {std::pair{wire::UploadField::kBData, entry(b.data, k)},
                                      std::pair{wire::UploadField::kAData, entry(a.data, k)}}) {
      for (size_t offset = 0; offset < data.size(); offset += piece) {
        const size_t n = std::min(piece, data.size() - offset);
        requests.push_back(wire::EncodeUploadPiece(field, data.subspan(offset, n)));
      }
    }
  }
  return requests;
}

// Runs `call(Result*)`, which places the result in buffers it allocates in the Result
// (uninitialised: every byte is written exactly once by the call), and completes the Result.
template <typename Call>
absl::StatusOr<Result> IntoNewResult(Call call) {
  Result result;
  absl::StatusOr<CallInfo> info = call(&result);
  if (!info.ok()) return info.status();
  static_cast<CallInfo&>(result) = *std::move(info);
  return result;
}

// The requests of a RegisterGallery call: the header, then the gallery's bytes in pieces of
// at most `piece` bytes that reference the caller's memory.
std::vector<grpc::ByteBuffer> GalleryRequests(const std::string& name, const TensorRef& gallery,
                                              const GalleryOptions& options, size_t piece) {
  std::vector<grpc::ByteBuffer> requests;
  requests.reserve(2 + gallery.data.size() / piece);
  v1::RegisterGalleryRequest header;
  v1::GalleryHeader* fields = header.mutable_header();
  fields->set_name(name);
  fields->mutable_shape()->Assign(gallery.shape.begin(), gallery.shape.end());
  fields->set_dtype(gallery.dtype);
  fields->set_storage_dtype(options.storage_dtype);
  requests.push_back(wire::EncodeMessage(header));
  for (size_t offset = 0; offset < gallery.data.size(); offset += piece) {
    const size_t n = std::min(piece, gallery.data.size() - offset);
    requests.push_back(
        wire::EncodeUploadPiece(wire::UploadField::kGalleryData, gallery.data.subspan(offset, n)));
  }
  return requests;
}

// The rows M of a gallery of `shape` ([M, D] or [batch, M, D]); -1 for any other rank.
int64_t GalleryRowsOf(const v1::GalleryInfo& info) {
  const int n = info.shape_size();
  return n == 2 || n == 3 ? info.shape(n - 2) : -1;
}

}  // namespace

// Checks result messages (one unary response, or a stream of chunks that must cover the
// output exactly once in (batch, row) order) against the expected OutputSpec and copies
// their payloads from the received slices straight into place: the caller's OutputRef, or
// buffers allocated in a Result when the first message arrives. A dense gallery call's M is
// taken from that first message (its shape must be the expected one but for M).
class Client::ResultWriter {
 public:
  // `expected`: see ExpectedOutput (a last dimension of -1 = the gallery's M, still unknown).
  // The result goes to `out` (already checked against `expected` when that is complete) or,
  // with `result` set, into buffers allocated in *result.
  ResultWriter(OutputSpec expected, OutputRef out, Result* result)
      : spec_(std::move(expected)),
        out_(out),
        result_(result),
        batches_(spec_.shape.size() == 3 ? spec_.shape[0] : 1),
        rows_(spec_.shape[spec_.shape.size() - 2]),
        cols_(spec_.shape.back()) {}

  // The whole result in one ComputeResponse.
  absl::Status AddResponse(const wire::ResultView& view, const wire::ResultDecoder& decoder) {
    ++chunks_;
    if (absl::Status s = Begin(view, "response"); !s.ok()) return s;
    if (absl::Status s = CheckSizes(view, spec_.elements); !s.ok()) return s;
    decoder.CopyValues(view, out_.values.data());
    if (view.indices_size > 0) {
      decoder.CopyIndices(view, reinterpret_cast<std::byte*>(out_.indices.data()));
    }
    next_batch_ = batches_;
    return absl::OkStatus();
  }

  // The next ComputeChunk of a stream.
  absl::Status AddChunk(const wire::ResultView& chunk, const wire::ResultDecoder& decoder) {
    if (chunks_++ == 0) {
      if (absl::Status s = Begin(chunk, "first chunk"); !s.ok()) return s;
    } else if (chunk.dtype != spec_.dtype) {
      return Malformed(absl::StrCat("chunk dtype ", chunk.dtype, " differs from the first"));
    }
    if (next_batch_ >= batches_ || chunk.batch_index != next_batch_ ||
        chunk.row_offset != next_row_) {
      return Malformed(absl::StrCat("chunk at batch ", chunk.batch_index, " row ", chunk.row_offset,
                                    ", expected batch ", next_batch_, " row ", next_row_));
    }
    const int64_t count = chunk.row_count;
    if (count <= 0 || count > rows_ - next_row_) {
      return Malformed(
          absl::StrCat("chunk row_count ", count, " at row ", next_row_, " of ", rows_));
    }
    if (absl::Status s = CheckSizes(chunk, count * cols_); !s.ok()) return s;
    const int64_t first_element = (next_batch_ * rows_ + next_row_) * cols_;
    decoder.CopyValues(chunk, out_.values.data() + first_element * ElementBytes(spec_.dtype));
    if (chunk.indices_size > 0) {
      decoder.CopyIndices(chunk, reinterpret_cast<std::byte*>(out_.indices.data() + first_element));
    }
    next_row_ += count;
    if (next_row_ == rows_) {
      next_row_ = 0;
      ++next_batch_;
    }
    return absl::OkStatus();
  }

  // Checks that every row arrived.
  absl::Status Finish() const {
    if (chunks_ == 0) return Malformed("the call ended without any result message");
    if (next_batch_ != batches_) {
      return Malformed(absl::StrCat("the stream ended at batch ", next_batch_, " row ", next_row_,
                                    " of ", batches_, " batches"));
    }
    return absl::OkStatus();
  }

  // The result's spec (complete once the first message was added).
  const OutputSpec& spec() const { return spec_; }
  int64_t chunks() const { return chunks_; }

 private:
  static absl::Status Malformed(absl::string_view what) {
    return absl::InternalError(absl::StrCat("malformed result: ", what));
  }

  // The first message: completes a gallery call's spec, checks the full shape and dtype it
  // states and places the result.
  absl::Status Begin(const wire::ResultView& view, const char* what) {
    if (cols_ < 0) {
      const auto& want = spec_.shape;
      if (view.shape.size() != want.size() || view.shape.back() < 0 ||
          !std::equal(want.begin(), want.end() - 1, view.shape.begin())) {
        return Malformed(absl::StrCat(what, " has shape [", absl::StrJoin(view.shape, ","),
                                      "], expected [",
                                      absl::StrJoin(want.begin(), want.end() - 1, ","), ",M]"));
      }
      auto sized = SizedSpec(view.shape, spec_.dtype, /*top_k=*/false);
      if (!sized.ok()) return Malformed(sized.status().message());
      spec_ = *std::move(sized);
      cols_ = spec_.shape.back();
      if (result_ == nullptr) {
        if (absl::Status s = CheckOutputRef(spec_, out_); !s.ok()) {
          return absl::FailedPreconditionError(
              absl::StrCat("the gallery's result does not fit the OutputRef: ", s.message(),
                           " (was the gallery replaced? pin ComputeOptions::gallery_version)"));
        }
      }
    }
    if (absl::Status s = CheckHeader(view, what); !s.ok()) return s;
    if (result_ != nullptr) {
      result_->values.resize(static_cast<size_t>(spec_.values_bytes));
      result_->indices.resize(static_cast<size_t>(spec_.indices_bytes) / sizeof(int32_t));
      out_ = OutputRef{result_->values, result_->indices};
    }
    return absl::OkStatus();
  }

  // The full shape and the dtype, stated by a response and by the first chunk.
  absl::Status CheckHeader(const wire::ResultView& view, const char* what) const {
    if (!std::equal(view.shape.begin(), view.shape.end(), spec_.shape.begin(), spec_.shape.end())) {
      return Malformed(absl::StrCat(what, " has shape [", absl::StrJoin(view.shape, ","),
                                    "], expected [", absl::StrJoin(spec_.shape, ","), "]"));
    }
    if (view.dtype != spec_.dtype) {
      return Malformed(absl::StrCat(what, " has dtype ", view.dtype, ", expected ",
                                    v1::DataType_Name(spec_.dtype)));
    }
    return absl::OkStatus();
  }

  // Payload sizes of a message holding `elements` result elements.
  absl::Status CheckSizes(const wire::ResultView& view, int64_t elements) const {
    const auto value_bytes = static_cast<size_t>(elements * ElementBytes(spec_.dtype));
    if (view.values_size != value_bytes) {
      return Malformed(
          absl::StrCat("message has ", view.values_size, " value bytes, expected ", value_bytes));
    }
    const size_t index_bytes =
        spec_.indices_bytes > 0 ? static_cast<size_t>(elements) * sizeof(int32_t) : 0;
    if (view.indices_size != index_bytes) {
      return Malformed(
          absl::StrCat("message has ", view.indices_size, " index bytes, expected ", index_bytes));
    }
    return absl::OkStatus();
  }

  OutputSpec spec_;
  OutputRef out_;
  Result* result_;
  int64_t batches_;
  int64_t rows_;
  int64_t cols_;
  int64_t next_batch_ = 0;
  int64_t next_row_ = 0;
  int64_t chunks_ = 0;
};

const char* Name(CallMode mode) {
  switch (mode) {
    case CallMode::kAuto:
      return "auto";
    case CallMode::kUnary:
      return "unary";
    case CallMode::kStream:
      return "stream";
    case CallMode::kUpload:
      return "upload";
  }
  return "?";
}

TensorRef TensorRef::Float32(std::vector<int64_t> shape, std::span<const float> values) {
  return TensorRef{std::move(shape), v1::FLOAT32, std::as_bytes(values)};
}

int64_t ElementBytes(v1::DataType dtype) {
  // The proto's DataType values name the kernel's element types in the same order.
  const auto kernel_dtype = dtype == v1::BFLOAT16  ? kernels::DataType::kBFloat16
                            : dtype == v1::FLOAT16 ? kernels::DataType::kFloat16
                                                   : kernels::DataType::kFloat32;
  return static_cast<int64_t>(kernels::SizeOf(kernel_dtype));
}

absl::StatusOr<OutputSpec> OutputSize(std::span<const int64_t> a_shape,
                                      std::span<const int64_t> b_shape,
                                      const ComputeOptions& options) {
  const auto rank_ok = [](size_t rank) { return rank == 2 || rank == 3; };
  if (options.gallery.empty() && (!rank_ok(a_shape.size()) || b_shape.size() != a_shape.size())) {
    return absl::InvalidArgumentError(
        absl::StrCat("a and b must both be 2D [rows, dim] or both 3D [batch, rows, dim], got [",
                     absl::StrJoin(a_shape, ","), "] and [", absl::StrJoin(b_shape, ","), "]"));
  }
  if (!options.gallery.empty() && (!rank_ok(a_shape.size()) || !rank_ok(b_shape.size()))) {
    return absl::InvalidArgumentError(
        absl::StrCat("a must be 2D [rows, dim] or 3D [batch, rows, dim] and gallery '",
                     options.gallery, "' [M, dim] or [batch, M, dim], got [",
                     absl::StrJoin(a_shape, ","), "] and [", absl::StrJoin(b_shape, ","), "]"));
  }
  for (const auto shape : {a_shape, b_shape}) {
    if (std::any_of(shape.begin(), shape.end(), [](int64_t dim) { return dim < 0; })) {
      return absl::InvalidArgumentError(
          absl::StrCat("negative dimension in shape [", absl::StrJoin(shape, ","), "]"));
    }
  }
  // [batch, N, cols] or [N, cols], following A (a 2D gallery serves every batch entry).
  std::vector<int64_t> shape(a_shape.begin(), a_shape.end() - 1);
  shape.push_back(options.top_k > 0 ? static_cast<int64_t>(options.top_k)
                                    : b_shape[b_shape.size() - 2]);
  return SizedSpec(std::move(shape), options.output_dtype, options.top_k > 0);
}

int64_t Result::element_count() const {
  int64_t count = 1;
  for (const int64_t dim : shape) count *= dim;
  return shape.empty() ? 0 : count;
}

std::vector<float> Result::ValuesAsFloat() const {
  const size_t count = values.size() / static_cast<size_t>(ElementBytes(dtype));
  std::vector<float> out(count);
  if (dtype == v1::FLOAT32) {
    if (count > 0) std::memcpy(out.data(), values.data(), values.size());
  } else if (dtype == v1::BFLOAT16) {
    BFloat16ToFloat(values.data(), count, out.data());
  } else {
    HalfToFloat(values.data(), count, out.data());
  }
  return out;
}

absl::Status CheckBearerToken(std::string_view token) {
  for (size_t i = 0; i < token.size(); ++i) {
    const char c = token[i];
    if (c < '!' || c > '~') {
      const bool space = c == ' ' || c == '\t' || c == '\n' || c == '\r';
      return absl::InvalidArgumentError(
          absl::StrCat("the bearer token has ",
                       space ? "whitespace or a newline" : "a non-printable or non-ASCII byte",
                       " at position ", i, " (of ", token.size(),
                       "); give the token alone, without 'Bearer ' or a trailing newline"));
    }
  }
  return absl::OkStatus();
}

Client::Client(PassKey /*key*/, std::shared_ptr<grpc::Channel> channel,
               const ClientOptions& options)
    : options_(options),
      authorization_(options.bearer_token.empty() ? ""
                                                  : absl::StrCat("Bearer ", options.bearer_token)),
      channel_(std::move(channel)),
      stub_(v1::Similarity::NewStub(channel_)),
      generic_stub_(channel_) {}

Client::~Client() = default;

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(const std::string& target,
                                                        const ClientOptions& options) {
  if (target.empty()) return absl::InvalidArgumentError("empty target (want host:port)");
  if (options.upload_piece_bytes <= 0 || options.default_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        "ClientOptions: upload_piece_bytes and default_timeout must be positive");
  }
  if (absl::Status s = CheckBearerToken(options.bearer_token); !s.ok()) return s;
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(options.max_receive_message_bytes);
  args.SetMaxSendMessageSize(options.max_send_message_bytes);
  auto credentials =
      options.credentials != nullptr ? options.credentials : grpc::InsecureChannelCredentials();
  auto channel = grpc::CreateCustomChannel(target, credentials, args);
  if (options.connect_timeout > absl::ZeroDuration() &&
      !channel->WaitForConnected(absl::ToChronoTime(absl::Now() + options.connect_timeout))) {
    return absl::UnavailableError(absl::StrCat("cannot connect to ", target, " within ",
                                               absl::FormatDuration(options.connect_timeout)));
  }
  return std::make_unique<Client>(PassKey(), std::move(channel), options);
}

void Client::PrepareContext(grpc::ClientContext& context, absl::Duration timeout) const {
  context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  // Per-call metadata rather than call credentials: gRPC sends those only on secure channels.
  if (!authorization_.empty()) context.AddMetadata("authorization", authorization_);
}

absl::StatusOr<v1::GetInfoResponse> Client::GetInfo(std::optional<absl::Duration> timeout) {
  grpc::ClientContext context;
  PrepareContext(context, timeout.value_or(options_.default_timeout));
  v1::GetInfoResponse response;
  const grpc::Status status = stub_->GetInfo(&context, v1::GetInfoRequest(), &response);
  if (!status.ok()) return ToAbsl(status);
  return response;
}

absl::StatusOr<CallInfo> Client::Unary(const TensorRef& a, const TensorRef& b,
                                       const ComputeOptions& options, ResultWriter& writer) {
  const auto start = std::chrono::steady_clock::now();
  grpc::ClientContext context;
  PrepareContext(context, options.timeout.value_or(options_.default_timeout));
  // The tensors' bytes are referenced by the request buffer, not copied; the response is
  // decoded from its received slices, not parsed into protobuf strings first.
  const grpc::ByteBuffer request =
      wire::EncodeComputeRequest(RequestHeader(a, b, options), a.data, b.data);
  grpc::ByteBuffer response;
  grpc::Status status;
  {
    CallQueue queue;
    const auto call =
        generic_stub_.PrepareUnaryCall(&context, MethodName("Compute"), request, queue.get());
    call->StartCall();
    call->Finish(&response, &status, queue.Tag(CallQueue::Op::kFinish));
    CallQueue::Op op{};
    bool ok = false;
    while (queue.Next(&op, &ok) && op != CallQueue::Op::kFinish) {
    }
  }
  if (!status.ok()) return ToAbsl(status);
  wire::ResultDecoder decoder;
  wire::ResultView view;
  if (absl::Status s = decoder.DecodeResponse(response, &view); !s.ok()) return s;
  if (absl::Status s = writer.AddResponse(view, decoder); !s.ok()) return s;
  CallInfo info;
  info.shape = writer.spec().shape;
  info.dtype = writer.spec().dtype;
  info.mode = CallMode::kUnary;
  info.chunks = 1;
  info.server = ParseTimings(context);
  info.client_wall_ms = MillisSince(start);
  return info;
}

absl::StatusOr<CallInfo> Client::Streamed(CallMode mode, const TensorRef& a, const TensorRef& b,
                                          const ComputeOptions& options, ResultWriter& writer) {
  const auto start = std::chrono::steady_clock::now();
  const absl::Duration timeout = options.timeout.value_or(options_.default_timeout);
  std::vector<grpc::ByteBuffer> requests;
  if (mode == CallMode::kStream) {
    requests.push_back(wire::EncodeComputeRequest(RequestHeader(a, b, options), a.data, b.data));
  } else {
    // Pieces must fit the server's max receive message size (known from one cached GetInfo;
    // if that fails the configured size is used and the server's answer tells the story).
    int64_t piece = options_.upload_piece_bytes;
    if (auto limits = CachedLimits(timeout); limits.ok()) piece = UploadPieceBytes(piece, *limits);
    requests = UploadRequests(a, b, options, static_cast<size_t>(piece));
  }
  grpc::ClientContext context;
  PrepareContext(context, timeout);
  wire::ResultDecoder decoder;
  wire::ResultView view;
  const auto on_chunk = [&](grpc::ByteBuffer& chunk) {
    if (absl::Status s = decoder.DecodeChunk(chunk, &view); !s.ok()) return s;
    return writer.AddChunk(view, decoder);
  };
  if (absl::Status s = RunStream(
          generic_stub_, MethodName(mode == CallMode::kStream ? "ComputeStream" : "ComputeUpload"),
          &context, requests, on_chunk);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = writer.Finish(); !s.ok()) return s;
  CallInfo info;
  info.shape = writer.spec().shape;
  info.dtype = writer.spec().dtype;
  info.mode = mode;
  info.chunks = writer.chunks();
  info.server = ParseTimings(context);
  info.client_wall_ms = MillisSince(start);
  return info;
}

absl::StatusOr<CallInfo> Client::Run(CallMode mode, const TensorRef& a, const TensorRef& b,
                                     const ComputeOptions& options, OutputRef out, Result* result) {
  auto expected = ExpectedOutput(a, b, options);
  if (!expected.ok()) return expected.status();
  // A complete spec is checked before anything is sent; a gallery call's M only when the
  // result's shape arrives (ResultWriter).
  if (result == nullptr && expected->shape.back() >= 0) {
    if (absl::Status s = CheckOutputRef(*expected, out); !s.ok()) return s;
  }
  ResultWriter writer(*std::move(expected), out, result);
  absl::StatusOr<CallInfo> info = mode == CallMode::kUnary ? Unary(a, b, options, writer)
                                                           : Streamed(mode, a, b, options, writer);
  if (!options.gallery.empty() && options.top_k == 0) {
    if (info.ok()) {
      RememberGalleryRows(options.gallery, info->shape.back());
    } else if (info.status().code() == absl::StatusCode::kNotFound) {
      RememberGalleryRows(options.gallery, -1);
    }
  }
  return info;
}

absl::StatusOr<Result> Client::Compute(const TensorRef& a, const TensorRef& b,
                                       const ComputeOptions& options) {
  return IntoNewResult([&](Result* r) { return Run(CallMode::kUnary, a, b, options, {}, r); });
}

absl::StatusOr<CallInfo> Client::Compute(const TensorRef& a, const TensorRef& b,
                                         const ComputeOptions& options, OutputRef out) {
  return Run(CallMode::kUnary, a, b, options, out, nullptr);
}

absl::StatusOr<Result> Client::ComputeStream(const TensorRef& a, const TensorRef& b,
                                             const ComputeOptions& options) {
  return IntoNewResult([&](Result* r) { return Run(CallMode::kStream, a, b, options, {}, r); });
}

absl::StatusOr<CallInfo> Client::ComputeStream(const TensorRef& a, const TensorRef& b,
                                               const ComputeOptions& options, OutputRef out) {
  return Run(CallMode::kStream, a, b, options, out, nullptr);
}

absl::StatusOr<Result> Client::ComputeUpload(const TensorRef& a, const TensorRef& b,
                                             const ComputeOptions& options) {
  return IntoNewResult([&](Result* r) { return Run(CallMode::kUpload, a, b, options, {}, r); });
}

absl::StatusOr<CallInfo> Client::ComputeUpload(const TensorRef& a, const TensorRef& b,
                                               const ComputeOptions& options, OutputRef out) {
  return Run(CallMode::kUpload, a, b, options, out, nullptr);
}

absl::StatusOr<v1::Limits> Client::CachedLimits(absl::Duration timeout) {
  {
    absl::MutexLock lock(&mu_);
    if (limits_.has_value()) return *limits_;
  }
  auto info = GetInfo(timeout);
  if (!info.ok()) return info.status();
  absl::MutexLock lock(&mu_);
  limits_ = info->limits();
  return *limits_;
}

int64_t Client::MessageOverheadBytes(const v1::Limits& limits) {
  return limits.message_overhead_bytes() > 0 ? limits.message_overhead_bytes()
                                             : kDefaultMessageOverheadBytes;
}

int64_t Client::UploadPieceBytes(int64_t wanted, const v1::Limits& limits) {
  const int64_t receive = limits.max_receive_message_bytes();
  const int64_t overhead = MessageOverheadBytes(limits);
  return receive > overhead ? std::min(wanted, receive - overhead) : wanted;
}

CallMode Client::ChooseMode(int64_t input_bytes, int64_t output_bytes, const v1::Limits& limits,
                            const ClientOptions& options) {
  // 0 = the server did not say: assume gRPC's default 4 MiB; negative = unlimited.
  const auto effective = [](int64_t limit) {
    if (limit == 0) return kGrpcDefaultMessageBytes;
    return limit < 0 ? std::numeric_limits<int64_t>::max() : limit;
  };
  const int64_t overhead = MessageOverheadBytes(limits);
  const int64_t receive_limit = effective(limits.max_receive_message_bytes());
  const int64_t send_limit = effective(limits.max_send_message_bytes());
  if (input_bytes > receive_limit - overhead) return CallMode::kUpload;
  if (input_bytes + output_bytes <= options.auto_unary_max_bytes &&
      output_bytes <= send_limit - overhead) {
    return CallMode::kUnary;
  }
  if (input_bytes >= options.auto_upload_min_input_bytes) return CallMode::kUpload;
  return CallMode::kStream;
}

absl::StatusOr<CallInfo> Client::Choose(const TensorRef& a, const TensorRef& b,
                                        const ComputeOptions& options, OutputRef out,
                                        Result* result, CallMode mode) {
  if (mode != CallMode::kAuto) return Run(mode, a, b, options, out, result);
  const auto start = std::chrono::steady_clock::now();
  const absl::Duration timeout = options.timeout.value_or(options_.default_timeout);
  auto spec = ExpectedOutput(a, b, options);
  if (!spec.ok()) return spec.status();
  if (spec->shape.back() < 0) {
    // A dense gallery result: sized with the gallery's M as last seen.
    auto rows = GalleryRows(options.gallery, timeout);
    if (!rows.ok()) return rows.status();
    const std::vector<int64_t> gallery_shape = {*rows, a.shape.back()};
    spec = OutputSize(a.shape, gallery_shape, options);
    if (!spec.ok()) return spec.status();
  }
  auto limits = CachedLimits(timeout);
  if (limits.status().code() == absl::StatusCode::kUnimplemented) {
    limits = v1::Limits();  // a server without GetInfo: assume gRPC's default limits
  }
  if (!limits.ok()) return limits.status();
  const auto input_bytes = static_cast<int64_t>(a.data.size() + b.data.size());
  mode = ChooseMode(input_bytes, spec->total_bytes(), *limits, options_);
  if (options.timeout.has_value()) {
    // The GetInfo / GetGallery round trips (first call only) count against this call's deadline.
    ComputeOptions remaining = options;
    remaining.timeout =
        *options.timeout - absl::FromChrono(std::chrono::steady_clock::now() - start);
    return Run(mode, a, b, remaining, out, result);
  }
  return Run(mode, a, b, options, out, result);
}

absl::StatusOr<CallInfo> Client::Similarity(const TensorRef& a, const TensorRef& b,
                                            const ComputeOptions& options, OutputRef out,
                                            CallMode mode) {
  return Choose(a, b, options, out, nullptr, mode);
}

absl::StatusOr<Result> Client::Similarity(const TensorRef& a, const TensorRef& b,
                                          const ComputeOptions& options, CallMode mode) {
  return IntoNewResult([&](Result* r) { return Choose(a, b, options, {}, r, mode); });
}

absl::StatusOr<v1::GalleryInfo> Client::RegisterGallery(const std::string& name,
                                                        const TensorRef& gallery,
                                                        const GalleryOptions& options) {
  const absl::Duration timeout = options.timeout.value_or(options_.default_timeout);
  // Pieces as ComputeUpload's: within the server's receive limit (one cached GetInfo).
  int64_t piece = options_.upload_piece_bytes;
  if (auto limits = CachedLimits(timeout); limits.ok()) piece = UploadPieceBytes(piece, *limits);
  const std::vector<grpc::ByteBuffer> requests =
      GalleryRequests(name, gallery, options, static_cast<size_t>(piece));
  grpc::ClientContext context;
  PrepareContext(context, timeout);
  v1::GalleryInfo info;
  int responses = 0;
  const auto on_response = [&](grpc::ByteBuffer& response) {
    if (++responses > 1) {
      return absl::InternalError("malformed RegisterGallery answer: more than one GalleryInfo");
    }
    return wire::DecodeMessage(response, &info);
  };
  if (absl::Status s =
          RunStream(generic_stub_, MethodName("RegisterGallery"), &context, requests, on_response);
      !s.ok()) {
    return s;
  }
  if (responses != 1) {
    return absl::InternalError("malformed RegisterGallery answer: the call ended without one");
  }
  RememberGalleryRows(info.name(), GalleryRowsOf(info));
  return info;
}

absl::StatusOr<v1::GalleryInfo> Client::GetGallery(const std::string& name,
                                                   std::optional<absl::Duration> timeout) {
  grpc::ClientContext context;
  PrepareContext(context, timeout.value_or(options_.default_timeout));
  v1::GetGalleryRequest request;
  request.set_name(name);
  v1::GalleryInfo info;
  const grpc::Status status = stub_->GetGallery(&context, request, &info);
  if (!status.ok()) {
    if (status.error_code() == grpc::StatusCode::NOT_FOUND) RememberGalleryRows(name, -1);
    return ToAbsl(status);
  }
  RememberGalleryRows(info.name(), GalleryRowsOf(info));
  return info;
}

absl::StatusOr<std::vector<v1::GalleryInfo>> Client::ListGalleries(
    std::optional<absl::Duration> timeout) {
  grpc::ClientContext context;
  PrepareContext(context, timeout.value_or(options_.default_timeout));
  v1::ListGalleriesResponse response;
  const grpc::Status status = stub_->ListGalleries(&context, v1::ListGalleriesRequest(), &response);
  if (!status.ok()) return ToAbsl(status);
  std::vector<v1::GalleryInfo> galleries(
      std::make_move_iterator(response.mutable_galleries()->begin()),
      std::make_move_iterator(response.mutable_galleries()->end()));
  for (const v1::GalleryInfo& info : galleries)
    RememberGalleryRows(info.name(), GalleryRowsOf(info));
  return galleries;
}

absl::StatusOr<v1::GalleryInfo> Client::DeleteGallery(const std::string& name,
                                                      std::optional<absl::Duration> timeout) {
  grpc::ClientContext context;
  PrepareContext(context, timeout.value_or(options_.default_timeout));
  v1::DeleteGalleryRequest request;
  request.set_name(name);
  v1::DeleteGalleryResponse response;
  const grpc::Status status = stub_->DeleteGallery(&context, request, &response);
  if (status.ok() || status.error_code() == grpc::StatusCode::NOT_FOUND) {
    RememberGalleryRows(name, -1);
  }
  if (!status.ok()) return ToAbsl(status);
  return std::move(*response.mutable_deleted());
}

absl::StatusOr<int64_t> Client::GalleryRows(const std::string& name, absl::Duration timeout) {
  {
    absl::MutexLock lock(&mu_);
    if (const auto it = gallery_rows_.find(name); it != gallery_rows_.end()) return it->second;
  }
  auto info = GetGallery(name, timeout);  // remembers the rows
  if (!info.ok()) return info.status();
  return GalleryRowsOf(*info);
}

void Client::RememberGalleryRows(const std::string& name, int64_t rows) {
  absl::MutexLock lock(&mu_);
  if (rows < 0) {
    gallery_rows_.erase(name);
  } else {
    gallery_rows_[name] = rows;
  }
}

}  // namespace simserve
