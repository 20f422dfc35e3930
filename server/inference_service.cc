// The Open Inference Protocol front end (inference_service.h). The reactors are thin: they
// decode the request without copying its raw inputs, translate it into a ComputeRequest and
// hand it to StartComputeCall and a TilePipeline, exactly as the native Compute does; the
// result's buffers become raw_output_contents slices without a copy.
#include "server/inference_service.h"

#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "server/convert.h"
#include "server/log.h"
#include "server/service.h"
#include "server/shared_memory_rpc.h"
#include "server/status.h"

namespace simserve {
namespace {

constexpr char kModelInfer[] = "ModelInfer";
constexpr char kModelStreamInfer[] = "ModelStreamInfer";
constexpr char kModelVersion[] = "1";
constexpr char kPlatform[] = "simserve";

struct MetricModel {
  const char* name;
  v1::Metric metric;
};
constexpr MetricModel kMetricModels[] = {{"cosine", v1::COSINE},
                                         {"dot", v1::DOT},
                                         {"euclidean", v1::EUCLIDEAN},
                                         {"squared_euclidean", v1::SQUARED_EUCLIDEAN}};

const MetricModel* FindMetricModel(absl::string_view name) {
  for (const MetricModel& m : kMetricModels) {
    if (name == m.name) return &m;
  }
  return nullptr;
}

// Request parameters Triton's clients may set that mean nothing here.
bool IsIgnoredParameter(absl::string_view name) {
  for (absl::string_view ignored :
       {"sequence_id", "sequence_start", "sequence_end", "priority", "timeout"}) {
    if (name == ignored) return true;
  }
  return false;
}

constexpr char kRegionParam[] = "shared_memory_region";
constexpr char kByteSizeParam[] = "shared_memory_byte_size";
constexpr char kOffsetParam[] = "shared_memory_offset";

absl::StatusOr<v1::DataType> DataTypeFromName(absl::string_view tensor, absl::string_view name) {
  if (name == "FP32") return v1::FLOAT32;
  if (name == "FP16") return v1::FLOAT16;
  if (name == "BF16") return v1::BFLOAT16;
  return absl::InvalidArgumentError(absl::StrCat("input ", tensor, ": datatype '", name,
                                                 "' is not supported (FP32, FP16, BF16)"));
}

const char* DataTypeName(v1::DataType dtype) {
  switch (dtype) {
    case v1::FLOAT16:
      return "FP16";
    case v1::BFLOAT16:
      return "BF16";
    default:
      return "FP32";
  }
}

absl::StatusOr<std::string> StringParam(absl::string_view name,
                                        const inference::InferParameter& p) {
  if (p.parameter_choice_case() != inference::InferParameter::kStringParam) {
    return absl::InvalidArgumentError(absl::StrCat("parameter ", name, " must be a string"));
  }
  return p.string_param();
}

absl::StatusOr<int64_t> IntParam(absl::string_view name, const inference::InferParameter& p) {
  if (p.parameter_choice_case() == inference::InferParameter::kInt64Param) return p.int64_param();
  if (p.parameter_choice_case() == inference::InferParameter::kUint64Param &&
      p.uint64_param() <= static_cast<uint64_t>(INT64_MAX)) {
    return static_cast<int64_t>(p.uint64_param());
  }
  return absl::InvalidArgumentError(absl::StrCat("parameter ", name, " must be an integer"));
}

// The shared-memory parameters of an input or output: nullopt when it names no region.
// INVALID_ARGUMENT for other parameters or a region without its byte size.
using ParameterMap = google::protobuf::Map<std::string, inference::InferParameter>;
absl::StatusOr<std::optional<v1::SharedMemoryRef>> SharedMemoryParams(absl::string_view what,
                                                                      const ParameterMap& params) {
  std::optional<v1::SharedMemoryRef> ref;
  bool have_size = false;
  for (const auto& [name, value] : params) {
    const std::string label = absl::StrCat(what, " parameter ", name);
    if (name == kRegionParam) {
      auto region = StringParam(label, value);
      if (!region.ok()) return region.status();
      if (!ref) ref.emplace();
      ref->set_region(*region);
    } else if (name == kByteSizeParam || name == kOffsetParam) {
      auto number = IntParam(label, value);
      if (!number.ok()) return number.status();
      if (!ref) ref.emplace();
      if (name == kByteSizeParam) {
        ref->set_byte_size(*number);
        have_size = true;
      } else {
        ref->set_offset(*number);
      }
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": unknown parameter '", name, "' (shared_memory_region, shared_memory_byte_size, ",
          "shared_memory_offset)"));
    }
  }
  if (ref && (ref->region().empty() || !have_size)) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": shared memory needs both shared_memory_region and shared_memory_byte_size"));
  }
  return ref;
}

