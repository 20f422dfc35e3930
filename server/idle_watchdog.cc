// The idle watchdog (idle_watchdog.h). Expiry runs under the watchdog's mutex, which every
// IdleWatch takes to change its entry or unregister, so a watch is never expired after (or
// while) its call is destroyed.
#include "server/idle_watchdog.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace simserve {

void IdleWatchdog::SetWaitingSince(Entry* entry, absl::Time since) {
  MutexLock lock(&mu_);
  entry->waiting_since = since;
}

void IdleWatchdog::Remove(Entry* entry) {
  MutexLock lock(&mu_);
  entries_.erase(entry);
}

IdleWatchdog::IdleWatchdog(absl::Duration timeout) : timeout_(timeout) {
  if (timeout_ == absl::InfiniteDuration()) return;
  // Expires calls at most a quarter of the timeout (and at most 1 s) late.
  const absl::Duration period = std::clamp(timeout_ / 4, absl::Milliseconds(10), absl::Seconds(1));
  thread_ = std::make_unique<PeriodicThread>(period, [this] { Check(); });
}

IdleWatchdog::~IdleWatchdog() { thread_.reset(); }

std::unique_ptr<IdleWatch> IdleWatchdog::Watch(absl::AnyInvocable<void(absl::Status)> expire) {
  std::unique_ptr<IdleWatch> watch(new IdleWatch(this, std::move(expire)));
  MutexLock lock(&mu_);
  entries_.insert(&watch->entry_);
  return watch;
}

void IdleWatchdog::Check() {
  const absl::Time now = absl::Now();
  MutexLock lock(&mu_);
  for (Entry* entry : entries_) {
    if (entry->expired || now - entry->waiting_since < timeout_) continue;
    entry->expired = true;
    entry->expire(absl::DeadlineExceededError(absl::StrCat(
        "no data for ", absl::FormatDuration(timeout_),
        ": the stream was ended so that it stops holding server memory (--upload_idle_timeout)")));
  }
}

}  // namespace simserve
