// RejectReason: why admission control turned a request away (and AuthFailure: why
// authentication did). Shared by validation
// (convert.h), the compute pool and the metrics (label `reason` of
// simserve_rejected_requests_total), without validation depending on Prometheus.
#ifndef SIMSERVE_SERVER_REJECT_REASON_H_
#define SIMSERVE_SERVER_REJECT_REASON_H_

namespace simserve {

// A fixed set: no high-cardinality labels.
enum class RejectReason {
  kQueueFull,
  kTooManyElements,
  kTooManyFlops,
  kOutputTooLarge,
  kInflightBytes,
  kDraining,
  kPeerShare,  // one client's share of the in-flight bytes (max_inflight_bytes_per_peer)
};

// Why token authentication (server/auth.h) refused a call: no `authorization` metadata, one
// that is not "Bearer <token>", or a token the server does not accept.
enum class AuthFailure { kMissing, kMalformed, kInvalid };

}  // namespace simserve

#endif  // SIMSERVE_SERVER_REJECT_REASON_H_
