// simserve-cli: computes the similarity of two .npy tensors (or of one and a gallery kept on
// the server) on a simserve server and writes the .npy result, printing client and server
// timings; registers, lists, shows and deletes galleries. `simserve-cli --help` lists flags.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "client/dtype.h"
#include "client/npy.h"
#include "google/protobuf/util/json_util.h"
#include "grpcpp/security/credentials.h"
#include "kernels/dtype.h"

ABSL_FLAG(std::string, target, "localhost:50051", "Server address, host:port.");
ABSL_FLAG(bool, tls, false,
          "Connect with TLS, trusting the system's roots (or --tls_ca_file). Implied by the "
          "--tls_*_file flags.");
ABSL_FLAG(std::string, tls_ca_file, "", "PEM CA bundle that signed the server's certificate.");
ABSL_FLAG(std::string, tls_cert_file, "",
          "PEM client certificate chain for mutual TLS (with --tls_key_file).");
ABSL_FLAG(std::string, tls_key_file, "", "PEM private key of --tls_cert_file.");
ABSL_FLAG(std::string, token, "",
          "Bearer token for a server with --auth_token_file (sent as 'authorization: Bearer "
          "<token>' on every call; in clear without TLS). Visible to other local users in the "
          "process list: prefer --token_file or $SIMSERVE_TOKEN.");
ABSL_FLAG(std::string, token_file, "",
          "File whose first line that is neither blank nor a '#' comment is the bearer token "
          "(surrounding whitespace trimmed; the server's token file format). Default: "
          "$SIMSERVE_TOKEN if set, else no token.");
ABSL_FLAG(std::string, a, "",
          "Input A: .npy of shape [batch, N, D] or [N, D] "
          "(float32; float64 is converted to float32; float16 is sent as float16 if the "
          "server accepts it, else converted).");
ABSL_FLAG(std::string, b, "",
          "Input B: .npy of shape [batch, M, D] or [M, D]; with --register_gallery the "
          "gallery to upload. Not with --gallery.");
ABSL_FLAG(std::string, out, "",
          "Output .npy for the result S [batch, N, M] (or [.., k] with --top_k): float32, "
          "float16 for --output_dtype float16, bfloat16 output is widened to float32. "
          "Empty: do not write (timings only).");
ABSL_FLAG(std::string, indices_out, "",
          "Top-k only: output .npy for the int32 column indices. Default: --out with "
          "'.npy' replaced by '.indices.npy'.");
ABSL_FLAG(std::string, metric, "cosine", "cosine | dot | euclidean | sqeuclidean.");
ABSL_FLAG(std::string, output_dtype, "float32", "float32 | bfloat16 | float16.");
ABSL_FLAG(std::string, precision, "fp32",
          "fp32 (exact) | bf16 (bfloat16 operands, float32 accumulation; AMX fast path).");
ABSL_FLAG(int, top_k, 0, "0: dense matrix. k > 0: per row the k best values and indices.");
ABSL_FLAG(double, epsilon, 0.0,
          "Cosine only. 0: sklearn semantics. > 0: Keras clamp sqrt(max(sum_sq, epsilon)).");
ABSL_FLAG(int64_t, timeout_ms, 60000, "Deadline of each call in milliseconds.");
ABSL_FLAG(int64_t, connect_timeout_ms, 5000,
          "How long to wait for the server to become reachable.");
ABSL_FLAG(std::string, mode, "auto",
          "auto | unary | stream | upload. auto: unary for small requests, upload (full "
          "duplex) for inputs >= 8 MiB or beyond the server's message limit, else stream.");
ABSL_FLAG(int64_t, max_chunk_bytes, 0,
          "Streaming modes: max bytes per result chunk (0 = server default, 1 MiB).");
ABSL_FLAG(int, repeat, 1,
          "Run the computation this many times on one connection and print the median "
          "(benchmarking); the result of the last run is written.");
ABSL_FLAG(bool, info, false, "Print the server's GetInfo (version, ISA, limits) and exit.");
ABSL_FLAG(std::string, gallery, "",
          "Compute A against this gallery on the server (registered with --register_gallery "
          "or loaded from the server's --gallery_dir) instead of sending --b.");
ABSL_FLAG(int64_t, gallery_version, 0,
          "With --gallery: 0 = the current version; else it must be the current one "
          "(FAILED_PRECONDITION otherwise).");
ABSL_FLAG(std::string, register_gallery, "",
          "Upload --b as the gallery of this name ([A-Za-z0-9._-]{1,128}; an existing one is "
          "replaced and its version bumped), print what the server holds and exit.");