// Request-level parameters into `request`.
absl::Status ApplyParameters(const inference::ModelInferRequest& infer, bool gallery_model,
                             v1::ComputeRequest* request) {
  for (const auto& [name, value] : infer.parameters()) {
    if (IsIgnoredParameter(name)) continue;
    if (name == "top_k") {
      auto k = IntParam(name, value);
      if (!k.ok()) return k.status();
      if (*k < 0 || *k > UINT32_MAX) {
        return absl::InvalidArgumentError(
            absl::StrCat("parameter top_k = ", *k, " is out of range"));
      }
      request->set_top_k(static_cast<uint32_t>(*k));
    } else if (name == "epsilon") {
      if (value.parameter_choice_case() == inference::InferParameter::kDoubleParam) {
        request->set_epsilon(static_cast<float>(value.double_param()));
      } else {
        auto e = IntParam(name, value);
        if (!e.ok()) return absl::InvalidArgumentError("parameter epsilon must be a number");
        request->set_epsilon(static_cast<float>(*e));
      }
    } else if (name == "precision") {
      auto p = StringParam(name, value);
      if (!p.ok()) return p.status();
      if (*p == "FP32") {
        request->set_precision(v1::FP32);
      } else if (*p == "BF16") {
        request->set_precision(v1::BF16);
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat("parameter precision = '", *p, "' (FP32 or BF16)"));
      }
    } else if (name == "output_dtype") {
      auto d = StringParam(name, value);
      if (!d.ok()) return d.status();
      auto dtype = DataTypeFromName("output_dtype", *d);
      if (!dtype.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("parameter output_dtype = '", *d, "' (FP32, FP16 or BF16)"));
      }
      request->set_output_dtype(*dtype);
    } else if (name == "metric" && gallery_model) {
      auto m = StringParam(name, value);
      if (!m.ok()) return m.status();
      const MetricModel* metric = FindMetricModel(*m);
      if (metric == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat(
            "parameter metric = '", *m, "' (cosine, dot, euclidean or squared_euclidean)"));
      }
      request->set_metric(metric->metric);
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown parameter '", name,
                                                     "' (top_k, epsilon, precision, output_dtype",
                                                     gallery_model ? ", metric" : "", ")"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<TranslatedInfer> TranslateInferRequest(codec::DecodedModelInferRequest* decoded,
                                                      const InferModels& models) {
  inference::ModelInferRequest& infer = decoded->request;
  TranslatedInfer out;
  out.model = infer.model_name();
  v1::ComputeRequest& request = out.request;
  const MetricModel* metric = FindMetricModel(infer.model_name());
  const bool gallery_model = metric == nullptr && models.is_gallery(infer.model_name());
  if (metric == nullptr && !gallery_model) {
    return absl::NotFoundError(absl::StrCat("unknown model '", infer.model_name(),
                                            "' (cosine, dot, euclidean, squared_euclidean, or a "
                                            "gallery's name)"));
  }
  if (!infer.model_version().empty() && infer.model_version() != kModelVersion) {
    return absl::NotFoundError(absl::StrCat("model '", infer.model_name(), "' has no version '",
                                            infer.model_version(), "' (only \"1\")"));
  }
  if (metric != nullptr) request.set_metric(metric->metric);
  if (gallery_model) request.set_gallery(infer.model_name());
  if (absl::Status params = ApplyParameters(infer, gallery_model, &request); !params.ok()) {
    return params;
  }

  // Inputs: raw_input_contents go, in order, to the inputs that carry neither typed contents
  // nor a region.
  size_t next_raw = 0;
  bool have_a = false;
  bool have_b = false;
  for (auto& input : *infer.mutable_inputs()) {
    const bool is_a = input.name() == "A";
    if (!is_a && (input.name() != "B" || gallery_model)) {
      return absl::InvalidArgumentError(absl::StrCat("unknown input '", input.name(), "' (model '",
                                                     infer.model_name(), "' takes ",
                                                     gallery_model ? "A" : "A and B", ")"));
    }
    bool& seen = is_a ? have_a : have_b;
    if (seen)
      return absl::InvalidArgumentError(absl::StrCat("input ", input.name(), " given twice"));
    seen = true;
    v1::Tensor* tensor = is_a ? request.mutable_a() : request.mutable_b();
    auto dtype = DataTypeFromName(input.name(), input.datatype());
    if (!dtype.ok()) return dtype.status();
    tensor->set_dtype(*dtype);
    for (int64_t dim : input.shape()) tensor->add_shape(dim);
    auto shm = SharedMemoryParams(absl::StrCat("input ", input.name()), input.parameters());
    if (!shm.ok()) return shm.status();
    const auto& contents = input.contents();
    const bool has_contents = input.has_contents() && contents.ByteSizeLong() > 0;
    if (shm->has_value()) {
      *tensor->mutable_shared_memory() = **shm;
    } else if (has_contents) {
      if (*dtype != v1::FLOAT32 || contents.fp32_contents_size() == 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("input ", input.name(),
                         ": typed contents are accepted as fp32_contents of an FP32 "
                         "input only; send FP16/BF16 in raw_input_contents"));
      }
      // Moved, not copied: typed inputs can be megabytes and this runs on a gRPC thread.
      tensor->mutable_values()->mutable_values()->Swap(
          input.mutable_contents()->mutable_fp32_contents());
    } else {
      if (next_raw >= decoded->raw_inputs.size()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "input ", input.name(), " has no data: raw_input_contents has ",
            decoded->raw_inputs.size(), " entries (one per input without contents or region)"));
      }
      tensor->set_raw("");
      (is_a ? out.a_raw : out.b_raw) = decoded->raw_inputs[next_raw++];
    }
  }
  if (next_raw != decoded->raw_inputs.size()) {
    return absl::InvalidArgumentError(absl::StrCat("raw_input_contents has ",
                                                   decoded->raw_inputs.size(), " entries but ",
                                                   next_raw, " inputs take raw data"));
  }
  if (!have_a || (!gallery_model && !have_b)) {
    return absl::InvalidArgumentError(absl::StrCat("missing input ", have_a ? "B" : "A",
                                                   " (model '", infer.model_name(), "' takes ",
                                                   gallery_model ? "A" : "A and B", ")"));
  }

  // Outputs: S for dense results, VALUES and INDICES for top-k; all of them by default.
  const bool top_k = request.top_k() > 0;
  auto part_of = [&](absl::string_view name) -> std::optional<InferOutput::Part> {
    if (!top_k && name == "S") return InferOutput::Part::kValues;
    if (top_k && name == "VALUES") return InferOutput::Part::kValues;
    if (top_k && name == "INDICES") return InferOutput::Part::kIndices;
    return std::nullopt;
  };
  const char* available = top_k ? "VALUES and INDICES (top_k > 0)" : "S (top_k = 0)";
  if (infer.outputs().empty()) {
    if (top_k) {
      out.outputs = {{"VALUES", InferOutput::Part::kValues},
                     {"INDICES", InferOutput::Part::kIndices}};
    } else {
      out.outputs = {{"S", InferOutput::Part::kValues}};
    }
  }
  for (const auto& requested : infer.outputs()) {
    auto part = part_of(requested.name());
    if (!part.has_value()) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown output '", requested.name(), "': this request has ", available));
    }
    for (const InferOutput& o : out.outputs) {
      if (o.part == *part) {
        return absl::InvalidArgumentError(
            absl::StrCat("output ", requested.name(), " requested twice"));
      }
    }
    auto shm =
        SharedMemoryParams(absl::StrCat("output ", requested.name()), requested.parameters());
    if (!shm.ok()) return shm.status();
    InferOutput o{.name = requested.name(), .part = *part, .to_shared_memory = shm->has_value()};
    if (shm->has_value()) {
      *(o.part == InferOutput::Part::kValues ? request.mutable_values_shared_memory()
                                             : request.mutable_indices_shared_memory()) = **shm;
    }
    out.outputs.push_back(std::move(o));
  }
  return out;
}

