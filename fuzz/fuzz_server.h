// What the server-side harnesses share: messages built the way gRPC hands them to the server
// (a grpc::ByteBuffer of one or more slices, viewed by the server's own
// codec::ReceivedMessage) and the kernel engine they compute with.
#ifndef SIMSERVE_FUZZ_FUZZ_SERVER_H_
#define SIMSERVE_FUZZ_FUZZ_SERVER_H_

#include <cstddef>
#include <memory>
#include <string_view>
#include <utility>
#include <vector>

#include "fuzz/fuzz_common.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/slice.h"
#include "kernels/similarity.h"
#include "server/wire_codec.h"

namespace simserve::fuzz {

// `bytes` as gRPC delivers a received message: a ByteBuffer of `slices` (>= 1) slices of
// about equal size, viewed by the server's ReceivedMessage (references, no copy).
inline std::shared_ptr<codec::ReceivedMessage> Received(std::string_view bytes, int slices) {
  std::vector<grpc::Slice> parts;
  const size_t step = bytes.size() / static_cast<size_t>(slices) + 1;
  for (size_t at = 0; at < bytes.size(); at += step) {
    const std::string_view part = bytes.substr(at, step);
    parts.emplace_back(part.data(), part.size());
  }
  const grpc::ByteBuffer buffer(parts.data(), parts.size());
  return std::make_shared<codec::ReceivedMessage>(buffer);
}

// The engine of a harness: one OpenMP thread per call, as on a pool worker of a server with
// one thread per worker (deterministic, and the pool's workers are the parallelism).
inline std::unique_ptr<kernels::SimilarityEngine> MakeEngine() {
  auto engine = kernels::SimilarityEngine::Create({.threads_per_call = 1});
  Check(engine.ok(), "the kernel engine cannot be created");
  return *std::move(engine);
}

}  // namespace simserve::fuzz

#endif  // SIMSERVE_FUZZ_FUZZ_SERVER_H_