ABSL_FLAG(std::string, storage_dtype, "float32",
          "With --register_gallery: float32 (exact) | bfloat16 | float16 (half the memory).");
ABSL_FLAG(bool, list_galleries, false, "List the server's galleries and exit.");
ABSL_FLAG(std::string, get_gallery, "", "Print the gallery of this name and exit.");
ABSL_FLAG(std::string, delete_gallery, "",
          "Delete the uploaded gallery of this name, print what was removed and exit.");
ABSL_FLAG(bool, json, false,
          "Print --info and the gallery commands' answers as JSON (proto field names).");

namespace {

constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;

using simserve::CallMode;
namespace v1 = simserve::v1;

double MillisSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

absl::StatusOr<v1::Metric> ParseMetric(std::string name) {
  absl::AsciiStrToLower(&name);
  if (name == "cosine") return v1::COSINE;
  if (name == "dot") return v1::DOT;
  if (name == "euclidean") return v1::EUCLIDEAN;
  if (name == "sqeuclidean" || name == "squared_euclidean") return v1::SQUARED_EUCLIDEAN;
  return absl::InvalidArgumentError(
      absl::StrCat("--metric: '", name, "' is not cosine|dot|euclidean|sqeuclidean"));
}

absl::StatusOr<v1::DataType> ParseDataType(std::string name, const char* flag) {
  absl::AsciiStrToLower(&name);
  if (name == "float32" || name == "fp32" || name == "f32") return v1::FLOAT32;
  if (name == "bfloat16" || name == "bf16") return v1::BFLOAT16;
  if (name == "float16" || name == "fp16" || name == "f16" || name == "half") return v1::FLOAT16;
  return absl::InvalidArgumentError(
      absl::StrCat(flag, ": '", name, "' is not float32|bfloat16|float16"));
}

absl::StatusOr<v1::Precision> ParsePrecision(std::string name) {
  absl::AsciiStrToLower(&name);
  if (name == "fp32" || name == "float32") return v1::FP32;
  if (name == "bf16" || name == "bfloat16") return v1::BF16;
  return absl::InvalidArgumentError(absl::StrCat("--precision: '", name, "' is not fp32|bf16"));
}

absl::StatusOr<CallMode> ParseMode(std::string name) {
  absl::AsciiStrToLower(&name);
  if (name == "auto") return CallMode::kAuto;
  if (name == "unary") return CallMode::kUnary;
  if (name == "stream") return CallMode::kStream;
  if (name == "upload") return CallMode::kUpload;
  return absl::InvalidArgumentError(
      absl::StrCat("--mode: '", name, "' is not auto|unary|stream|upload"));
}

const char* DataTypeName(v1::DataType dtype) {
  switch (dtype) {
    case v1::FLOAT32:
      return "float32";
    case v1::BFLOAT16:
      return "bfloat16";
    case v1::FLOAT16:
      return "float16";
    default:
      return "?";
  }
}

// An input .npy file, memory-mapped, and the bytes/dtype to send: the file's own bytes
// when they can go as they are (little-endian float32, or float16 the server accepts),
// else a converted float32 copy.
struct Input {
  simserve::npy::MappedFile file;
  v1::DataType dtype = v1::FLOAT32;
  bool use_converted = false;
  simserve::ByteVector converted;

  simserve::TensorRef Ref() const {
    return simserve::TensorRef{file.layout().shape, dtype,
                               use_converted ? std::span<const std::byte>(converted) : file.data()};
  }
};

// Prepares a mapped file for sending (see Input).
absl::StatusOr<Input> MakeInput(simserve::npy::MappedFile file, const std::string& path,
                                bool send_fp16) {
  Input input{std::move(file)};
  const simserve::npy::Layout& layout = input.file.layout();
  if (layout.dtype == simserve::npy::DType::kInt32) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": int32 arrays are not accepted; convert to float32"));
  }
  if (!layout.big_endian && layout.dtype == simserve::npy::DType::kFloat32) return input;
  if (!layout.big_endian && layout.dtype == simserve::npy::DType::kFloat16 && send_fp16) {
    input.dtype = v1::FLOAT16;
    return input;
  }
  auto array = simserve::npy::Parse(input.file.bytes());  // byte-swaps if needed
  if (!array.ok()) return array.status();
  auto floats = simserve::npy::ToFloat32(*array);
  if (!floats.ok()) return floats.status();
  input.converted.resize(floats->size() * sizeof(float));
  if (!floats->empty()) std::memcpy(input.converted.data(), floats->data(), input.converted.size());
  input.use_converted = true;
  return input;
}

