// Tests of the compute pool: tasks run off the caller's thread, the queue bound, skipping
// of cancelled and expired tasks, shutdown, and in-flight byte admission.
#include "server/compute_pool.h"

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace simserve {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

// A one-shot event on std::mutex (visible to TSan, unlike the system Abseil's Notification).
class Event {
 public:
  void Notify() {
    std::lock_guard<std::mutex> lock(mu_);
    set_ = true;
    cv_.notify_all();
  }
  void WaitForNotification() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return set_; });
  }
  bool HasBeenNotified() {
    std::lock_guard<std::mutex> lock(mu_);
    return set_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool set_ = false;
};

// Occupies the single worker until released, so later tasks stay queued.
struct Blocker {
  Event started;
  Event release;
  ComputeTask Task() {
    ComputeTask t;
    t.run = [this](absl::Duration) {
      started.Notify();
      release.WaitForNotification();
    };
    t.skip = [](const absl::Status&) {};
    return t;
  }
};

ComputeTask Recording(std::atomic<int>* ran, std::vector<absl::Status>* skipped, std::mutex* mu) {
  ComputeTask t;
  t.run = [ran](absl::Duration) { ran->fetch_add(1); };
  t.skip = [skipped, mu](absl::Status s) {
    std::lock_guard<std::mutex> lock(*mu);
    skipped->push_back(std::move(s));
  };
  return t;
}

TEST(ComputePool, RunsTasksOnWorkerThreads) {
  ComputePool pool({.workers = 2}, nullptr);
  EXPECT_EQ(pool.workers(), 2);
  std::atomic<int> ran{0};
  std::atomic<int> on_caller{0};
  const auto caller = std::this_thread::get_id();
  Event done[20];
  for (Event& event : done) {
    ComputeTask t;
    t.run = [&, event_ptr = &event](absl::Duration wait) {
      EXPECT_GE(wait, absl::ZeroDuration());
      if (std::this_thread::get_id() == caller) on_caller.fetch_add(1);
      ran.fetch_add(1);
      event_ptr->Notify();
    };
    t.skip = [](const absl::Status& s) { ADD_FAILURE() << s; };
    ASSERT_TRUE(pool.Submit(std::move(t), true).ok());
  }
  for (auto& d : done) d.WaitForNotification();
  EXPECT_EQ(ran.load(), 20);
  EXPECT_EQ(on_caller.load(), 0);
}

TEST(ComputePool, FullQueueRefusesNewRequestsButNotFollowUps) {
  ComputePool pool({.workers = 1, .max_queued_requests = 2}, nullptr);
  Blocker blocker;
  ASSERT_TRUE(pool.Submit(blocker.Task(), true).ok());
  blocker.started.WaitForNotification();
  std::atomic<int> ran{0};
  std::vector<absl::Status> skipped;
  std::mutex mu;
  EXPECT_TRUE(pool.Submit(Recording(&ran, &skipped, &mu), true).ok());
  EXPECT_TRUE(pool.Submit(Recording(&ran, &skipped, &mu), true).ok());
  absl::Status full = pool.Submit(Recording(&ran, &skipped, &mu), true);
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(full.message()), HasSubstr("max_queued_requests = 2"));
  EXPECT_TRUE(pool.Submit(Recording(&ran, &skipped, &mu), /*new_request=*/false).ok());
  EXPECT_EQ(pool.queued(), 3);
  blocker.release.Notify();
  pool.Shutdown();  // lets queued tasks that already started finish; skips the rest
  std::lock_guard<std::mutex> lock(mu);
  EXPECT_EQ(ran.load() + static_cast<int>(skipped.size()), 3);
}