namespace {

// The ModelInferResponse of a finished call; the result's buffers become the slices of the
// raw_output_contents (one per output, empty for outputs written to shared memory).
grpc::ByteBuffer EncodeInferResponse(const inference::ModelInferRequest& infer,
                                     const TranslatedInfer& translated, const ProblemSpec& spec,
                                     TileOutput& whole) {
  inference::ModelInferResponse head;
  head.set_model_name(infer.model_name());
  head.set_model_version(kModelVersion);
  head.set_id(infer.id());
  bool any_raw = false;
  for (const InferOutput& o : translated.outputs) {
    inference::ModelInferResponse::InferOutputTensor* tensor = head.add_outputs();
    tensor->set_name(o.name);
    tensor->set_datatype(o.part == InferOutput::Part::kValues
                             ? DataTypeName(ToProto(spec.options.output_dtype))
                             : "INT32");
    for (int64_t dim : spec.OutputShape()) tensor->add_shape(dim);
    any_raw = any_raw || !o.to_shared_memory;
  }
  std::vector<codec::PayloadField> payloads;
  if (any_raw) {
    for (const InferOutput& o : translated.outputs) {
      codec::PayloadField field{
          .field_number = inference::ModelInferResponse::kRawOutputContentsFieldNumber,
          .keep_empty = true};
      if (!o.to_shared_memory) {
        const bool values = o.part == InferOutput::Part::kValues;
        field.data = std::move(values ? whole.values : whole.indices);
        field.size = values ? whole.values_bytes : whole.indices_bytes;
      }
      payloads.push_back(std::move(field));
    }
  }
  return codec::EncodeWithPayloads(head, std::move(payloads));
}

// A request decoded and translated, ready for StartComputeCall.
struct ReceivedInfer {
  std::shared_ptr<ReceivedCompute> compute;
  inference::ModelInferRequest infer;  // without raw inputs, for the response's names
  TranslatedInfer translated;
};

// Fills `received`; its `infer` (model name, id) is set even when the translation fails, so a
// stream's error response can name the request that failed.
absl::Status ReceiveInfer(const grpc::ByteBuffer& buffer, const InferModels& models,
                          ReceivedInfer* received) {
  received->compute = std::make_shared<ReceivedCompute>(buffer);
  auto decoded = codec::DecodeModelInferRequest(received->compute->message);
  if (!decoded.ok()) return decoded.status();
  auto translated = TranslateInferRequest(&*decoded, models);
  received->infer = std::move(decoded->request);
  if (!translated.ok()) return translated.status();
  received->translated = *std::move(translated);
  received->compute->request = std::move(received->translated.request);
  received->compute->a_raw = received->translated.a_raw;
  received->compute->b_raw = received->translated.b_raw;
  return absl::OkStatus();
}

// ModelInfer: the pipeline in whole-result mode, as the native Compute.
class InferCall final : public grpc::ServerUnaryReactor, private TilePipeline::Sink {
 public:
  InferCall(const ServiceEnv& env, const InferModels& models,
            InferenceService::Statistics* statistics, grpc::CallbackServerContext* context,
            const grpc::ByteBuffer* request, grpc::ByteBuffer* response)
      : env_(env),
        statistics_(statistics),
        context_(context),
        response_(response),
        pipeline_(PipelineDeps(env), TilePipeline::Mode::kWholeResult, this, DeadlineOf(context)) {
    env_.metrics->AddInFlight(1);
    absl::Status started = Start(models, *request);
    if (!started.ok()) FailUnlessCancelled(context_, *request, &pipeline_, std::move(started));
  }

