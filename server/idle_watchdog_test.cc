// Unit tests of IdleWatchdog: only time spent Waiting counts, an expiry runs once with the
// documented status, and destroying a watch stops it.
#include "server/idle_watchdog.h"

#include <atomic>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace simserve {
namespace {

using ::testing::HasSubstr;

TEST(IdleWatchdog, ExpiresAWatchWaitingLongerThanTheTimeoutOnce) {
  IdleWatchdog watchdog(absl::Milliseconds(100));
  std::atomic<int> expired{0};
  absl::Status why;
  auto watch = watchdog.Watch([&](absl::Status status) {
    why = std::move(status);
    ++expired;
  });
  watch->Waiting();
  absl::SleepFor(absl::Milliseconds(400));
  watchdog.Check();  // again: still only once
  EXPECT_EQ(expired.load(), 1);
  EXPECT_EQ(why.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(why.message(), HasSubstr("no data for 100ms"));
}

TEST(IdleWatchdog, TimeNotWaitingDoesNotCount) {
  IdleWatchdog watchdog(absl::Milliseconds(200));
  std::atomic<int> expired{0};
  auto watch = watchdog.Watch([&](absl::Status) { ++expired; });
  for (int i = 0; i < 6; ++i) {  // 600 ms in all, never 200 ms waiting at a stretch
    watch->Waiting();
    absl::SleepFor(absl::Milliseconds(50));
    watch->NotWaiting();
    absl::SleepFor(absl::Milliseconds(50));
  }
  watchdog.Check();
  EXPECT_EQ(expired.load(), 0);
}

TEST(IdleWatchdog, ADestroyedWatchNeverExpires) {
  IdleWatchdog watchdog(absl::Milliseconds(50));
  std::atomic<int> expired{0};
  {
    auto watch = watchdog.Watch([&](absl::Status) { ++expired; });
    watch->Waiting();
  }
  absl::SleepFor(absl::Milliseconds(200));
  watchdog.Check();
  EXPECT_EQ(expired.load(), 0);
}

TEST(IdleWatchdog, InfiniteTimeoutNeverExpires) {
  IdleWatchdog watchdog(absl::InfiniteDuration());
  std::atomic<int> expired{0};
  auto watch = watchdog.Watch([&](absl::Status) { ++expired; });
  watch->Waiting();
  watchdog.Check();
  EXPECT_EQ(expired.load(), 0);
}

}  // namespace
}  // namespace simserve
