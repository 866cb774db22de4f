// NCCL communicators for the CUDA ranks of one process (ops/communicator.h). Collectives are issued on
// the rank's backend stream, so they order with its other ops and are recorded into its decode graphs.
#include <nccl.h>

#include <cstdlib>

#include <cuda_runtime.h>

#include "ops/cuda/cuda_backend.h"

namespace polar {

namespace {

void nccl_check(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) fail("{}: {}", what, ncclGetErrorString(r));
}

ncclDataType_t nccl_type(DType t) {
  switch (t) {
    case DType::F32: return ncclFloat32;
    case DType::F16: return ncclFloat16;
    case DType::BF16: return ncclBfloat16;
    case DType::I32: return ncclInt32;
    default: fail("NCCL collectives: unsupported dtype {}", dtype_name(t));
  }
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(int rank, int size, ncclComm_t comm, Backend& backend)
      : Communicator(rank, size), comm_(comm), backend_(backend) {}
  ~NcclCommunicator() override { ncclCommDestroy(comm_); }

  void all_reduce_sum(Tensor& t) override {
    nccl_check(ncclAllReduce(t.raw(), t.raw(), static_cast<size_t>(t.numel()), nccl_type(t.dtype()), ncclSum, comm_,
                             static_cast<cudaStream_t>(cuda_stream(backend_))),
               "ncclAllReduce");
  }

  void all_gather(const Tensor& in, Tensor& out) override {
    check(out.dtype() == in.dtype() && out.numel() == in.numel() * size(), "all_gather: out {} for {} ranks' {}",
          shape_str(out.shape()), size(), shape_str(in.shape()));
    nccl_check(ncclAllGather(in.raw(), out.raw(), static_cast<size_t>(in.numel()), nccl_type(in.dtype()), comm_,
                             static_cast<cudaStream_t>(cuda_stream(backend_))),
               "ncclAllGather");
  }

 private:
  ncclComm_t comm_;
  Backend& backend_;
};

}  // namespace

std::vector<std::unique_ptr<Communicator>> make_nccl_communicators(const std::vector<Backend*>& backends) {
  // NVLink multicast (NVLS) stays off unless the environment asks for it: the lent machines set
  // NCCL_NVLS_ENABLE=0, and NVLS buffers take device memory that the KV cache is sized to use.
  setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);
  const int n = static_cast<int>(backends.size());
  std::vector<int> devices;
  for (Backend* b : backends) devices.push_back(cuda_device(*b));
  std::vector<ncclComm_t> comms(static_cast<size_t>(n));
  nccl_check(ncclCommInitAll(comms.data(), n, devices.data()), "ncclCommInitAll");
  std::vector<std::unique_ptr<Communicator>> out;
  for (int r = 0; r < n; ++r) out.push_back(std::make_unique<NcclCommunicator>(r, n, comms[static_cast<size_t>(r)], *backends[static_cast<size_t>(r)]));
  return out;
}

}  // namespace polar