  void OnCancel() override { pipeline_.Cancel(); }
  void OnDone() override {
    env_.metrics->AddInFlight(-1);
    delete this;  // gRPC callback API: the reactor owns itself.
  }

 private:
  absl::Status Start(const InferModels& models, const grpc::ByteBuffer& request) {
    if (absl::Status received = ReceiveInfer(request, models, &received_); !received.ok()) {
      return received;
    }
    model_ = received_.translated.model;
    return StartComputeCall(env_, received_.compute, RequestKind::kUnary, PeerKey(context_),
                            &pipeline_, &spec_);
  }
  void WriteTile(std::unique_ptr<TileOutput> /*tile*/) override {}  // whole mode: never called
  void ResumeReading() override {}                                  // all input is present
  void Finish(const absl::Status& status, const PipelineReport& report,
              std::unique_ptr<TileOutput> whole) override {
    if (status.ok()) {
      *response_ = EncodeInferResponse(received_.infer, received_.translated, spec_, *whole);
    }
    if (!model_.empty()) {  // a request naming a model (statistics are per model)
      statistics_->Record(model_, status.ok(), absl::Now() - report.timings.start,
                          report.timings.queue, report.timings.compute);
    }
    grpc::ServerUnaryReactor::Finish(Conclude(env_, context_, kModelInfer, report, status));
  }