// Where the result goes: straight into memory-mapped .npy files (--out, and for top-k the
// indices file), or into buffers allocated once (no --out). Every call of --repeat writes
// into the same memory. .npy has no bfloat16: a bfloat16 result is received into the first
// half of the float32 file's payload and widened in place by Finish().
class Output {
 public:
  static absl::StatusOr<Output> Create(const simserve::OutputSpec& spec, const std::string& out,
                                       std::string indices_out) {
    Output output;
    output.spec_ = spec;
    output.bf16_in_f32_ = spec.dtype == v1::BFLOAT16;
    if (out.empty()) {
      output.values_buffer_.resize(static_cast<size_t>(spec.values_bytes));
      output.indices_buffer_.resize(static_cast<size_t>(spec.indices_bytes) / sizeof(int32_t));
      output.ref_ = {output.values_buffer_, output.indices_buffer_};
      return output;
    }
    output.paths_.push_back(out);
    auto values = simserve::npy::MappedOutputFile::Create(out, spec.shape,
                                                          spec.dtype == v1::FLOAT16
                                                              ? simserve::npy::DType::kFloat16
                                                              : simserve::npy::DType::kFloat32);
    if (!values.ok()) return values.status();
    output.values_file_ = *std::move(values);
    output.ref_.values = output.values_file_->data().first(static_cast<size_t>(spec.values_bytes));
    if (spec.indices_bytes > 0) {
      if (indices_out.empty()) {
        indices_out = absl::EndsWith(out, ".npy") ? out.substr(0, out.size() - 4) : out;
        indices_out += ".indices.npy";
      }
      output.paths_.push_back(indices_out);
      auto indices = simserve::npy::MappedOutputFile::Create(indices_out, spec.shape,
                                                             simserve::npy::DType::kInt32);
      if (!indices.ok()) return indices.status();
      output.indices_file_ = *std::move(indices);
      const std::span<std::byte> bytes = output.indices_file_->data();
      // The payload starts 64-byte aligned (numpy pads the header to a multiple of 64).
      output.ref_.indices = {reinterpret_cast<int32_t*>(bytes.data()),
                             bytes.size() / sizeof(int32_t)};
    }
    return output;
  }

  simserve::OutputRef ref() const { return ref_; }

  // Completes the files after the last call: widens a bfloat16 result to float32 and
  // closes (unmaps) them.
  absl::Status Finish() {
    if (!values_file_.has_value()) return absl::OkStatus();
    if (bf16_in_f32_) {
      std::fprintf(stderr,
                   "note: .npy has no bfloat16; the bfloat16 result is written widened to "
                   "float32 (exactly)\n");
      // Back to front, so that no bfloat16 element is overwritten before it is read.
      std::byte* data = values_file_->data().data();
      for (auto i = static_cast<size_t>(spec_.elements); i-- > 0;) {
        uint16_t bits = 0;
        std::memcpy(&bits, data + 2 * i, sizeof(bits));
        const float value = simserve::kernels::Bf16ToFloat(bits);
        std::memcpy(data + 4 * i, &value, sizeof(value));
      }
    }
    absl::Status status = values_file_->Close();
    if (indices_file_.has_value()) {
      if (absl::Status s = indices_file_->Close(); status.ok()) status = s;
      absl::PrintF("indices written to %s\n", paths_.back());
    }
    return status;
  }

  // Removes the files of a failed run (they would hold no or partial results).
  void Discard() {
    values_file_.reset();
    indices_file_.reset();
    for (const std::string& path : paths_) std::remove(path.c_str());
  }

  // Bytes of the result in wire format (values + indices).
  int64_t wire_bytes() const { return spec_.total_bytes(); }

 private:
  simserve::OutputSpec spec_;
  bool bf16_in_f32_ = false;
  std::vector<std::string> paths_;
  std::optional<simserve::npy::MappedOutputFile> values_file_;
  std::optional<simserve::npy::MappedOutputFile> indices_file_;
  simserve::ByteVector values_buffer_;
  std::vector<int32_t> indices_buffer_;
  simserve::OutputRef ref_;
};

std::string Ms(const std::optional<double>& ms) {
  return ms.has_value() ? absl::StrFormat("%.2f ms", *ms) : std::string("n/a");
}

// Joins the names of repeated enum values, e.g. "COSINE DOT".
template <typename Enum, typename Values, typename NameFn>
std::string EnumNames(const Values& values, NameFn name) {
  std::vector<std::string> names;
  names.reserve(values.size());
  for (const int value : values) names.push_back(name(static_cast<Enum>(value)));
  return absl::StrJoin(names, " ");
}

