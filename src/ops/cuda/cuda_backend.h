// Factory of the CUDA backend (cuda_backend.cpp); only builds with POLAR_HAVE_CUDA define it.
#pragma once
#include <memory>

#include "ops/backend.h"

namespace polar {

// A backend on CUDA device `device` holding weights, activations and KV in `dtype` (F16 or BF16).
std::unique_ptr<Backend> make_cuda_backend(int device, DType dtype, SparseMlpPath mlp_path);

// The block a device allocation of `bytes` takes from the backend's caching allocator: >= bytes, from a
// bounded set of size classes.
size_t cuda_block_bytes(size_t bytes);

}  // namespace polar
