// absl::Status -> grpc::Status.
#include "server/status.h"

#include <string>

namespace simserve {

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  const int code = static_cast<int>(status.code());
  const bool known = code >= static_cast<int>(grpc::StatusCode::OK) &&
                     code <= static_cast<int>(grpc::StatusCode::UNAUTHENTICATED);
  const std::string message(status.message());
  return {known ? static_cast<grpc::StatusCode>(code) : grpc::StatusCode::UNKNOWN, message};
}

}  // namespace simserve