void PrintInfo(const v1::GetInfoResponse& info) {
  const auto& l = info.limits();
  absl::PrintF(
      "version             %s\n"
      "onednn_version      %s\n"
      "cpu_isa             %s\n"
      "compute_workers     %d\n"
      "threads_per_worker  %d\n"
      "metrics             %s\n"
      "input_dtypes        %s\n"
      "output_dtypes       %s\n"
      "precisions          %s\n",
      info.version(), info.onednn_version(), info.cpu_isa(), info.compute_workers(),
      info.threads_per_worker(), EnumNames<v1::Metric>(info.metrics(), v1::Metric_Name<v1::Metric>),
      EnumNames<v1::DataType>(info.input_dtypes(), v1::DataType_Name<v1::DataType>),
      EnumNames<v1::DataType>(info.output_dtypes(), v1::DataType_Name<v1::DataType>),
      EnumNames<v1::Precision>(info.precisions(), v1::Precision_Name<v1::Precision>));
  absl::PrintF(
      "limits:\n"
      "  max_receive_message_bytes  %d\n"
      "  max_send_message_bytes     %d\n"
      "  max_input_elements         %d\n"
      "  max_output_bytes           %d\n"
      "  max_flops                  %d\n"
      "  max_chunk_bytes            %d\n"
      "  default_chunk_bytes        %d\n"
      "  max_queued_requests        %d\n"
      "  max_inflight_bytes         %d\n"
      "  message_overhead_bytes     %d\n"
      "  max_gallery_bytes          %d\n",
      l.max_receive_message_bytes(), l.max_send_message_bytes(), l.max_input_elements(),
      l.max_output_bytes(), l.max_flops(), l.max_chunk_bytes(), l.default_chunk_bytes(),
      l.max_queued_requests(), l.max_inflight_bytes(), l.message_overhead_bytes(),
      l.max_gallery_bytes());
}

// A Unix-milliseconds time as UTC ISO 8601, or "-" for 0 (never).
std::string UnixMs(int64_t ms) {
  if (ms == 0) return "-";
  return absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::FromUnixMillis(ms), absl::UTCTimeZone());
}

void PrintGallery(const v1::GalleryInfo& g) {
  absl::PrintF(
      "name             %s\n"
      "shape            [%s]\n"
      "dtype            %s\n"
      "storage_dtype    %s\n"
      "version          %d\n"
      "bytes            %d\n"
      "source           %s\n"
      "path             %s\n"
      "registered       %s\n"
      "last_used        %s\n"
      "prepare_seconds  %.6f\n",
      g.name(), absl::StrJoin(g.shape(), ", "), v1::DataType_Name(g.dtype()),
      v1::DataType_Name(g.storage_dtype()), g.version(), g.bytes(),
      v1::GallerySource_Name(g.source()), g.path().empty() ? "-" : g.path(),
      UnixMs(g.registered_unix_ms()), UnixMs(g.last_used_unix_ms()), g.prepare_seconds());
}

void PrintGalleryTable(const std::vector<v1::GalleryInfo>& galleries) {
  absl::PrintF("%-24s %-18s %-9s %7s %12s %-9s %s\n", "NAME", "SHAPE", "STORAGE", "VERSION",
               "BYTES", "SOURCE", "LAST_USED");
  int64_t total = 0;
  for (const v1::GalleryInfo& g : galleries) {
    absl::PrintF("%-24s %-18s %-9s %7d %12d %-9s %s\n", g.name(),
                 absl::StrCat("[", absl::StrJoin(g.shape(), ","), "]"),
                 v1::DataType_Name(g.storage_dtype()), g.version(), g.bytes(),
                 v1::GallerySource_Name(g.source()), UnixMs(g.last_used_unix_ms()));
    total += g.bytes();
  }
  absl::PrintF("%d galler%s, %d bytes\n", galleries.size(), galleries.size() == 1 ? "y" : "ies",
               total);
}

// Prints `message` as one JSON object (proto field names, defaults included).
int PrintJson(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  options.add_whitespace = true;
  std::string json;
  const auto status = google::protobuf::util::MessageToJsonString(message, &json, options);
  if (!status.ok()) {
    absl::FPrintF(stderr, "simserve-cli: JSON: %s\n", status.ToString());
    return 1;
  }
  absl::PrintF("%s", json);
  return 0;
}

