// InferenceService: the Open Inference Protocol (KServe v2) front end,
// inference.GRPCInferenceService (proto/inference/grpc_service.proto), on the same port as
// simserve.v1.Similarity. A ModelInfer request is translated into the native ComputeRequest
// (TranslateInferRequest) and runs through exactly the native code path: StartComputeCall's
// validation, limits, admission and shared memory, the TilePipeline, Conclude's metrics.
// Models: cosine, dot, euclidean, squared_euclidean (inputs A and B) and every gallery
// under its own name (input A; metric from the `metric` parameter).
#ifndef SIMSERVE_SERVER_INFERENCE_SERVICE_H_
#define SIMSERVE_SERVER_INFERENCE_SERVICE_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "inference/grpc_service.grpc.pb.h"
#include "server/call_setup.h"
#include "server/mutex.h"
#include "server/wire_codec.h"

namespace simserve {

// One output of a ModelInfer call, in the order of the response.
struct InferOutput {
  enum class Part { kValues, kIndices };
  std::string name;  // "S", "VALUES" or "INDICES"
  Part part = Part::kValues;
  bool to_shared_memory = false;  // written into a region, no raw_output_contents bytes
};

// A ModelInferRequest in native terms.
struct TranslatedInfer {
  v1::ComputeRequest request;  // tensors sent raw have raw = "" (bytes at a_raw / b_raw)
  std::optional<codec::Range> a_raw;
  std::optional<codec::Range> b_raw;
  std::vector<InferOutput> outputs;
  std::string model;  // the model name as requested
};

// What TranslateInferRequest needs to know about the server's models.
struct InferModels {
  // Whether `name` is a gallery (and so a model with input A only).
  std::function<bool(const std::string& name)> is_gallery;
};

// Translates `decoded` into a ComputeRequest. NOT_FOUND: unknown model or version.
// INVALID_ARGUMENT: unknown, missing or repeated inputs or outputs, datatypes other than
// FP32/FP16/BF16, typed contents other than fp32_contents (or for half types), a wrong
// number of raw_input_contents, parameters of the wrong type or unknown names, top_k < 0,
// outputs that do not exist in this mode (S with top_k > 0, VALUES/INDICES without).
// Shapes, sizes, values and limits are checked by the native validation afterwards.
// Typed fp32_contents are moved out of `decoded` (not copied).
absl::StatusOr<TranslatedInfer> TranslateInferRequest(codec::DecodedModelInferRequest* decoded,
                                                      const InferModels& models);

// The generated service with ModelInfer and ModelStreamInfer in raw form (tensors are
// decoded and results encoded without copying payloads).
using InferenceServiceBase = inference::GRPCInferenceService::WithRawCallbackMethod_ModelInfer<
    inference::GRPCInferenceService::WithRawCallbackMethod_ModelStreamInfer<
        inference::GRPCInferenceService::WithCallbackMethod_ServerLive<
            inference::GRPCInferenceService::WithCallbackMethod_ServerReady<
                inference::GRPCInferenceService::WithCallbackMethod_ModelReady<
                    inference::GRPCInferenceService::WithCallbackMethod_ServerMetadata<
                        inference::GRPCInferenceService::WithCallbackMethod_ModelMetadata<
                            inference::GRPCInferenceService::WithCallbackMethod_ModelConfig<
                                inference::GRPCInferenceService::WithCallbackMethod_ModelStatistics<
                                    inference::GRPCInferenceService::WithCallbackMethod_RepositoryIndex<
                                        inference::GRPCInferenceService::
                                            WithCallbackMethod_SystemSharedMemoryStatus<
                                                inference::GRPCInferenceService::
                                                    WithCallbackMethod_SystemSharedMemoryRegister<
                                                        inference::GRPCInferenceService::
                                                            WithCallbackMethod_SystemSharedMemoryUnregister<
                                                                inference::GRPCInferenceService::
                                                                    Service>>>>>>>>>>>>>;

// Thread-safe. `env` (and everything it points to) is borrowed and must outlive the service
// and every call (SimilarityService::env()).
class InferenceService final : public InferenceServiceBase {
 public:
  explicit InferenceService(const ServiceEnv& env);

