#include "runtime/rank_threads.h"

#include <algorithm>

namespace polar {

RankThreads::RankThreads(int ranks) : errors_(static_cast<size_t>(ranks)) {
  for (int r = 1; r < ranks; ++r) threads_.emplace_back([this, r] { work(r); });
}

RankThreads::~RankThreads() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  start_.notify_all();
  for (std::thread& t : threads_) t.join();
}

void RankThreads::work(int rank) {
  int64_t seen = 0;
  for (;;) {
    const std::function<void(int)>* task;
    {
      std::unique_lock lock(mu_);
      start_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      task = task_;
    }
    try {
      (*task)(rank);
    } catch (...) {
      errors_[static_cast<size_t>(rank)] = std::current_exception();
    }
    std::lock_guard lock(mu_);
    if (--pending_ == 0) done_.notify_one();
  }
}

void RankThreads::run(const std::function<void(int)>& fn) {
  if (threads_.empty()) return fn(0);
  std::fill(errors_.begin(), errors_.end(), nullptr);
  {
    std::lock_guard lock(mu_);
    task_ = &fn;
    pending_ = static_cast<int>(threads_.size());
    ++generation_;
  }
  start_.notify_all();
  try {
    fn(0);
  } catch (...) {
    errors_[0] = std::current_exception();
  }
  std::unique_lock lock(mu_);
  done_.wait(lock, [&] { return pending_ == 0; });
  for (const std::exception_ptr& e : errors_)
    if (e) std::rethrow_exception(e);
}

}  // namespace polar
