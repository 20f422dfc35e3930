// The preamble shared by the compute calls (call_setup.h).
#include "server/call_setup.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"

namespace simserve {
namespace {

// The bytes a SharedMemoryRef names; FAILED_PRECONDITION when shared memory is off.
absl::StatusOr<SharedMemorySpan> ResolveRef(const ServiceEnv& env, absl::string_view what,
                                            const v1::SharedMemoryRef& ref) {
  if (env.shared_memory == nullptr) return SharedMemoryDisabledError();
  return env.shared_memory->Resolve(what, ref.region(), ref.offset(), ref.byte_size());
}

bool Aligned(const std::byte* p, int64_t alignment) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(alignment) == 0;
}

// Where an output part goes: the first `bytes` of its region range, which must hold them
// and be aligned for `element_size`.
absl::StatusOr<SharedMemorySpan> ResolveOutput(const ServiceEnv& env, absl::string_view what,
                                               const v1::SharedMemoryRef& ref, int64_t bytes,
                                               int64_t element_size) {
  auto span = ResolveRef(env, what, ref);
  if (!span.ok()) return span.status();
  if (static_cast<int64_t>(span->bytes.size()) < bytes) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": shared memory byte_size ",
                                                   span->bytes.size(), " is smaller than the ",
                                                   bytes, " bytes of the result"));
  }
  if (!Aligned(span->bytes.data(), element_size)) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": the region's start + offset must be a multiple of ", element_size, " bytes"));
  }
  span->bytes = span->bytes.first(static_cast<size_t>(bytes));
  return span;
}

}  // namespace

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

absl::Status StartComputeCall(const ServiceEnv& env, std::shared_ptr<ReceivedCompute> received,
                              RequestKind kind, const std::string& peer, TilePipeline* pipeline,
                              ProblemSpec* spec) {
  const v1::ComputeRequest& request = received->request;
  RawPayloadSizes sizes{.a = received->a_raw ? received->a_raw->size : 0,
                        .b = received->b_raw ? received->b_raw->size : 0};
  std::optional<SharedMemorySpan> a_shm;
  std::optional<SharedMemorySpan> b_shm;
  for (auto [tensor, shm, size, name] : {std::tuple{&request.a(), &a_shm, &sizes.a, "tensor a"},
                                         std::tuple{&request.b(), &b_shm, &sizes.b, "tensor b"}}) {
    if (!tensor->has_shared_memory()) continue;
    auto span = ResolveRef(env, name, tensor->shared_memory());
    if (!span.ok()) return span.status();
    *size = static_cast<int64_t>(span->bytes.size());
    *shm = *std::move(span);
  }
  auto admitted = ValidateAndAdmit(env, request, kind, &sizes, peer);
  if (!admitted.ok()) return admitted.status();
  *spec = admitted->converted.spec;
  const int64_t rows = spec->shape.batch * spec->shape.n;
  InPlaceIo in_place;
  if (request.has_values_shared_memory()) {
    auto out = ResolveOutput(env, "values_shared_memory", request.values_shared_memory(),
                             rows * spec->value_row_bytes,
                             static_cast<int64_t>(kernels::SizeOf(spec->options.output_dtype)));
    if (!out.ok()) return out.status();
    in_place.values = out->bytes;
    in_place.keep_alive.push_back(std::move(out->region));
  }
  if (request.has_indices_shared_memory()) {
    auto out = ResolveOutput(env, "indices_shared_memory", request.indices_shared_memory(),
                             rows * spec->index_row_bytes, sizeof(int32_t));
    if (!out.ok()) return out.status();
    in_place.indices = out->bytes;
    in_place.keep_alive.push_back(std::move(out->region));
  }
  // Tensor bytes that came over the network (not those read from shared memory).
  env.metrics->AddBytesReceived(
      static_cast<uint64_t>((a_shm ? 0 : spec->a_bytes) + (b_shm ? 0 : spec->b_bytes)));
  // Raw payloads are read where gRPC received them, `values` where protobuf parsed them,
  // shared memory in place (copied instead if misaligned for the element type).
  std::vector<InputPiece> pieces;
  auto add = [&](InputPiece::Tensor tensor, const std::optional<codec::Range>& raw,
                 std::optional<SharedMemorySpan>& shm, const kernels::ConstTensorView& view,
                 int64_t bytes, kernels::DataType dtype,
                 std::span<const std::byte>* in_place_span) {
    if (shm.has_value()) {
      if (Aligned(shm->bytes.data(), static_cast<int64_t>(kernels::SizeOf(dtype)))) {
        *in_place_span = shm->bytes;
        in_place.keep_alive.push_back(std::move(shm->region));
      } else {
        pieces.push_back(
            {.tensor = tensor, .spans = {shm->bytes}, .keep_alive = std::move(shm->region)});
      }
      return;
    }
    InputPiece p{.tensor = tensor, .keep_alive = received};
    if (raw.has_value()) {
      p.spans = received->message.Spans(*raw);
    } else {
      p.spans = {{view.data, static_cast<size_t>(bytes)}};
    }
    pieces.push_back(std::move(p));
  };
  if (!spec->from_gallery) {
    add(InputPiece::Tensor::kB, received->b_raw, b_shm, admitted->converted.b, spec->b_bytes,
        spec->b_dtype, &in_place.b);
  }
  add(InputPiece::Tensor::kA, received->a_raw, a_shm, admitted->converted.a, spec->a_bytes,
      spec->a_dtype, &in_place.a);
  pipeline->Start(*spec, std::move(admitted->admission), std::move(pieces),
                  /*input_complete=*/true, std::move(admitted->gallery), std::move(in_place));
  return absl::OkStatus();
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
