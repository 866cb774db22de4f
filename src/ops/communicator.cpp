#include "ops/communicator.h"

#include <condition_variable>
#include <cstring>
#include <mutex>

#ifdef POLAR_HAVE_CUDA
#include "ops/cuda/cuda_backend.h"
#endif

namespace polar {

namespace {

// What the CPU ranks of one group share: each rank's tensor of the collective in progress and a barrier.
// Every collective is publish (each rank's pointer) -> barrier -> work on the others' memory -> barrier,
// the second barrier keeping a rank from returning (and changing its tensor) while others still read it.
class ThreadGroup {
 public:
  explicit ThreadGroup(int size) : slots_(static_cast<size_t>(size)) {}
  int size() const { return static_cast<int>(slots_.size()); }
  void publish(int rank, void* p) { slots_[static_cast<size_t>(rank)] = p; }
  void* slot(int rank) const { return slots_[static_cast<size_t>(rank)]; }

  void barrier() {
    std::unique_lock lock(mu_);
    check(!aborted_, "tensor parallelism: another rank failed during the step");
    const int64_t gen = generation_;
    if (++arrived_ == size()) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return generation_ != gen || aborted_; });
    check(!aborted_, "tensor parallelism: another rank failed during the step");
  }

  void abort() {
    std::lock_guard lock(mu_);
    aborted_ = true;
    cv_.notify_all();
  }

 private:
  std::vector<void*> slots_;
  std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0;
  int64_t generation_ = 0;
  bool aborted_ = false;
};

class CpuCommunicator final : public Communicator {
 public:
  CpuCommunicator(int rank, std::shared_ptr<ThreadGroup> group)
      : Communicator(rank, group->size()), group_(std::move(group)) {}

  // Rank r sums elements [r·n/N, (r+1)·n/N) of every rank's t in rank order and writes the sum back into
  // each of them: the ranks work on disjoint ranges, so no scratch buffer and no third barrier are needed.
  void all_reduce_sum(Tensor& t) override {
    check(t.dtype() == DType::F32, "all_reduce_sum: the CPU sums F32 tensors, got {}", dtype_name(t.dtype()));
    const int n = size();
    group_->publish(rank(), t.raw());
    group_->barrier();
    const int64_t total = t.numel(), lo = total * rank() / n, hi = total * (rank() + 1) / n;
    for (int q = 1; q < n; ++q) {
      const float* src = static_cast<const float*>(group_->slot(q));
      float* acc = static_cast<float*>(group_->slot(0));
      for (int64_t i = lo; i < hi; ++i) acc[i] += src[i];
    }
    for (int q = 1; q < n; ++q)
      std::memcpy(static_cast<float*>(group_->slot(q)) + lo, static_cast<const float*>(group_->slot(0)) + lo,
                  static_cast<size_t>(hi - lo) * sizeof(float));
    group_->barrier();
  }

  void all_gather(const Tensor& in, Tensor& out) override {
    check(out.dtype() == in.dtype() && out.numel() == in.numel() * size(),
          "all_gather: out {} {} for {} ranks' {} {}", dtype_name(out.dtype()), shape_str(out.shape()), size(),
          dtype_name(in.dtype()), shape_str(in.shape()));
    group_->publish(rank(), in.raw());
    group_->barrier();
    for (int q = 0; q < size(); ++q)
      std::memcpy(static_cast<char*>(out.raw()) + q * in.nbytes(), group_->slot(q), in.nbytes());
    group_->barrier();
  }

  void abort() override { group_->abort(); }

 private:
  std::shared_ptr<ThreadGroup> group_;
};

}  // namespace

std::vector<std::unique_ptr<Communicator>> make_communicators(const std::vector<Backend*>& backends) {
  check(!backends.empty(), "tensor parallelism needs at least one rank");
  const Device device = backends[0]->device();
  for (Backend* b : backends)
    check(b->device() == device, "tensor parallelism: ranks on {} and {} backends", backends[0]->name(), b->name());
  std::vector<std::unique_ptr<Communicator>> comms;
  if (device == Device::CUDA) {
#ifdef POLAR_HAVE_CUDA
    return make_nccl_communicators(backends);
#endif
  }
  auto group = std::make_shared<ThreadGroup>(static_cast<int>(backends.size()));
  for (size_t r = 0; r < backends.size(); ++r) comms.push_back(std::make_unique<CpuCommunicator>(static_cast<int>(r), group));
  return comms;
}

}  // namespace polar
