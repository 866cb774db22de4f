// Factory of the CUDA backend (cuda_backend.cpp); only builds with POLAR_HAVE_CUDA define it.
#pragma once
#include <memory>

#include <vector>

#include "ops/backend.h"
#include "ops/communicator.h"

namespace polar {

// A backend on CUDA device `device` holding weights, activations and KV in `dtype` (F16 or BF16).
std::unique_ptr<Backend> make_cuda_backend(int device, DType dtype, SparseMlpPath mlp_path);

// The block a device allocation of `bytes` takes from the backend's caching allocator: >= bytes, from a
// bounded set of size classes.
size_t cuda_block_bytes(size_t bytes);

// The CUDA device and stream (a cudaStream_t) of a backend make_cuda_backend made.
int cuda_device(const Backend& backend);
void* cuda_stream(const Backend& backend);

// NCCL communicators over CUDA backends, rank r on backends[r] (nccl_communicator.cpp; builds without
// NCCL say so in a polar::Error).
std::vector<std::unique_ptr<Communicator>> make_nccl_communicators(const std::vector<Backend*>& backends);

}  // namespace polar