int Fail(const absl::Status& status, const char* what) {
  absl::FPrintF(stderr, "simserve-cli: %s: %s\n", what, status.ToString());
  if (status.code() == absl::StatusCode::kUnauthenticated) {
    absl::FPrintF(stderr,
                  "simserve-cli: the server requires a bearer token it accepts: --token_file, "
                  "$SIMSERVE_TOKEN or --token\n");
  }
  return kExitFailure;
}

int UsageError(const absl::Status& status) {
  absl::FPrintF(stderr, "simserve-cli: %s\n(see simserve-cli --help)\n", status.message());
  return kExitUsage;
}

// Whether the server accepts float16 inputs (GetInfo), asked only when a file is float16.
absl::StatusOr<bool> AcceptsFloat16(simserve::Client& client) {
  auto info = client.GetInfo();
  if (!info.ok()) return info.status();
  return std::find(info->input_dtypes().begin(), info->input_dtypes().end(), v1::FLOAT16) !=
         info->input_dtypes().end();
}

bool IsFloat16(const simserve::npy::MappedFile& file) {
  return file.layout().dtype == simserve::npy::DType::kFloat16;
}

// --register_gallery, --get_gallery, --delete_gallery, --list_galleries: one call, its answer
// printed as text or JSON.
int GalleryCommand(simserve::Client& client, absl::Duration timeout, v1::DataType storage_dtype) {
  const bool json = absl::GetFlag(FLAGS_json);
  if (absl::GetFlag(FLAGS_list_galleries)) {
    auto galleries = client.ListGalleries(timeout);
    if (!galleries.ok()) return Fail(galleries.status(), "ListGalleries");
    if (!json) {
      PrintGalleryTable(*galleries);
      return 0;
    }
    v1::ListGalleriesResponse response;
    for (v1::GalleryInfo& g : *galleries) *response.add_galleries() = std::move(g);
    return PrintJson(response);
  }
  if (const std::string name = absl::GetFlag(FLAGS_delete_gallery); !name.empty()) {
    auto deleted = client.DeleteGallery(name, timeout);
    if (!deleted.ok()) return Fail(deleted.status(), "DeleteGallery");
    if (json) {
      v1::DeleteGalleryResponse response;
      *response.mutable_deleted() = *std::move(deleted);
      return PrintJson(response);
    }
    absl::PrintF("deleted:\n");
    PrintGallery(*deleted);
    return 0;
  }
  absl::StatusOr<v1::GalleryInfo> info;
  if (const std::string name = absl::GetFlag(FLAGS_get_gallery); !name.empty()) {
    info = client.GetGallery(name, timeout);
    if (!info.ok()) return Fail(info.status(), "GetGallery");
  } else {
    const std::string path = absl::GetFlag(FLAGS_b);
    auto file = simserve::npy::MappedFile::Open(path);
    if (!file.ok()) return Fail(file.status(), "reading --b");
    bool send_fp16 = false;
    if (IsFloat16(*file)) {
      auto accepts = AcceptsFloat16(client);
      if (!accepts.ok()) return Fail(accepts.status(), "GetInfo");
      send_fp16 = *accepts;
    }
    auto gallery = MakeInput(*std::move(file), path, send_fp16);
    if (!gallery.ok()) return Fail(gallery.status(), "reading --b");
    const auto start = std::chrono::steady_clock::now();
    info = client.RegisterGallery(absl::GetFlag(FLAGS_register_gallery), gallery->Ref(),
                                  simserve::GalleryOptions{storage_dtype, timeout});
    if (!info.ok()) return Fail(info.status(), "RegisterGallery");
    if (!json) {
      absl::PrintF("registered %s (%.3f MB as %s) in %.2f ms:\n", path,
                   static_cast<double>(gallery->Ref().data.size()) / 1e6,
                   DataTypeName(gallery->dtype), MillisSince(start));
    }
  }
  if (json) return PrintJson(*info);
  PrintGallery(*info);
  return 0;
}

// Channel credentials from --tls, --tls_ca_file, --tls_cert_file, --tls_key_file: nullptr for
// plaintext. INVALID_ARGUMENT for a missing or unreadable file or a key without a certificate.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> TlsCredentialsFromFlags() {
  const std::string ca = absl::GetFlag(FLAGS_tls_ca_file);
  const std::string cert = absl::GetFlag(FLAGS_tls_cert_file);
  const std::string key = absl::GetFlag(FLAGS_tls_key_file);
  if (!absl::GetFlag(FLAGS_tls) && ca.empty() && cert.empty() && key.empty()) return nullptr;
  if (cert.empty() != key.empty()) {
    return absl::InvalidArgumentError("mutual TLS needs both --tls_cert_file and --tls_key_file");
  }
  grpc::SslCredentialsOptions options;
  for (const auto& [flag, path, pem] :
       {std::tuple{"--tls_ca_file", ca, &options.pem_root_certs},
        std::tuple{"--tls_cert_file", cert, &options.pem_cert_chain},
        std::tuple{"--tls_key_file", key, &options.pem_private_key}}) {
    if (path.empty()) continue;
    std::ifstream file(path, std::ios::binary);
    std::stringstream contents;
    contents << file.rdbuf();
    if (!file || contents.str().empty()) {
      return absl::InvalidArgumentError(absl::StrCat(flag, " ", path, " cannot be read"));
    }
    *pem = contents.str();
  }
  return grpc::SslCredentials(options);
}

