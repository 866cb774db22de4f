// The threads that run a tensor-parallel model's ranks at once: a step's forward pass (and a decode graph's
// capture and replay) is issued by every rank concurrently, because their collectives wait for each other.
#pragma once
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace polar {

class RankThreads {
 public:
  // Rank 0 runs on the calling thread; ranks 1..n-1 on threads kept until destruction.
  explicit RankThreads(int ranks);
  ~RankThreads();
  RankThreads(const RankThreads&) = delete;
  RankThreads& operator=(const RankThreads&) = delete;
  int ranks() const { return static_cast<int>(threads_.size()) + 1; }
  // Calls fn(r) for every rank concurrently and returns when all have; then rethrows the error of the
  // lowest rank that failed, if any.
  void run(const std::function<void(int)>& fn);

 private:
  void work(int rank);

  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable start_, done_;
  const std::function<void(int)>* task_ = nullptr;
  int64_t generation_ = 0;
  int pending_ = 0;
  bool stop_ = false;
  std::vector<std::exception_ptr> errors_;
};

}  // namespace polar
