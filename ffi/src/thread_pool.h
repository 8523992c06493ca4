// A process-wide pool of worker threads for the table's batched operations.
//
// ParallelFor(n, fn) runs fn(0) .. fn(n-1) and returns when all are done; the
// calling thread runs part of the work itself, so a pool of zero workers is
// plain serial execution. Several callers may use the pool at once. Tasks
// must not block on locks that another task could hold.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace monolith {

class ThreadPool {
 public:
  static ThreadPool& Global();

  explicit ThreadPool(int workers);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Worker threads plus the caller.
  int Parallelism() const { return static_cast<int>(threads_.size()) + 1; }

  void ParallelFor(int n, const std::function<void(int)>& fn);

 private:
  void WorkerLoop();

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace monolith