  const ServiceEnv env_;
  InferenceService::Statistics* const statistics_;
  grpc::CallbackServerContext* const context_;
  grpc::ByteBuffer* const response_;
  // Written before the pipeline starts, read when it finishes.
  ReceivedInfer received_;
  std::string model_;
  ProblemSpec spec_;
  TilePipeline pipeline_;
};

// ModelStreamInfer: one request at a time, each through its own pipeline; a failed request
// gets a response with error_message and the stream goes on.
class StreamInferCall final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>,
                              private TilePipeline::Sink {
 public:
  StreamInferCall(const ServiceEnv& env, const InferModels& models,
                  InferenceService::Statistics* statistics, grpc::CallbackServerContext* context)
      : env_(env), models_(models), statistics_(statistics), context_(context) {
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the client half-closed (or went away): every response has been written
      ServerBidiReactor::Finish(grpc::Status::OK);
      return;
    }
    TilePipeline* pipeline = nullptr;
    {
      MutexLock lock(&mu_);
      // The previous request's pipeline finished before its response was written; the one
      // before that is surely past its last action.
      retired_ = std::move(current_);
      current_ = std::make_unique<TilePipeline>(
          PipelineDeps(env_), TilePipeline::Mode::kWholeResult,
          static_cast<TilePipeline::Sink*>(this), DeadlineOf(context_));
      pipeline = current_.get();
    }
    env_.metrics->AddInFlight(1);
    model_.clear();
    received_ = ReceivedInfer();
    absl::Status started = ReceiveInfer(request_, models_, &received_);
    if (started.ok()) {
      model_ = received_.translated.model;
      started = StartComputeCall(env_, received_.compute, RequestKind::kUnary, PeerKey(context_),
                                 pipeline, &spec_);
    }
    if (!started.ok()) FailUnlessCancelled(context_, request_, pipeline, std::move(started));
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      ServerBidiReactor::Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"));
      return;
    }
    StartRead(&request_);
  }

  void OnCancel() override {
    MutexLock lock(&mu_);
    if (current_ != nullptr) current_->Cancel();
  }
  void OnDone() override { delete this; }

 private:
  void WriteTile(std::unique_ptr<TileOutput> /*tile*/) override {}
  void ResumeReading() override {}
  void Finish(const absl::Status& status, const PipelineReport& report,
              std::unique_ptr<TileOutput> whole) override {
    grpc::ByteBuffer inner;
    grpc::Status grpc_status =
        Conclude(env_, context_, kModelStreamInfer, report, status, /*trailing_metadata=*/false);
    if (!model_.empty()) {
      statistics_->Record(model_, status.ok(), absl::Now() - report.timings.start,
                          report.timings.queue, report.timings.compute);
    }
    env_.metrics->AddInFlight(-1);
    if (status.ok()) {
      response_ = codec::WrapAsField(
          inference::ModelStreamInferResponse::kInferResponseFieldNumber,
          EncodeInferResponse(received_.infer, received_.translated, spec_, *whole));
    } else {
      inference::ModelStreamInferResponse failed;
      failed.set_error_message(
          absl::StrCat(CodeName(grpc_status.error_code()), ": ", grpc_status.error_message()));
      failed.mutable_infer_response()->set_model_name(received_.infer.model_name());
      failed.mutable_infer_response()->set_id(received_.infer.id());
      response_ = codec::EncodeWithPayloads(failed, {});
    }
    received_ = ReceivedInfer();
    StartWrite(&response_);
  }

  const ServiceEnv env_;
  const InferModels& models_;
  InferenceService::Statistics* const statistics_;
  grpc::CallbackServerContext* const context_;
  grpc::ByteBuffer request_;
  grpc::ByteBuffer response_;
  // The request in progress; one at a time (the next is read after its response is written).
  ReceivedInfer received_;
  std::string model_;
  ProblemSpec spec_;
  Mutex mu_;  // OnCancel runs concurrently with the request's start
  std::unique_ptr<TilePipeline> current_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<TilePipeline> retired_ ABSL_GUARDED_BY(mu_);
};

