// The compute pool: a fixed set of worker threads that run heavy work (kernel tiles) off
// the gRPC threads, a bounded queue, and the admission accounting of in-flight bytes.
#ifndef SIMSERVE_SERVER_COMPUTE_POOL_H_
#define SIMSERVE_SERVER_COMPUTE_POOL_H_

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/metrics.h"
#include "server/mutex.h"

namespace simserve {

// One unit of work. Exactly one of `run` or `skip` is called, once, on a worker thread
// (or on the thread calling Shutdown for tasks still queued then).
struct ComputeTask {
  // The work. Gets the time the task waited in the queue.
  absl::AnyInvocable<void(absl::Duration queue_wait)> run;
  // Called instead of `run` when the task will not run: DEADLINE_EXCEEDED (deadline passed
  // while queued), CANCELLED (`cancelled` returned true) or UNAVAILABLE (pool shut down).
  absl::AnyInvocable<void(absl::Status why)> skip;
  // The caller's deadline; the task is skipped if it is reached before the task starts.
  absl::Time deadline = absl::InfiniteFuture();
  // Optional; checked just before running. True means the caller went away.
  std::function<bool()> cancelled;
};

class ComputePool;

// Reservation of in-flight bytes of one peer; releases them when destroyed. Movable, not
// copyable; not thread-safe (one owner at a time).
class Admission {
 public:
  Admission() = default;
  ~Admission();
  Admission(Admission&& other) noexcept;
  Admission& operator=(Admission&& other) noexcept;
  Admission(const Admission&) = delete;
  Admission& operator=(const Admission&) = delete;

  // Reserves `more` bytes on top, under the same limits as ComputePool::Admit (and with its
  // RESOURCE_EXHAUSTED). An empty Admission cannot grow (FAILED_PRECONDITION).
  absl::Status Grow(int64_t more);
  int64_t bytes() const { return bytes_; }

 private:
  friend class ComputePool;
  Admission(ComputePool* pool, int64_t bytes, std::string peer)
      : pool_(pool), bytes_(bytes), peer_(std::move(peer)) {}
  ComputePool* pool_ = nullptr;
  int64_t bytes_ = 0;
  std::string peer_;
};

// Thread-safe. Tasks of one caller run in submission order only if the caller submits
// the next after the previous ran (the pool itself runs tasks FIFO on any worker).
class ComputePool {
 public:
  struct Options {
    // Worker threads (>= 1).
    int workers = 1;
    // Tasks submitted with `new_request` that may wait in the queue; more are refused.
    int64_t max_queued_requests = 64;
    // Bound on the sum of Admission reservations.
    int64_t max_inflight_bytes = int64_t{2} << 30;
    // Bound on the reservations of one peer (see Admit); 0 = none.
    int64_t max_inflight_bytes_per_peer = 0;
  };

  // Starts the workers. `metrics` may be null; otherwise it must outlive the pool and
  // receives queue depth updates and rejections.
  ComputePool(const Options& options, ServerMetrics* metrics);
  // Shuts down (see Shutdown) and joins the workers.
  ~ComputePool();
  ComputePool(const ComputePool&) = delete;
  ComputePool& operator=(const ComputePool&) = delete;

  // Reserves `bytes` of in-flight memory for one request of `peer` (a client identity: its
  // token or its address). RESOURCE_EXHAUSTED (stating the limit) if the reservation would
  // exceed max_inflight_bytes, or the peer's share max_inflight_bytes_per_peer; a single
  // request larger than the whole limit is refused as well.
  absl::StatusOr<Admission> Admit(int64_t bytes, std::string peer = {});

  // Queues `task`. With `new_request`, the queue bound applies: RESOURCE_EXHAUSTED (stating
  // max_queued_requests) when that many new requests are already waiting. Follow-up tasks
  // of a running request are never refused for queue length. UNAVAILABLE after Shutdown.
  // On error the task is dropped without calling run or skip.
  absl::Status Submit(ComputeTask task, bool new_request);

  // Stops accepting tasks, skips queued ones with UNAVAILABLE, lets running ones finish
  // and joins the workers. Idempotent.
  void Shutdown();

  // Number of tasks waiting (not running).
  int64_t queued() const;
  // Bytes currently reserved through Admit.
  int64_t inflight_bytes() const;
  int workers() const { return static_cast<int>(threads_.size()); }

 private:
  friend class Admission;
  struct Queued {
    ComputeTask task;
    bool new_request = false;
    absl::Time enqueued;
  };
  void WorkerLoop();
  // Checks the limits for `bytes` more of `peer` and reserves them.
  absl::Status Reserve(int64_t bytes, const std::string& peer) ABSL_LOCKS_EXCLUDED(mu_);
  void Release(int64_t bytes, const std::string& peer) ABSL_LOCKS_EXCLUDED(mu_);

  const Options options_;
  ServerMetrics* const metrics_;
  mutable Mutex mu_;
  std::condition_variable work_;
  std::deque<Queued> queue_ ABSL_GUARDED_BY(mu_);
  int64_t queued_new_requests_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t inflight_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  // Reservations by peer; peers holding nothing are absent.
  std::unordered_map<std::string, int64_t> peer_bytes_ ABSL_GUARDED_BY(mu_);
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace simserve

#endif  // SIMSERVE_SERVER_COMPUTE_POOL_H_
