// Mutex and MutexLock: std::mutex with clang thread-safety annotations, so that
// `-Wthread-safety` (the thread_safety CTest check) proves every ABSL_GUARDED_BY field is
// only touched under its lock. std::mutex underneath rather than absl::Mutex because
// ThreadSanitizer sees libstdc++'s pthread calls but not the uninstrumented system Abseil.
#ifndef SIMSERVE_SERVER_MUTEX_H_
#define SIMSERVE_SERVER_MUTEX_H_

#include <condition_variable>
#include <mutex>

#include "absl/base/thread_annotations.h"
#include "absl/time/time.h"

namespace simserve {

// A non-recursive exclusive lock. Thread-safe (it is the lock).
class ABSL_LOCKABLE Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void Lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() { mu_.lock(); }
  void Unlock() ABSL_UNLOCK_FUNCTION() { mu_.unlock(); }

  // Blocks on `cv` until `done()` is true; the lock is held whenever `done` runs and on return.
  template <class Predicate>
  void Await(std::condition_variable& cv, Predicate done) ABSL_EXCLUSIVE_LOCKS_REQUIRED(this) {
    std::unique_lock<std::mutex> lock(mu_, std::adopt_lock);
    cv.wait(lock, done);
    lock.release();  // still held: ownership stays with the caller's MutexLock
  }

  // As Await, but gives up after `timeout`; returns done().
  template <class Predicate>
  bool AwaitFor(std::condition_variable& cv, absl::Duration timeout, Predicate done)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(this) {
    std::unique_lock<std::mutex> lock(mu_, std::adopt_lock);
    const bool result = cv.wait_for(lock, absl::ToChronoNanoseconds(timeout), done);
    lock.release();
    return result;
  }

 private:
  std::mutex mu_;
};

// Holds `mu` for its scope.
class ABSL_SCOPED_LOCKABLE MutexLock {
 public:
  explicit MutexLock(Mutex* mu) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu) : mu_(mu) { mu_->Lock(); }
  ~MutexLock() ABSL_UNLOCK_FUNCTION() { mu_->Unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex* const mu_;
};

}  // namespace simserve

#endif  // SIMSERVE_SERVER_MUTEX_H_