TEST(ComputePool, ExpiredOrCancelledTasksAreSkippedNotRun) {
  ComputePool pool({.workers = 1}, nullptr);
  Blocker blocker;
  ASSERT_TRUE(pool.Submit(blocker.Task(), true).ok());
  blocker.started.WaitForNotification();
  std::atomic<int> ran{0};
  std::vector<absl::Status> skipped;
  std::mutex mu;
  ComputeTask expiring = Recording(&ran, &skipped, &mu);
  expiring.deadline = absl::Now() + absl::Milliseconds(20);
  ASSERT_TRUE(pool.Submit(std::move(expiring), true).ok());
  std::atomic<bool> cancelled{false};
  ComputeTask cancelling = Recording(&ran, &skipped, &mu);
  cancelling.cancelled = [&cancelled] { return cancelled.load(); };
  ASSERT_TRUE(pool.Submit(std::move(cancelling), true).ok());
  Event last_ran;
  ComputeTask last;
  last.run = [&](absl::Duration) { last_ran.Notify(); };
  last.skip = [](const absl::Status& s) { ADD_FAILURE() << s; };
  ASSERT_TRUE(pool.Submit(std::move(last), true).ok());
  // Wait until the deadline has certainly passed (no timing assertion: just ordering).
  absl::SleepFor(absl::Milliseconds(40));
  cancelled.store(true);
  blocker.release.Notify();
  last_ran.WaitForNotification();
  EXPECT_EQ(ran.load(), 0);
  std::lock_guard<std::mutex> lock(mu);
  ASSERT_EQ(skipped.size(), 2U);
  EXPECT_EQ(skipped[0].code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(skipped[1].code(), absl::StatusCode::kCancelled);
}

TEST(ComputePool, ShutdownSkipsQueuedTasksAndRefusesNewOnes) {
  ComputePool pool({.workers = 1}, nullptr);
  Blocker blocker;
  ASSERT_TRUE(pool.Submit(blocker.Task(), true).ok());
  blocker.started.WaitForNotification();
  std::atomic<int> ran{0};
  std::vector<absl::Status> skipped;
  std::mutex mu;
  ASSERT_TRUE(pool.Submit(Recording(&ran, &skipped, &mu), true).ok());
  std::thread releaser([&] {
    absl::SleepFor(absl::Milliseconds(20));
    blocker.release.Notify();
  });
  pool.Shutdown();
  releaser.join();
  EXPECT_EQ(pool.Submit(Recording(&ran, &skipped, &mu), true).code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(ran.load(), 0);
  std::lock_guard<std::mutex> lock(mu);
  ASSERT_EQ(skipped.size(), 1U);
  EXPECT_EQ(skipped[0].code(), absl::StatusCode::kUnavailable);
}

TEST(ComputePool, AdmissionBoundsInflightBytesAndReleasesOnDestruction) {
  ComputePool pool({.workers = 1, .max_inflight_bytes = 1000}, nullptr);
  auto first = pool.Admit(600);
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(pool.inflight_bytes(), 600);
  auto second = pool.Admit(500);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(second.status().message()), HasSubstr("max_inflight_bytes = 1000"));
  EXPECT_EQ(pool.Admit(2000).status().code(), absl::StatusCode::kResourceExhausted);
  {
    Admission moved = std::move(*first);
    EXPECT_EQ(pool.inflight_bytes(), 600);
  }
  EXPECT_EQ(pool.inflight_bytes(), 0);
  auto third = pool.Admit(1000);
  EXPECT_TRUE(third.ok());
}

TEST(ComputePool, OnePeerGetsAtMostItsShare) {
  ComputePool pool({.workers = 1, .max_inflight_bytes = 1000, .max_inflight_bytes_per_peer = 400},
                   nullptr);
  auto a1 = pool.Admit(300, "ipv4:10.0.0.1");
  ASSERT_TRUE(a1.ok());
  auto a2 = pool.Admit(200, "ipv4:10.0.0.1");
  EXPECT_EQ(a2.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(
      std::string(a2.status().message()),
      AllOf(HasSubstr("this client's share"), HasSubstr("ipv4:10.0.0.1"),
            HasSubstr("already holds 300"), HasSubstr("max_inflight_bytes_per_peer = 400")));
  auto b1 = pool.Admit(400, "token:2");  // another client is unaffected
  EXPECT_TRUE(b1.ok());
  *a1 = Admission();  // released: the first client may reserve again
  EXPECT_TRUE(pool.Admit(400, "ipv4:10.0.0.1").ok());
}

TEST(ComputePool, AdmissionsGrowWithinBothLimits) {
  ComputePool pool({.workers = 1, .max_inflight_bytes = 1000, .max_inflight_bytes_per_peer = 600},
                   nullptr);
  auto growing = pool.Admit(0, "p");
  ASSERT_TRUE(growing.ok());
  EXPECT_TRUE(growing->Grow(500).ok());
  EXPECT_EQ(growing->bytes(), 500);
  EXPECT_EQ(growing->Grow(200).code(), absl::StatusCode::kResourceExhausted);  // share
  auto other = pool.Admit(450, "q");
  ASSERT_TRUE(other.ok());
  EXPECT_EQ(growing->Grow(100).code(), absl::StatusCode::kResourceExhausted);  // whole budget
  EXPECT_TRUE(growing->Grow(50).ok());
  EXPECT_EQ(pool.inflight_bytes(), 1000);
  *growing = Admission();
  EXPECT_EQ(pool.inflight_bytes(), 450);
  EXPECT_EQ(Admission().Grow(1).code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace simserve