absl::Status UnknownModelError(const std::string& name, const std::string& version) {
  return absl::NotFoundError(absl::StrCat("unknown model '", name, "' version '", version,
                                          "' (models: cosine, dot, euclidean, squared_euclidean "
                                          "and the galleries; version \"\" or \"1\")"));
}

void AddTensor(
    const char* name, const char* datatype, std::vector<int64_t> shape,
    google::protobuf::RepeatedPtrField<inference::ModelMetadataResponse::TensorMetadata>* out) {
  auto* tensor = out->Add();
  tensor->set_name(name);
  tensor->set_datatype(datatype);
  for (int64_t dim : shape) tensor->add_shape(dim);
}

}  // namespace

InferenceService::InferenceService(const ServiceEnv& env) : env_(env) {
  GalleryStore* galleries = env_.galleries;
  models_.is_gallery = [galleries](const std::string& name) {
    return galleries != nullptr && galleries->Get(name).ok();
  };
}

void InferenceService::Statistics::Record(const std::string& model, bool ok, absl::Duration total,
                                          absl::Duration queue, absl::Duration compute) {
  const auto ns = [](absl::Duration d) {
    return static_cast<uint64_t>(absl::ToInt64Nanoseconds(d));
  };
  MutexLock lock(&mu_);
  Counts& c = counts_[model];
  if (ok) {
    ++c.success;
    c.success_ns += ns(total);
    c.queue_ns += ns(queue);
    c.compute_ns += ns(compute);
    c.last_unix_ms = static_cast<uint64_t>(absl::ToUnixMillis(absl::Now()));
  } else {
    ++c.fail;
    c.fail_ns += ns(total);
  }
}

