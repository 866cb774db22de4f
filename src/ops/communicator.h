// Collectives between the ranks of a tensor-parallel model (docs/parallel.md). One Communicator per rank,
// bound to that rank's Backend: every rank calls the same collectives in the same order with tensors of
// the same shape, and each call returns once this rank's result is in place (on CUDA: once it is issued on
// the backend's stream, so the collectives of a decode step are recorded in its graph like any other op).
#pragma once
#include <memory>
#include <vector>

#include "ops/backend.h"

namespace polar {

class Communicator {
 public:
  virtual ~Communicator() = default;
  int rank() const { return rank_; }
  int size() const { return size_; }
  // t = Σ over the ranks of each rank's t (same shape and dtype everywhere), summed in rank order 0..N-1
  // on the CPU, so the result does not depend on which thread arrives first.
  virtual void all_reduce_sum(Tensor& t) = 0;
  // out [N·n, ...] = the ranks' in [n, ...] concatenated along dim 0, rank 0's rows first (dim 0 because
  // every tensor is row-major: a rank's part is then one contiguous run of out).
  virtual void all_gather(const Tensor& in, Tensor& out) = 0;
  // A rank that fails between collectives calls this so that the others, waiting in one, fail too instead
  // of waiting forever (the CPU's ranks; NCCL's collectives are asynchronous and cannot be unblocked here).
  virtual void abort() {}

 protected:
  Communicator(int rank, int size) : rank_(rank), size_(size) {}

 private:
  int rank_, size_;
};

// One communicator per backend, backends[r] being rank r: CPU backends get the in-process one (ranks are
// threads of this process), CUDA backends NCCL's (ncclCommInitAll; NVLink multicast stays off unless
// NCCL_NVLS_ENABLE says otherwise). The backends must all be of one kind; CUDA without NCCL in the build is
// a polar::Error.
std::vector<std::unique_ptr<Communicator>> make_communicators(const std::vector<Backend*>& backends);

}  // namespace polar