// The bearer token from --token, --token_file or $SIMSERVE_TOKEN (in this order; the two
// flags are exclusive), "" for none. INVALID_ARGUMENT names the source, never the token.
absl::StatusOr<std::string> TokenFromFlags() {
  std::string token = absl::GetFlag(FLAGS_token);
  const std::string path = absl::GetFlag(FLAGS_token_file);
  std::string source = "--token";
  if (!token.empty() && !path.empty()) {
    return absl::InvalidArgumentError("give one of --token and --token_file");
  }
  if (!path.empty()) {
    source = absl::StrCat("--token_file ", path);
    std::ifstream file(path);
    if (!file) return absl::InvalidArgumentError(absl::StrCat(source, " cannot be read"));
    for (std::string line; std::getline(file, line);) {
      const absl::string_view trimmed = absl::StripAsciiWhitespace(line);
      if (!trimmed.empty() && trimmed.front() != '#') {
        token.assign(trimmed.data(), trimmed.size());
        break;
      }
    }
    if (token.empty()) return absl::InvalidArgumentError(absl::StrCat(source, " holds no token"));
  } else if (const char* env = std::getenv("SIMSERVE_TOKEN"); token.empty() && env != nullptr) {
    token = env;
    source = "$SIMSERVE_TOKEN";
  }
  if (absl::Status s = simserve::CheckBearerToken(token); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", s.message()));
  }
  return token;
}

