// The Prometheus /metrics endpoint (prometheus-cpp's Exposer over civetweb): plaintext, or
// HTTPS with --metrics_tls_cert_file / --metrics_tls_key_file (re-read on every handshake, so
// a renewed certificate is served without a restart), optionally behind HTTP basic auth
// (--metrics_basic_auth_file, re-read on every scrape).
#ifndef SIMSERVE_SERVER_METRICS_EXPOSER_H_
#define SIMSERVE_SERVER_METRICS_EXPOSER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "prometheus/exposer.h"
#include "prometheus/registry.h"
#include "server/config.h"

namespace simserve {

// `user:password` pairs, one per line (`#` comments and blank lines skipped). INVALID_ARGUMENT
// names a bad line (never its contents) or says the file holds none.
absl::StatusOr<std::vector<std::pair<std::string, std::string>>> ParseBasicAuthFile(
    absl::string_view contents);

// A running metrics endpoint. Not copyable.
class MetricsEndpoint {
 public:
  // Serves `registry` at http(s)://`listen`/metrics. INVALID_ARGUMENT for unreadable or
  // inconsistent files, UNAVAILABLE when the address cannot be bound (or TLS cannot start).
  static absl::StatusOr<std::unique_ptr<MetricsEndpoint>> Start(
      const std::string& listen, const MetricsSecurityConfig& security,
      const std::shared_ptr<prometheus::Registry>& registry);
  ~MetricsEndpoint();
  MetricsEndpoint(const MetricsEndpoint&) = delete;
  MetricsEndpoint& operator=(const MetricsEndpoint&) = delete;

  int port() const { return port_; }
  // For the startup line: "plaintext", "HTTPS (certificate ...)", "+ basic auth".
  const std::string& description() const { return description_; }

 private:
  MetricsEndpoint() = default;
  MetricsSecurityConfig security_;
  std::unique_ptr<prometheus::Exposer> exposer_;  // last: stopped before what it uses
  int port_ = 0;
  std::string description_;
};

}  // namespace simserve

#endif  // SIMSERVE_SERVER_METRICS_EXPOSER_H_
