// The process-wide worker pool (see thread_pool.h).
#include "thread_pool.h"

#include <atomic>
#include <cstdlib>

namespace monolith {

ThreadPool& ThreadPool::Global() {
  // MONOLITH_NUM_THREADS caps the threads a batched call uses (caller included).
  static ThreadPool* pool = [] {
    int n = static_cast<int>(std::thread::hardware_concurrency());
    if (const char* env = std::getenv("MONOLITH_NUM_THREADS")) n = std::atoi(env);
    if (n < 1) n = 1;
    if (n > 64) n = 64;
    return new ThreadPool(n - 1);  // leaked on purpose: no join at exit
  }();
  return *pool;
}

ThreadPool::ThreadPool(int workers) {
  for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { WorkerLoop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

void ThreadPool::WorkerLoop() {
  for (;;) {
    std::function<void()> task;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
      if (stop_ && queue_.empty()) return;
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    task();
  }
}

void ThreadPool::ParallelFor(int n, const std::function<void(int)>& fn) {
  if (n <= 0) return;
  if (n == 1 || threads_.empty()) {
    for (int i = 0; i < n; ++i) fn(i);
    return;
  }
  // Shared work counter: the caller and the workers claim indices until none
  // are left, so a busy pool never leaves the caller waiting on an idle task.
  struct State {
    std::atomic<int> next{0};
    std::atomic<int> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto drain = [state, n, &fn] {
    int finished = 0;
    for (int i; (i = state->next.fetch_add(1)) < n;) {
      fn(i);
      ++finished;
    }
    if (finished && state->done.fetch_add(finished) + finished == n) {
      std::lock_guard<std::mutex> lock(state->mu);
      state->cv.notify_all();
    }
  };
  const int helpers = std::min<int>(n - 1, static_cast<int>(threads_.size()));
  {
    std::lock_guard<std::mutex> lock(mu_);
    // Helpers capture fn by reference: safe, since we wait below until every
    // index has finished, and a helper that starts late finds none left.
    for (int i = 0; i < helpers; ++i) queue_.emplace_back(drain);
  }
  if (helpers == 1) cv_.notify_one(); else cv_.notify_all();
  drain();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

}  // namespace monolith