int Run() {
  simserve::ComputeOptions options;
  auto metric = ParseMetric(absl::GetFlag(FLAGS_metric));
  if (!metric.ok()) return UsageError(metric.status());
  auto output_dtype = ParseDataType(absl::GetFlag(FLAGS_output_dtype), "--output_dtype");
  if (!output_dtype.ok()) return UsageError(output_dtype.status());
  auto storage_dtype = ParseDataType(absl::GetFlag(FLAGS_storage_dtype), "--storage_dtype");
  if (!storage_dtype.ok()) return UsageError(storage_dtype.status());
  auto precision = ParsePrecision(absl::GetFlag(FLAGS_precision));
  if (!precision.ok()) return UsageError(precision.status());
  auto mode = ParseMode(absl::GetFlag(FLAGS_mode));
  if (!mode.ok()) return UsageError(mode.status());
  const int top_k = absl::GetFlag(FLAGS_top_k);
  const int64_t timeout_ms = absl::GetFlag(FLAGS_timeout_ms);
  const int64_t max_chunk = absl::GetFlag(FLAGS_max_chunk_bytes);
  const int repeat = absl::GetFlag(FLAGS_repeat);
  if (top_k < 0) return UsageError(absl::InvalidArgumentError("--top_k must be >= 0"));
  if (timeout_ms <= 0) return UsageError(absl::InvalidArgumentError("--timeout_ms must be > 0"));
  if (max_chunk < 0 || max_chunk > UINT32_MAX) {
    return UsageError(absl::InvalidArgumentError("--max_chunk_bytes must be in [0, 2^32)"));
  }
  if (repeat < 1) return UsageError(absl::InvalidArgumentError("--repeat must be >= 1"));
  options.metric = *metric;
  options.output_dtype = *output_dtype;
  options.precision = *precision;
  options.top_k = static_cast<uint32_t>(top_k);
  options.epsilon = static_cast<float>(absl::GetFlag(FLAGS_epsilon));
  options.max_chunk_bytes = static_cast<uint32_t>(max_chunk);
  options.timeout = absl::Milliseconds(timeout_ms);
  options.gallery = absl::GetFlag(FLAGS_gallery);
  options.gallery_version = absl::GetFlag(FLAGS_gallery_version);

  // One command per run: a computation (the default) or one of these.
  std::vector<std::string> commands;
  if (absl::GetFlag(FLAGS_info)) commands.emplace_back("--info");
  if (absl::GetFlag(FLAGS_list_galleries)) commands.emplace_back("--list_galleries");
  for (const auto& [flag, value] :
       {std::pair{"--get_gallery", absl::GetFlag(FLAGS_get_gallery)},
        std::pair{"--delete_gallery", absl::GetFlag(FLAGS_delete_gallery)},
        std::pair{"--register_gallery", absl::GetFlag(FLAGS_register_gallery)}}) {
    if (!value.empty()) commands.emplace_back(flag);
  }
  if (commands.size() > 1) {
    return UsageError(absl::InvalidArgumentError(
        absl::StrCat("one command at a time, got ", absl::StrJoin(commands, " and "))));
  }
  const bool has_a = !absl::GetFlag(FLAGS_a).empty();
  const bool has_b = !absl::GetFlag(FLAGS_b).empty();
  const bool registering = !absl::GetFlag(FLAGS_register_gallery).empty();
  if (!commands.empty() && (has_a || !options.gallery.empty())) {
    return UsageError(absl::InvalidArgumentError(
        absl::StrCat("--a and --gallery are for computing, not for ", commands[0])));
  }
  if (registering != has_b && !commands.empty()) {
    return UsageError(absl::InvalidArgumentError(
        registering
            ? "--register_gallery needs --b (the .npy to upload)"
            : absl::StrCat("--b is for computing or --register_gallery, not for ", commands[0])));
  }
  if (commands.empty()) {
    if (has_b && !options.gallery.empty()) {
      return UsageError(absl::InvalidArgumentError(
          "--b and --gallery both name B: give one (the gallery plays B on the server)"));
    }
    if (!has_a || (!has_b && options.gallery.empty())) {
      return UsageError(absl::InvalidArgumentError(
          "--a and --b are required (or --a and --gallery; or --info, --list_galleries, "
          "--get_gallery, --delete_gallery, --register_gallery)"));
    }
  }
  if (options.gallery_version != 0 && options.gallery.empty()) {
    return UsageError(absl::InvalidArgumentError("--gallery_version needs --gallery"));
  }

  simserve::ClientOptions client_options;
  auto credentials = TlsCredentialsFromFlags();
  if (!credentials.ok()) return UsageError(credentials.status());
  client_options.credentials = *std::move(credentials);
  auto token = TokenFromFlags();
  if (!token.ok()) return UsageError(token.status());
  client_options.bearer_token = *std::move(token);
  client_options.default_timeout = absl::Milliseconds(timeout_ms);
  client_options.connect_timeout = absl::Milliseconds(absl::GetFlag(FLAGS_connect_timeout_ms));
  const std::string target = absl::GetFlag(FLAGS_target);
  auto client = simserve::Client::Connect(target, client_options);
  if (!client.ok()) return Fail(client.status(), "connect");

  if (absl::GetFlag(FLAGS_info)) {
    auto info = (*client)->GetInfo();
    if (!info.ok()) return Fail(info.status(), "GetInfo");
    if (absl::GetFlag(FLAGS_json)) return PrintJson(*info);
    PrintInfo(*info);
    return 0;
  }
  if (!commands.empty()) {
    return GalleryCommand(**client, absl::Milliseconds(timeout_ms), *storage_dtype);
  }

  const auto load_start = std::chrono::steady_clock::now();
  auto a_array = simserve::npy::MappedFile::Open(absl::GetFlag(FLAGS_a));
  if (!a_array.ok()) return Fail(a_array.status(), "reading --a");
  std::optional<simserve::npy::MappedFile> b_array;
  // B's shape: the second file's, or the gallery's as the server reports it (the result is
  // sized from it; a gallery replaced by one of another M before the call fails cleanly).
  std::vector<int64_t> b_shape;
  if (options.gallery.empty()) {
    auto opened = simserve::npy::MappedFile::Open(absl::GetFlag(FLAGS_b));
    if (!opened.ok()) return Fail(opened.status(), "reading --b");
    b_array = *std::move(opened);
  } else {
    auto gallery = (*client)->GetGallery(options.gallery);
    if (!gallery.ok()) return Fail(gallery.status(), "GetGallery");
    b_shape.assign(gallery->shape().begin(), gallery->shape().end());
  }
  // float16 files go over the wire as float16 only if every file sent is float16 and the
  // server accepts float16 inputs; otherwise they are widened to float32 (exactly).
  bool send_fp16 = false;
  if (IsFloat16(*a_array) && (!b_array.has_value() || IsFloat16(*b_array))) {
    auto accepts = AcceptsFloat16(**client);
    if (!accepts.ok()) return Fail(accepts.status(), "GetInfo");
    send_fp16 = *accepts;
  }
  auto a = MakeInput(*std::move(a_array), absl::GetFlag(FLAGS_a), send_fp16);
  if (!a.ok()) return Fail(a.status(), "reading --a");
  std::optional<Input> b;
  if (b_array.has_value()) {
    auto made = MakeInput(*std::move(b_array), absl::GetFlag(FLAGS_b), send_fp16);
    if (!made.ok()) return Fail(made.status(), "reading --b");
    b = *std::move(made);
    b_shape = b->Ref().shape;
  }
  // With --gallery, B is empty: the gallery on the server plays it.
  const simserve::TensorRef b_ref = b.has_value() ? b->Ref() : simserve::TensorRef{};
  const double load_ms = MillisSince(load_start);

  const std::string out = absl::GetFlag(FLAGS_out);
  auto spec = simserve::OutputSize(a->Ref().shape, b_shape, options);
  if (!spec.ok()) return Fail(spec.status(), "Similarity");
  const auto create_start = std::chrono::steady_clock::now();
  auto output = Output::Create(*spec, out, absl::GetFlag(FLAGS_indices_out));
  if (!output.ok()) return Fail(output.status(), "writing the result");
  double save_ms = MillisSince(create_start);

  std::vector<double> walls;
  absl::StatusOr<simserve::CallInfo> result;
  for (int i = 0; i < repeat; ++i) {
    result = (*client)->Similarity(a->Ref(), b_ref, options, output->ref(), *mode);
    if (!result.ok()) {
      output->Discard();
      return Fail(result.status(), "Similarity");
    }
    walls.push_back(result->client_wall_ms);
    if (repeat > 1) {
      absl::PrintF("run %d: client wall %.2f ms, server total %s\n", i + 1, result->client_wall_ms,
                   Ms(result->server.total_ms));
    }
  }
  const auto finish_start = std::chrono::steady_clock::now();
  if (absl::Status s = output->Finish(); !s.ok()) {
    output->Discard();
    return Fail(s, "writing the result");
  }
  save_ms += MillisSince(finish_start);

  const double in_mb = static_cast<double>(a->Ref().data.size() + b_ref.data.size()) / 1e6;
  const double out_mb = static_cast<double>(output->wire_bytes()) / 1e6;
  std::sort(walls.begin(), walls.end());
  const double median = walls[walls.size() / 2];
  absl::PrintF("result: shape [%s] %s via %s (%d message%s)%s%s%s\n",
               absl::StrJoin(result->shape, ", "), DataTypeName(result->dtype),
               simserve::Name(result->mode), result->chunks, result->chunks == 1 ? "" : "s",
               options.gallery.empty() ? "" : absl::StrCat(" against gallery ", options.gallery),
               out.empty() ? "" : " -> ", out);
  const std::string median_note =
      repeat > 1 ? absl::StrFormat(" (median of %d: %.2f ms)", repeat, median) : "";
  absl::PrintF("client wall %.2f ms%s | server queue %s, compute %s, total %s\n",
               result->client_wall_ms, median_note, Ms(result->server.queue_ms),
               Ms(result->server.compute_ms), Ms(result->server.total_ms));
  absl::PrintF("transfer %.3f MB in + %.3f MB out = %.1f MB/s | load %.1f ms, save %.1f ms\n",
               in_mb, out_mb, (in_mb + out_mb) / (median / 1e3), load_ms, save_ms);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  absl::FlagsUsageConfig usage_config;
  usage_config.contains_help_flags = [](absl::string_view path) {
    return absl::StrContains(path, "simserve_cli");
  };
  usage_config.contains_helpshort_flags = usage_config.contains_help_flags;
  absl::SetFlagsUsageConfig(usage_config);
  absl::SetProgramUsageMessage(
      "computes S[k][i][j] = sim(A[k][i], B[k][j]) on a simserve server.\n"
      "  simserve-cli --target localhost:50051 --a a.npy --b b.npy --out s.npy "
      "--metric cosine\n"
      "  simserve-cli --target localhost:50051 --info\n"
      "  simserve-cli --register_gallery faces --b faces.npy --storage_dtype bfloat16\n"
      "  simserve-cli --a queries.npy --gallery faces --top_k 10 --out top.npy\n"
      "  simserve-cli --list_galleries | --get_gallery faces | --delete_gallery faces\n"
      "Exit status: 0 success, 1 call or file error, 2 usage error.");
  const std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  if (positional.size() > 1) {
    std::fprintf(stderr, "simserve-cli: unexpected argument '%s' (see --help)\n", positional[1]);
    return kExitUsage;
  }
  return Run();
}
