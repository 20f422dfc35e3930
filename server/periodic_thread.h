// PeriodicThread: runs a callback every `period` on its own thread until destroyed. Used by
// the watchers of files on disk (--gallery_dir, --auth_token_file).
#ifndef SIMSERVE_SERVER_PERIODIC_THREAD_H_
#define SIMSERVE_SERVER_PERIODIC_THREAD_H_

#include <condition_variable>
#include <thread>
#include <utility>

#include "absl/functional/any_invocable.h"
#include "absl/time/time.h"
#include "server/mutex.h"

namespace simserve {

// Thread-safe. The first tick runs one period after construction.
class PeriodicThread {
 public:
  PeriodicThread(absl::Duration period, absl::AnyInvocable<void()> tick)
      : period_(period), tick_(std::move(tick)), thread_([this] { Loop(); }) {}
  // Stops: waits for a running tick, then joins.
  ~PeriodicThread() {
    {
      MutexLock lock(&mu_);
      stopping_ = true;
    }
    wake_.notify_all();
    thread_.join();
  }
  PeriodicThread(const PeriodicThread&) = delete;
  PeriodicThread& operator=(const PeriodicThread&) = delete;

 private:
  void Loop() {
    for (;;) {
      {
        MutexLock lock(&mu_);
        if (mu_.AwaitFor(wake_, period_,
                         [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return stopping_; })) {
          return;
        }
      }
      tick_();
    }
  }

  const absl::Duration period_;
  absl::AnyInvocable<void()> tick_;
  Mutex mu_;
  std::condition_variable wake_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;  // last: starts after the fields it reads
};

}  // namespace simserve

#endif  // SIMSERVE_SERVER_PERIODIC_THREAD_H_
