// IdleWatchdog: ends client-streaming calls (ComputeUpload, RegisterGallery) whose client
// sends nothing for too long, so that an idle stream cannot hold its memory and its share of
// the in-flight budget forever. One thread checks every call a few times per timeout; only
// time spent waiting on the client counts (not time in which the server paused reading).
#ifndef SIMSERVE_SERVER_IDLE_WATCHDOG_H_
#define SIMSERVE_SERVER_IDLE_WATCHDOG_H_

#include <memory>
#include <set>
#include <utility>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "server/mutex.h"
#include "server/periodic_thread.h"

namespace simserve {

class IdleWatch;

// Thread-safe.
class IdleWatchdog {
 public:
  // `timeout` infinite: Watch returns watches that never expire and no thread runs.
  explicit IdleWatchdog(absl::Duration timeout);
  ~IdleWatchdog();
  IdleWatchdog(const IdleWatchdog&) = delete;
  IdleWatchdog& operator=(const IdleWatchdog&) = delete;

  // Watches a call. `expire` runs at most once, on the watchdog thread, when the call has
  // been Waiting for `timeout`; it gets DEADLINE_EXCEEDED ("no data for 30s ...") and must
  // end the call without blocking (and without destroying the IdleWatch).
  std::unique_ptr<IdleWatch> Watch(absl::AnyInvocable<void(absl::Status)> expire)
      ABSL_LOCKS_EXCLUDED(mu_);

  absl::Duration timeout() const { return timeout_; }
  // Checks every watch now (the thread calls this periodically).
  void Check() ABSL_LOCKS_EXCLUDED(mu_);

 private:
  friend class IdleWatch;
  struct Entry {
    absl::AnyInvocable<void(absl::Status)> expire;
    absl::Time waiting_since = absl::InfiniteFuture();  // InfiniteFuture: not waiting
    bool expired = false;
  };
  void SetWaitingSince(Entry* entry, absl::Time since) ABSL_LOCKS_EXCLUDED(mu_);
  void Remove(Entry* entry) ABSL_LOCKS_EXCLUDED(mu_);

  const absl::Duration timeout_;
  Mutex mu_;
  std::set<Entry*> entries_ ABSL_GUARDED_BY(mu_);  // their fields are guarded by mu_ too
  std::unique_ptr<PeriodicThread> thread_;         // last: stopped first
};

// One watched call. Destroy it before the call's state that `expire` touches. Thread-safe.
class IdleWatch {
 public:
  // Unregisters; waits for an `expire` running on the watchdog thread.
  ~IdleWatch() { watchdog_->Remove(&entry_); }
  IdleWatch(const IdleWatch&) = delete;
  IdleWatch& operator=(const IdleWatch&) = delete;

  // The call now waits for the client (a read was started).
  void Waiting() { watchdog_->SetWaitingSince(&entry_, absl::Now()); }
  // The call does not wait for the client (a message arrived, or reading is paused).
  void NotWaiting() { watchdog_->SetWaitingSince(&entry_, absl::InfiniteFuture()); }

 private:
  friend class IdleWatchdog;
  IdleWatch(IdleWatchdog* watchdog, absl::AnyInvocable<void(absl::Status)> expire)
      : watchdog_(watchdog) {
    entry_.expire = std::move(expire);
  }
  IdleWatchdog* const watchdog_;
  IdleWatchdog::Entry entry_;
};

}  // namespace simserve

#endif  // SIMSERVE_SERVER_IDLE_WATCHDOG_H_
