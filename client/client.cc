// Implementation of simserve::Client over the synchronous gRPC C++ API. The streaming calls
// use grpc::ByteBuffer messages (client/wire.h): tensors go out without being copied, and
// result tiles are validated (order, bounds, sizes) and copied straight into place.
#include "client/client.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <limits>
#include <thread>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "client/wire.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/impl/rpc_method.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/channel_arguments.h"
#include "grpcpp/support/sync_stream.h"

namespace simserve {
namespace {

constexpr int64_t kMessageSlackBytes = int64_t{64} << 10;  // protobuf framing allowance
constexpr int64_t kGrpcDefaultMessageBytes = int64_t{4} << 20;
constexpr char kComputeStreamMethod[] = "/simserve.v1.Similarity/ComputeStream";
constexpr char kComputeUploadMethod[] = "/simserve.v1.Similarity/ComputeUpload";

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

size_t ElementSize(v1::DataType dtype) { return dtype == v1::FLOAT32 ? 4 : 2; }

void SetDeadline(grpc::ClientContext& context, absl::Duration timeout) {
  context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
}

void FillTensorHeader(const TensorRef& ref, v1::Tensor* tensor) {
  tensor->mutable_shape()->Assign(ref.shape.begin(), ref.shape.end());
  tensor->set_dtype(ref.dtype);
}

void FillOptions(const ComputeOptions& options, v1::ComputeRequest* request) {
  request->set_metric(options.metric);
  request->set_output_dtype(options.output_dtype);
  request->set_precision(options.precision);
  request->set_top_k(options.top_k);
  request->set_epsilon(options.epsilon);
  request->set_max_chunk_bytes(options.max_chunk_bytes);
}

// A unary request with both tensors' bytes copied in (small requests only in auto mode).
v1::ComputeRequest BuildRequest(const TensorRef& a, const TensorRef& b,
                                const ComputeOptions& options) {
  v1::ComputeRequest request;
  FillTensorHeader(a, request.mutable_a());
  request.mutable_a()->set_raw(a.data.data(), a.data.size());
  FillTensorHeader(b, request.mutable_b());
  request.mutable_b()->set_raw(b.data.data(), b.data.size());
  FillOptions(options, &request);
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

// Validates a stream of ComputeChunk messages and copies each tile from the received
// slices into one preallocated result: chunks must cover the output exactly once, in
// (batch, row) order.
class ChunkAssembler {
 public:
  ChunkAssembler(Result* result, uint32_t top_k) : result_(result), top_k_(top_k) {}

  absl::Status Add(const wire::ChunkView& chunk, const wire::ChunkDecoder& decoder) {
    if (!started_) {
      if (absl::Status s = Start(chunk); !s.ok()) return s;
    }
    ++result_->chunks;
    if (chunk.dtype != result_->dtype) {
      return Malformed(absl::StrCat("chunk dtype ", chunk.dtype, " differs from the first"));
    }
    if (chunk.batch_index != next_batch_ || chunk.row_offset != next_row_) {
      return Malformed(absl::StrCat("chunk at batch ", chunk.batch_index, " row ", chunk.row_offset,
                                    ", expected batch ", next_batch_, " row ", next_row_));
    }
    const int64_t count = chunk.row_count;
    if (count <= 0 || count > rows_ - next_row_) {
      return Malformed(
          absl::StrCat("chunk row_count ", count, " at row ", next_row_, " of ", rows_));
    }
    const auto value_bytes = static_cast<size_t>(count * cols_) * ElementSize(result_->dtype);
    if (chunk.values_size != value_bytes) {
      return Malformed(
          absl::StrCat("chunk has ", chunk.values_size, " value bytes, expected ", value_bytes));
    }
    const size_t index_bytes = top_k_ > 0 ? static_cast<size_t>(count * cols_) * 4 : 0;
    if (chunk.indices_size != index_bytes) {
      return Malformed(
          absl::StrCat("chunk has ", chunk.indices_size, " index bytes, expected ", index_bytes));
    }
    const auto first_element = static_cast<size_t>((next_batch_ * rows_ + next_row_) * cols_);
    decoder.CopyValues(chunk, result_->values.data() + first_element * ElementSize(result_->dtype));
    if (index_bytes > 0) {
      decoder.CopyIndices(chunk,
                          reinterpret_cast<std::byte*>(result_->indices.data() + first_element));
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
    if (!started_) return Malformed("the stream ended without any chunk");
    if (next_batch_ != batches_) {
      return Malformed(absl::StrCat("the stream ended at batch ", next_batch_, " row ", next_row_,
                                    " of ", batches_, " batches"));
    }
    return absl::OkStatus();
  }

 private:
  static absl::Status Malformed(absl::string_view what) {
    return absl::InternalError(absl::StrCat("malformed result stream: ", what));
  }

  absl::Status Start(const wire::ChunkView& chunk) {
    const auto& shape = chunk.shape;
    if (shape.size() != 2 && shape.size() != 3) {
      return Malformed(absl::StrCat("first chunk's shape has rank ", shape.size()));
    }
    batches_ = shape.size() == 3 ? shape[0] : 1;
    rows_ = shape[shape.size() - 2];
    cols_ = shape[shape.size() - 1];
    constexpr int64_t kMaxElements = int64_t{1} << 40;
    if (batches_ <= 0 || rows_ <= 0 || cols_ <= 0 || batches_ > kMaxElements / rows_ ||
        batches_ * rows_ > kMaxElements / cols_) {
      return Malformed(absl::StrCat("bad output shape [", absl::StrJoin(shape, ","), "]"));
    }
    if (top_k_ > 0 && cols_ != static_cast<int64_t>(top_k_)) {
      return Malformed(absl::StrCat("top-k output has ", cols_, " columns, expected ", top_k_));
    }
    if (chunk.dtype != v1::FLOAT32 && chunk.dtype != v1::BFLOAT16 && chunk.dtype != v1::FLOAT16) {
      return Malformed(absl::StrCat("unknown dtype ", chunk.dtype));
    }
    result_->shape.assign(shape.begin(), shape.end());
    result_->dtype = static_cast<v1::DataType>(chunk.dtype);
    const auto elements = static_cast<size_t>(batches_ * rows_ * cols_);
    result_->values.resize(elements * ElementSize(result_->dtype));
    if (top_k_ > 0) result_->indices.resize(elements);
    started_ = true;
    return absl::OkStatus();
  }

  Result* result_;
  uint32_t top_k_;
  bool started_ = false;
  int64_t batches_ = 0;
  int64_t rows_ = 0;
  int64_t cols_ = 0;
  int64_t next_batch_ = 0;
  int64_t next_row_ = 0;
};

// Reads result chunks from `stream` until it ends, placing them with `assembler`. On a
// malformed chunk cancels the call (the caller still drains and finishes the stream).
template <typename Stream>
absl::Status ReadChunks(Stream& stream, grpc::ClientContext& context, ChunkAssembler& assembler) {
  absl::Status status;
  grpc::ByteBuffer buffer;
  wire::ChunkDecoder decoder;
  wire::ChunkView view;
  while (stream.Read(&buffer)) {
    if (!status.ok()) continue;  // drain after cancelling
    status = decoder.Decode(buffer, &view);
    if (status.ok()) status = assembler.Add(view, decoder);
    if (!status.ok()) context.TryCancel();
  }
  return status;
}

// Estimated result payload of a request, in bytes (0 when the shapes are unusable; the
// server will reject them with a proper message).
int64_t EstimateOutputBytes(const TensorRef& a, const TensorRef& b, const ComputeOptions& options) {
  if ((a.shape.size() != 2 && a.shape.size() != 3) || b.shape.size() != a.shape.size()) return 0;
  const double batch = a.shape.size() == 3 ? static_cast<double>(a.shape[0]) : 1.0;
  const auto n = static_cast<double>(a.shape[a.shape.size() - 2]);
  const auto m = static_cast<double>(b.shape[b.shape.size() - 2]);
  const double cols = options.top_k > 0 ? options.top_k : m;
  const double per_element =
      static_cast<double>(ElementSize(options.output_dtype)) + (options.top_k > 0 ? 4.0 : 0.0);
  const double bytes = batch * n * cols * per_element;
  if (!(bytes > 0)) return 0;
  return bytes >= 9e18 ? std::numeric_limits<int64_t>::max() : static_cast<int64_t>(bytes);
}

}  // namespace

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

int64_t Result::element_count() const {
  int64_t count = 1;
  for (const int64_t dim : shape) count *= dim;
  return shape.empty() ? 0 : count;
}

std::vector<float> Result::ValuesAsFloat() const {
  const size_t count = values.size() / ElementSize(dtype);
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

Client::Client(PassKey /*key*/, std::shared_ptr<grpc::Channel> channel,
               const ClientOptions& options)
    : options_(options),
      channel_(std::move(channel)),
      stub_(v1::Similarity::NewStub(channel_)),
      compute_stream_method_(std::make_unique<grpc::internal::RpcMethod>(
          kComputeStreamMethod, grpc::internal::RpcMethod::SERVER_STREAMING, channel_)),
      compute_upload_method_(std::make_unique<grpc::internal::RpcMethod>(
          kComputeUploadMethod, grpc::internal::RpcMethod::BIDI_STREAMING, channel_)) {}

Client::~Client() = default;

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(const std::string& target,
                                                        const ClientOptions& options) {
  if (target.empty()) return absl::InvalidArgumentError("empty target (want host:port)");
  if (options.upload_piece_bytes <= 0 || options.default_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        "ClientOptions: upload_piece_bytes and default_timeout must be positive");
  }
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

absl::StatusOr<v1::GetInfoResponse> Client::GetInfo(std::optional<absl::Duration> timeout) {
  grpc::ClientContext context;
  SetDeadline(context, timeout.value_or(options_.default_timeout));
  v1::GetInfoResponse response;
  const grpc::Status status = stub_->GetInfo(&context, v1::GetInfoRequest(), &response);
  if (!status.ok()) return ToAbsl(status);
  return response;
}

absl::StatusOr<Result> Client::Compute(const TensorRef& a, const TensorRef& b,
                                       const ComputeOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  grpc::ClientContext context;
  SetDeadline(context, options.timeout.value_or(options_.default_timeout));
  const v1::ComputeRequest request = BuildRequest(a, b, options);
  v1::ComputeResponse response;
  const grpc::Status status = stub_->Compute(&context, request, &response);
  if (!status.ok()) return ToAbsl(status);

  Result result;
  result.mode = CallMode::kUnary;
  result.chunks = 1;
  result.shape.assign(response.shape().begin(), response.shape().end());
  result.dtype = response.dtype();
  const int64_t elements = result.element_count();
  if (elements <= 0 ||
      response.values_raw().size() != static_cast<size_t>(elements) * ElementSize(result.dtype)) {
    return absl::InternalError(absl::StrCat("malformed response: ", response.values_raw().size(),
                                            " value bytes for shape [",
                                            absl::StrJoin(result.shape, ","), "]"));
  }
  const size_t index_bytes = options.top_k > 0 ? static_cast<size_t>(elements) * 4 : 0;
  if (response.indices_raw().size() != index_bytes) {
    return absl::InternalError(absl::StrCat("malformed response: ", response.indices_raw().size(),
                                            " index bytes, expected ", index_bytes));
  }
  result.values.resize(response.values_raw().size());
  std::memcpy(result.values.data(), response.values_raw().data(), result.values.size());
  if (index_bytes > 0) {
    result.indices.resize(static_cast<size_t>(elements));
    std::memcpy(result.indices.data(), response.indices_raw().data(), index_bytes);
  }
  result.server = ParseTimings(context);
  result.client_wall_ms = MillisSince(start);
  return result;
}

absl::StatusOr<Result> Client::ComputeStream(const TensorRef& a, const TensorRef& b,
                                             const ComputeOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  grpc::ClientContext context;
  SetDeadline(context, options.timeout.value_or(options_.default_timeout));
  Result result;
  result.mode = CallMode::kStream;
  ChunkAssembler assembler(&result, options.top_k);
  absl::Status assembly_status;
  {
    // The tensors' bytes are referenced by the request buffer, not copied.
    v1::ComputeRequest header;
    FillTensorHeader(a, header.mutable_a());
    FillTensorHeader(b, header.mutable_b());
    FillOptions(options, &header);
    const grpc::ByteBuffer request = wire::EncodeComputeRequest(header, a.data, b.data);
    std::unique_ptr<grpc::ClientReader<grpc::ByteBuffer>> reader(
        grpc::internal::ClientReaderFactory<grpc::ByteBuffer>::Create(
            channel_.get(), *compute_stream_method_, &context, request));
    assembly_status = ReadChunks(*reader, context, assembler);
    const grpc::Status status = reader->Finish();
    if (!assembly_status.ok()) return assembly_status;
    if (!status.ok()) return ToAbsl(status);
  }
  if (absl::Status s = assembler.Finish(); !s.ok()) return s;
  result.server = ParseTimings(context);
  result.client_wall_ms = MillisSince(start);
  return result;
}

absl::StatusOr<Result> Client::ComputeUpload(const TensorRef& a, const TensorRef& b,
                                             const ComputeOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  grpc::ClientContext context;
  SetDeadline(context, options.timeout.value_or(options_.default_timeout));
  Result result;
  result.mode = CallMode::kUpload;
  ChunkAssembler assembler(&result, options.top_k);

  // Pieces must fit the server's max receive message size (known from one cached GetInfo;
  // if that fails the configured size is used and the server's answer tells the story).
  int64_t piece_bytes = options_.upload_piece_bytes;
  if (auto limits = CachedLimits(options.timeout.value_or(options_.default_timeout));
      limits.ok() && limits->max_receive_message_bytes() > 2 * kMessageSlackBytes) {
    piece_bytes = std::min(piece_bytes, limits->max_receive_message_bytes() - kMessageSlackBytes);
  }
  const auto piece = static_cast<size_t>(piece_bytes);
  std::unique_ptr<grpc::ClientReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>> stream(
      grpc::internal::ClientReaderWriterFactory<grpc::ByteBuffer, grpc::ByteBuffer>::Create(
          channel_.get(), *compute_upload_method_, &context));
  // The writer runs concurrently with the reads below (gRPC allows one reader and one
  // writer thread per stream), so result tiles drain while A is still going up. The
  // pieces reference the caller's tensors; nothing is copied.
  std::thread writer([&stream, &a, &b, &options, piece] {
    v1::UploadRequest header;
    v1::ComputeRequest* request = header.mutable_header()->mutable_request();
    FillTensorHeader(a, request->mutable_a());
    FillTensorHeader(b, request->mutable_b());
    FillOptions(options, request);
    if (!stream->Write(wire::EncodeMessage(header))) return;  // Finish reports why
    const auto send = [&stream, piece](wire::UploadField field, std::span<const std::byte> data) {
      for (size_t offset = 0; offset < data.size(); offset += piece) {
        const size_t n = std::min(piece, data.size() - offset);
        if (!stream->Write(wire::EncodeUploadPiece(field, data.subspan(offset, n)))) return false;
      }
      return true;
    };
    if (send(wire::UploadField::kBData, b.data) && send(wire::UploadField::kAData, a.data)) {
      stream->WritesDone();
    }
  });
  const absl::Status assembly_status = ReadChunks(*stream, context, assembler);
  writer.join();
  const grpc::Status status = stream->Finish();
  if (!assembly_status.ok()) return assembly_status;
  if (!status.ok()) return ToAbsl(status);
  if (absl::Status s = assembler.Finish(); !s.ok()) return s;
  result.server = ParseTimings(context);
  result.client_wall_ms = MillisSince(start);
  return result;
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

CallMode Client::ChooseMode(int64_t input_bytes, int64_t output_bytes, const v1::Limits& limits,
                            const ClientOptions& options) {
  // 0 = the server did not say: assume gRPC's default 4 MiB; negative = unlimited.
  const auto effective = [](int64_t limit) {
    if (limit == 0) return kGrpcDefaultMessageBytes;
    return limit < 0 ? std::numeric_limits<int64_t>::max() : limit;
  };
  const int64_t receive_limit = effective(limits.max_receive_message_bytes());
  const int64_t send_limit = effective(limits.max_send_message_bytes());
  if (input_bytes > receive_limit - kMessageSlackBytes) return CallMode::kUpload;
  if (input_bytes + output_bytes <= options.auto_unary_max_bytes &&
      output_bytes <= send_limit - kMessageSlackBytes) {
    return CallMode::kUnary;
  }
  if (input_bytes >= options.auto_upload_min_input_bytes) return CallMode::kUpload;
  return CallMode::kStream;
}

absl::StatusOr<Result> Client::Similarity(const TensorRef& a, const TensorRef& b,
                                          const ComputeOptions& options, CallMode mode) {
  if (mode == CallMode::kAuto) {
    const auto start = std::chrono::steady_clock::now();
    auto limits = CachedLimits(options.timeout.value_or(options_.default_timeout));
    if (limits.status().code() == absl::StatusCode::kUnimplemented) {
      limits = v1::Limits();  // a server without GetInfo: assume gRPC's default limits
    }
    if (!limits.ok()) return limits.status();
    const auto input_bytes = static_cast<int64_t>(a.data.size() + b.data.size());
    mode = ChooseMode(input_bytes, EstimateOutputBytes(a, b, options), *limits, options_);
    if (options.timeout.has_value()) {
      // The GetInfo round trip (first call only) counts against this call's deadline.
      ComputeOptions remaining = options;
      remaining.timeout =
          *options.timeout - absl::FromChrono(std::chrono::steady_clock::now() - start);
      return Similarity(a, b, remaining, mode);
    }
  }
  switch (mode) {
    case CallMode::kUnary:
      return Compute(a, b, options);
    case CallMode::kStream:
      return ComputeStream(a, b, options);
    case CallMode::kUpload:
    case CallMode::kAuto:
      break;
  }
  return ComputeUpload(a, b, options);
}

}  // namespace simserve
