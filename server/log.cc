// stderr line logger. A single fwrite per line keeps lines from different threads whole.
#include "server/log.h"

#include <cstdio>
#include <string>

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace simserve {
namespace {

void Write(char level, std::string_view message) {
  std::string line(1, level);
  line += absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::Now(), absl::UTCTimeZone());
  line += " simserve: ";
  line += message;
  line += '\n';
  std::fwrite(line.data(), 1, line.size(), stderr);
  std::fflush(stderr);
}

}  // namespace

void LogInfo(std::string_view message) { Write('I', message); }
void LogWarning(std::string_view message) { Write('W', message); }
void LogError(std::string_view message) { Write('E', message); }

}  // namespace simserve