  grpc::ServerUnaryReactor* ServerLive(grpc::CallbackServerContext* context,
                                       const inference::ServerLiveRequest* request,
                                       inference::ServerLiveResponse* response) override;
  grpc::ServerUnaryReactor* ServerReady(grpc::CallbackServerContext* context,
                                        const inference::ServerReadyRequest* request,
                                        inference::ServerReadyResponse* response) override;
  grpc::ServerUnaryReactor* ModelReady(grpc::CallbackServerContext* context,
                                       const inference::ModelReadyRequest* request,
                                       inference::ModelReadyResponse* response) override;
  grpc::ServerUnaryReactor* ServerMetadata(grpc::CallbackServerContext* context,
                                           const inference::ServerMetadataRequest* request,
                                           inference::ServerMetadataResponse* response) override;
  grpc::ServerUnaryReactor* ModelMetadata(grpc::CallbackServerContext* context,
                                          const inference::ModelMetadataRequest* request,
                                          inference::ModelMetadataResponse* response) override;
  grpc::ServerUnaryReactor* ModelConfig(grpc::CallbackServerContext* context,
                                        const inference::ModelConfigRequest* request,
                                        inference::ModelConfigResponse* response) override;
  grpc::ServerUnaryReactor* ModelStatistics(grpc::CallbackServerContext* context,
                                            const inference::ModelStatisticsRequest* request,
                                            inference::ModelStatisticsResponse* response) override;
  grpc::ServerUnaryReactor* RepositoryIndex(grpc::CallbackServerContext* context,
                                            const inference::RepositoryIndexRequest* request,
                                            inference::RepositoryIndexResponse* response) override;
  grpc::ServerUnaryReactor* SystemSharedMemoryStatus(
      grpc::CallbackServerContext* context,
      const inference::SystemSharedMemoryStatusRequest* request,
      inference::SystemSharedMemoryStatusResponse* response) override;
  grpc::ServerUnaryReactor* SystemSharedMemoryRegister(
      grpc::CallbackServerContext* context,
      const inference::SystemSharedMemoryRegisterRequest* request,
      inference::SystemSharedMemoryRegisterResponse* response) override;
  grpc::ServerUnaryReactor* SystemSharedMemoryUnregister(
      grpc::CallbackServerContext* context,
      const inference::SystemSharedMemoryUnregisterRequest* request,
      inference::SystemSharedMemoryUnregisterResponse* response) override;

  // ModelInferRequest -> ModelInferResponse.
  grpc::ServerUnaryReactor* ModelInfer(grpc::CallbackServerContext* context,
                                       const grpc::ByteBuffer* request,
                                       grpc::ByteBuffer* response) override;
  // Stream of ModelInferRequest -> one ModelStreamInferResponse each, in order.
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* ModelStreamInfer(
      grpc::CallbackServerContext* context) override;

  // Per-model counters (ModelStatistics). Thread-safe.
  class Statistics {
   public:
    void Record(const std::string& model, bool ok, absl::Duration total, absl::Duration queue,
                absl::Duration compute) ABSL_LOCKS_EXCLUDED(mu_);
    void Fill(const std::string& model, inference::ModelStatistics* out) const
        ABSL_LOCKS_EXCLUDED(mu_);

   private:
    struct Counts {
      uint64_t success = 0, success_ns = 0, fail = 0, fail_ns = 0;
      uint64_t queue_ns = 0, compute_ns = 0;
      uint64_t last_unix_ms = 0;
    };
    mutable Mutex mu_;
    std::map<std::string, Counts> counts_ ABSL_GUARDED_BY(mu_);
  };

 private:
  // The names of every model: the metric models and the galleries.
  std::vector<std::string> ModelNames() const;
  bool IsModel(const std::string& name, const std::string& version) const;

  const ServiceEnv env_;
  InferModels models_;
  Statistics statistics_;
};

}  // namespace simserve

#endif  // SIMSERVE_SERVER_INFERENCE_SERVICE_H_
