// The one mapping from absl::Status (used everywhere inside simserve) to grpc::Status
// (what goes on the wire). Handlers call nothing else to build an error status.
#ifndef SIMSERVE_SERVER_STATUS_H_
#define SIMSERVE_SERVER_STATUS_H_

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace simserve {

// Converts `status` to a grpc::Status with the same code and message. Codes map one to
// one (absl and gRPC share the canonical code space); an unknown code becomes UNKNOWN.
grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace simserve

#endif  // SIMSERVE_SERVER_STATUS_H_