void InferenceService::Statistics::Fill(const std::string& model,
                                        inference::ModelStatistics* out) const {
  out->set_name(model);
  out->set_version(kModelVersion);
  MutexLock lock(&mu_);
  auto it = counts_.find(model);
  if (it == counts_.end()) return;
  const Counts& c = it->second;
  out->set_last_inference(c.last_unix_ms);
  out->set_inference_count(c.success);
  out->set_execution_count(c.success);
  inference::InferStatistics* stats = out->mutable_inference_stats();
  stats->mutable_success()->set_count(c.success);
  stats->mutable_success()->set_ns(c.success_ns);
  stats->mutable_fail()->set_count(c.fail);
  stats->mutable_fail()->set_ns(c.fail_ns);
  stats->mutable_queue()->set_count(c.success);
  stats->mutable_queue()->set_ns(c.queue_ns);
  stats->mutable_compute_infer()->set_count(c.success);
  stats->mutable_compute_infer()->set_ns(c.compute_ns);
}

std::vector<std::string> InferenceService::ModelNames() const {
  std::vector<std::string> names;
  for (const MetricModel& m : kMetricModels) names.emplace_back(m.name);
  if (env_.galleries != nullptr) {
    for (const auto& gallery : env_.galleries->List()) {
      if (FindMetricModel(gallery->name) == nullptr) names.push_back(gallery->name);
    }
  }
  return names;
}

bool InferenceService::IsModel(const std::string& name, const std::string& version) const {
  return (version.empty() || version == kModelVersion) &&
         (FindMetricModel(name) != nullptr || models_.is_gallery(name));
}

