// The CUDA backend's kernels other than attention (attention.h) and the gather GEMMs (gather_gemm.h), one
// header and source per op family, as FlashInfer keeps them, so a kernel is found by its name:
//   elementwise   random fill, dtype conversion, add, SiLU·up, embedding gather
//   norms         LayerNorm / RMSNorm, L2 norms of rows
//   rope          RoPE fused with the KV-cache append
//   routing       route_heads, route_neurons, keep_heads, localize_indices (sparse selection)
//   columns       move_columns (the sparse MLP's dense-GEMM path)
//   sampling      argmax, sample, logprobs
//   bandwidth     the streaming-read probe
// Raw pointers and sizes only; the backend (cuda_backend_impl.h) validates tensors before it calls these.
// Every launcher enqueues on `stream` and checks the launch.
#pragma once
#include "ops/cuda/bandwidth.h"
#include "ops/cuda/columns.h"
#include "ops/cuda/elem.h"
#include "ops/cuda/elementwise.h"
#include "ops/cuda/norms.h"
#include "ops/cuda/rope.h"
#include "ops/cuda/routing.h"
#include "ops/cuda/sampling.h"
