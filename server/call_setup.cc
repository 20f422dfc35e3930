// The preamble shared by the compute calls (call_setup.h).
#include "server/call_setup.h"

#include <algorithm>
#include <utility>

namespace simserve {

absl::Status DrainingError() {
  return absl::UnavailableError("server is draining (shutting down); retry on another replica");
}

int64_t UploadReservationStep(const ServerConfig& config) {
  return 2 * config.compute.upload_read_ahead_bytes;
}

absl::StatusOr<Admitted> ValidateAndAdmit(const ServiceEnv& env, const v1::ComputeRequest& request,
                                          RequestKind kind, const RawPayloadSizes* raw_sizes,
                                          const std::string& peer) {
  if (env.draining->load()) {
    env.metrics->Reject(RejectReason::kDraining);
    return DrainingError();
  }
  std::shared_ptr<const Gallery> gallery;
  GalleryDims dims;
  if (!request.gallery().empty()) {
    auto acquired = env.galleries->Acquire(request.gallery(), request.gallery_version());
    if (!acquired.ok()) return acquired.status();
    gallery = *std::move(acquired);
    const kernels::GalleryShape& g = gallery->prepared->shape();
    dims = {.rank = gallery->two_d() ? 2 : 3, .batch = g.entries, .m = g.m, .d = g.d};
  }
  RejectReason reason = RejectReason::kTooManyElements;
  auto converted = ConvertRequest(request, kind, env.config.limits, &reason, raw_sizes,
                                  gallery != nullptr ? &dims : nullptr);
  if (!converted.ok()) {
    if (converted.status().code() == absl::StatusCode::kResourceExhausted) {
      env.metrics->Reject(reason);
    }
    return converted.status();
  }
  const ProblemSpec& spec = converted->spec;
  const int64_t input_bytes = spec.a_bytes + spec.b_bytes;
  const int64_t deferred =
      kind == RequestKind::kUpload
          ? input_bytes - std::min(input_bytes, UploadReservationStep(env.config))
          : 0;
  auto admission =
      env.pool->Admit(spec.InflightBytes(kind, env.config.compute.stream_window) - deferred, peer);
  if (!admission.ok()) return admission.status();
  std::shared_ptr<const kernels::PreparedGallery> prepared;
  if (gallery != nullptr) {
    GalleryStore::MarkUsed(*gallery);               // only admitted calls count as use
    prepared = {gallery, gallery->prepared.get()};  // owns the version
  }
  return Admitted{*std::move(converted), *std::move(admission), std::move(prepared), deferred};
}

TilePipeline::Deps PipelineDeps(const ServiceEnv& env) {
  return {.engine = env.engine,
          .pool = env.pool,
          .stats = env.stats,
          .buffers = env.buffers,
          .window = env.config.compute.stream_window,
          .parallel_tiles = env.pool->workers(),
          .max_pending_input_bytes = env.config.compute.upload_read_ahead_bytes,
          .inline_max_flops = env.config.compute.inline_max_flops,
          .inline_max_input_bytes = env.config.compute.inline_max_input_bytes};
}

}  // namespace simserve
