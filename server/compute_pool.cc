// Worker threads over a FIFO queue; deadline and cancellation are checked when a task is
// dequeued so that a request nobody waits for any more is never computed.
#include "server/compute_pool.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace simserve {

Admission::~Admission() {
  if (pool_ != nullptr) pool_->Release(bytes_, peer_);
}

Admission::Admission(Admission&& other) noexcept
    : pool_(std::exchange(other.pool_, nullptr)),
      bytes_(std::exchange(other.bytes_, 0)),
      peer_(std::move(other.peer_)) {}

Admission& Admission::operator=(Admission&& other) noexcept {
  if (this != &other) {
    if (pool_ != nullptr) pool_->Release(bytes_, peer_);
    pool_ = std::exchange(other.pool_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
    peer_ = std::move(other.peer_);
  }
  return *this;
}

absl::Status Admission::Grow(int64_t more) {
  if (pool_ == nullptr) return absl::FailedPreconditionError("empty admission cannot grow");
  if (absl::Status reserved = pool_->Reserve(more, peer_); !reserved.ok()) return reserved;
  bytes_ += more;
  return absl::OkStatus();
}

ComputePool::ComputePool(const Options& options, ServerMetrics* metrics)
    : options_(options), metrics_(metrics) {
  const int workers = options.workers < 1 ? 1 : options.workers;
  threads_.reserve(workers);
  for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { WorkerLoop(); });
}

ComputePool::~ComputePool() { Shutdown(); }

absl::StatusOr<Admission> ComputePool::Admit(int64_t bytes, std::string peer) {
  if (absl::Status reserved = Reserve(bytes, peer); !reserved.ok()) return reserved;
  return Admission(this, bytes, std::move(peer));
}

absl::Status ComputePool::Reserve(int64_t bytes, const std::string& peer) {
  MutexLock lock(&mu_);
  if (bytes > options_.max_inflight_bytes - inflight_bytes_) {
    if (metrics_ != nullptr) metrics_->Reject(RejectReason::kInflightBytes);
    return absl::ResourceExhaustedError(absl::StrCat(
        "server busy: request needs ", bytes, " bytes in flight, ", inflight_bytes_,
        " already used; the limit is max_inflight_bytes = ", options_.max_inflight_bytes));
  }
  const int64_t per_peer = options_.max_inflight_bytes_per_peer;
  auto held = peer_bytes_.find(peer);
  const int64_t peer_held = held == peer_bytes_.end() ? 0 : held->second;
  if (per_peer > 0 && bytes > per_peer - peer_held) {
    if (metrics_ != nullptr) metrics_->Reject(RejectReason::kPeerShare);
    return absl::ResourceExhaustedError(absl::StrCat(
        "over this client's share: request needs ", bytes, " bytes in flight, this client (",
        peer.empty() ? "unknown" : peer, ") already holds ", peer_held,
        "; the limit is max_inflight_bytes_per_peer = ", per_peer,
        " (so one client cannot take the whole max_inflight_bytes)"));
  }
  inflight_bytes_ += bytes;
  peer_bytes_[peer] = peer_held + bytes;
  return absl::OkStatus();
}

void ComputePool::Release(int64_t bytes, const std::string& peer) {
  MutexLock lock(&mu_);
  inflight_bytes_ -= bytes;
  auto held = peer_bytes_.find(peer);
  if (held != peer_bytes_.end() && (held->second -= bytes) <= 0) peer_bytes_.erase(held);
}

absl::Status ComputePool::Submit(ComputeTask task, bool new_request) {
  {
    MutexLock lock(&mu_);
    if (shutdown_) return absl::UnavailableError("server is shutting down");
    if (new_request && queued_new_requests_ >= options_.max_queued_requests) {
      if (metrics_ != nullptr) metrics_->Reject(RejectReason::kQueueFull);
      return absl::ResourceExhaustedError(
          absl::StrCat("server busy: compute queue is full (max_queued_requests = ",
                       options_.max_queued_requests, ")"));
    }
    if (new_request) ++queued_new_requests_;
    queue_.push_back(Queued{std::move(task), new_request, absl::Now()});
  }
  work_.notify_one();
  if (metrics_ != nullptr) metrics_->AddQueueDepth(1);
  return absl::OkStatus();
}

void ComputePool::WorkerLoop() {
  for (;;) {
    Queued item;
    {
      MutexLock lock(&mu_);
      mu_.Await(work_, [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return shutdown_ || !queue_.empty();
      });
      if (queue_.empty()) return;  // shut down and drained
      item = std::move(queue_.front());
      queue_.pop_front();
      if (item.new_request) --queued_new_requests_;
    }
    if (metrics_ != nullptr) metrics_->AddQueueDepth(-1);
    const absl::Time now = absl::Now();
    if (now >= item.task.deadline) {
      item.task.skip(absl::DeadlineExceededError("deadline expired while queued"));
    } else if (item.task.cancelled && item.task.cancelled()) {
      item.task.skip(absl::CancelledError("request cancelled while queued"));
    } else {
      item.task.run(now - item.enqueued);
    }
  }
}

void ComputePool::Shutdown() {
  std::deque<Queued> dropped;
  {
    MutexLock lock(&mu_);
    shutdown_ = true;
    dropped.swap(queue_);
    queued_new_requests_ = 0;
  }
  work_.notify_all();
  for (auto& item : dropped) {
    if (metrics_ != nullptr) metrics_->AddQueueDepth(-1);
    item.task.skip(absl::UnavailableError("server is shutting down"));
  }
  for (auto& t : threads_) {
    if (t.joinable()) t.join();
  }
}

int64_t ComputePool::queued() const {
  MutexLock lock(&mu_);
  return static_cast<int64_t>(queue_.size());
}

int64_t ComputePool::inflight_bytes() const {
  MutexLock lock(&mu_);
  return inflight_bytes_;
}

}  // namespace simserve