grpc::ServerUnaryReactor* InferenceService::ServerLive(grpc::CallbackServerContext* context,
                                                       const inference::ServerLiveRequest*,
                                                       inference::ServerLiveResponse* response) {
  response->set_live(true);
  return FinishUnary(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* InferenceService::ServerReady(grpc::CallbackServerContext* context,
                                                        const inference::ServerReadyRequest*,
                                                        inference::ServerReadyResponse* response) {
  response->set_ready(!env_.draining->load());
  return FinishUnary(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* InferenceService::ModelReady(grpc::CallbackServerContext* context,
                                                       const inference::ModelReadyRequest* request,
                                                       inference::ModelReadyResponse* response) {
  response->set_ready(!env_.draining->load() && IsModel(request->name(), request->version()));
  return FinishUnary(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* InferenceService::ServerMetadata(
    grpc::CallbackServerContext* context, const inference::ServerMetadataRequest*,
    inference::ServerMetadataResponse* response) {
  response->set_name("simserve");
  response->set_version(SIMSERVE_VERSION);
  response->add_extensions("model_configuration");
  response->add_extensions("statistics");
  if (env_.shared_memory != nullptr && env_.shared_memory->allowed()) {
    response->add_extensions("system_shared_memory");
  }
  return FinishUnary(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* InferenceService::ModelMetadata(
    grpc::CallbackServerContext* context, const inference::ModelMetadataRequest* request,
    inference::ModelMetadataResponse* response) {
  if (!IsModel(request->name(), request->version())) {
    return FinishUnary(context, UnknownModelError(request->name(), request->version()));
  }
  response->set_name(request->name());
  response->mutable_versions()->Add(std::string(kModelVersion));
  response->set_platform(kPlatform);
  const bool gallery = FindMetricModel(request->name()) == nullptr;
  int64_t d = -1;
  if (gallery) {
    if (auto g = env_.galleries->Get(request->name()); g.ok()) d = (*g)->shape.back();
  }
  AddTensor("A", "FP32", {-1, -1, d}, response->mutable_inputs());
  if (!gallery) AddTensor("B", "FP32", {-1, -1, -1}, response->mutable_inputs());
  AddTensor("S", "FP32", {-1, -1, -1}, response->mutable_outputs());
  AddTensor("VALUES", "FP32", {-1, -1, -1}, response->mutable_outputs());
  AddTensor("INDICES", "INT32", {-1, -1, -1}, response->mutable_outputs());
  return FinishUnary(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* InferenceService::ModelConfig(
    grpc::CallbackServerContext* context, const inference::ModelConfigRequest* request,
    inference::ModelConfigResponse* response) {
  if (!IsModel(request->name(), request->version())) {
    return FinishUnary(context, UnknownModelError(request->name(), request->version()));
  }
  inference::ModelConfig* config = response->mutable_config();
  config->set_name(request->name());
  config->set_platform(kPlatform);
  config->set_backend(kPlatform);
  config->set_max_batch_size(0);  // the batch dimension is part of the tensors' dims
  auto input = [&](const char* name) {
    inference::ModelInput* in = config->add_input();
    in->set_name(name);
    in->set_data_type(inference::TYPE_FP32);
    for (int i = 0; i < 3; ++i) in->add_dims(-1);
  };
  input("A");
  if (FindMetricModel(request->name()) != nullptr) input("B");
  for (auto [name, type] :
       {std::pair{"S", inference::TYPE_FP32}, std::pair{"VALUES", inference::TYPE_FP32},
        std::pair{"INDICES", inference::TYPE_INT32}}) {
    inference::ModelOutput* out = config->add_output();
    out->set_name(name);
    out->set_data_type(type);
    for (int i = 0; i < 3; ++i) out->add_dims(-1);
  }
  return FinishUnary(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* InferenceService::ModelStatistics(
    grpc::CallbackServerContext* context, const inference::ModelStatisticsRequest* request,
    inference::ModelStatisticsResponse* response) {
  if (request->name().empty()) {
    for (const std::string& name : ModelNames())
      statistics_.Fill(name, response->add_model_stats());
    return FinishUnary(context, absl::OkStatus());
  }
  if (!IsModel(request->name(), request->version())) {
    return FinishUnary(context, UnknownModelError(request->name(), request->version()));
  }
  statistics_.Fill(request->name(), response->add_model_stats());
  return FinishUnary(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* InferenceService::RepositoryIndex(
    grpc::CallbackServerContext* context, const inference::RepositoryIndexRequest*,
    inference::RepositoryIndexResponse* response) {
  for (const std::string& name : ModelNames()) {
    auto* model = response->add_models();
    model->set_name(name);
    model->set_version(kModelVersion);
    model->set_state("READY");
  }
  return FinishUnary(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* InferenceService::SystemSharedMemoryStatus(
    grpc::CallbackServerContext* context, const inference::SystemSharedMemoryStatusRequest* request,
    inference::SystemSharedMemoryStatusResponse* response) {
  return FinishUnary(context, SharedMemoryStatus(*env_.shared_memory, *request, response));
}

grpc::ServerUnaryReactor* InferenceService::SystemSharedMemoryRegister(
    grpc::CallbackServerContext* context,
    const inference::SystemSharedMemoryRegisterRequest* request,
    inference::SystemSharedMemoryRegisterResponse*) {
  return FinishUnary(context, RegisterSharedMemory(*env_.shared_memory, *request, context->peer()));
}

grpc::ServerUnaryReactor* InferenceService::SystemSharedMemoryUnregister(
    grpc::CallbackServerContext* context,
    const inference::SystemSharedMemoryUnregisterRequest* request,
    inference::SystemSharedMemoryUnregisterResponse*) {
  return FinishUnary(context, UnregisterSharedMemory(*env_.shared_memory, *request));
}

grpc::ServerUnaryReactor* InferenceService::ModelInfer(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* request,
                                                       grpc::ByteBuffer* response) {
  return new InferCall(env_, models_, &statistics_, context, request, response);
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* InferenceService::ModelStreamInfer(
    grpc::CallbackServerContext* context) {
  return new StreamInferCall(env_, models_, &statistics_, context);
}

}  // namespace simserve
