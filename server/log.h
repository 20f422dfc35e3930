// Minimal thread-safe line logging to stderr with a UTC timestamp and a level letter.
// (This Debian's Abseil predates absl/log.) One call writes one complete line.
#ifndef SIMSERVE_SERVER_LOG_H_
#define SIMSERVE_SERVER_LOG_H_

#include <string_view>

namespace simserve {

// Writes "I2026-11-30T15:00:00.123Z simserve: <message>\n" to stderr in one write.
void LogInfo(std::string_view message);
// Same with level letter W (failed requests, degraded operation).
void LogWarning(std::string_view message);
// Same with level letter E (the server cannot continue).
void LogError(std::string_view message);

}  // namespace simserve

#endif  // SIMSERVE_SERVER_LOG_H_
