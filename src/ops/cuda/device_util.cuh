// Device helpers shared by the CUDA backend's kernel files (the op families of kernels.h, attention.cu,
// gather_gemm.cu, bandwidth.cu): launch shapes, element conversions, order keys, launch checks, dtype
// dispatch, and the PTX wrappers of the tensor-core kernels (cp.async, ldmatrix, mma.sync m16n8k16).
// Header-only and internal to src/ops/cuda.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <type_traits>
#include <utility>

#include "core/error.h"
#include "ops/cuda/elem.h"

namespace polar::cuda::detail {

// Launch shapes shared by the op-family kernel files: grid-stride launches of kGridThreads-thread CTAs (at
// most 16·65535 CTAs, each thread taking per_thread elements a pass) and the CTA width of one-CTA-per-row
// kernels.
constexpr int kGridThreads = 256;
inline int grid_for(int64_t n, int per_thread = 1) {
  const int64_t blocks = (n + int64_t(kGridThreads) * per_thread - 1) / (int64_t(kGridThreads) * per_thread);
  return static_cast<int>(blocks < 1 ? 1 : (blocks > 65535 * 16 ? 65535 * 16 : blocks));
}
inline int row_threads(int64_t work) { return work >= 1024 ? 1024 : (work >= 256 ? 256 : 128); }

// Monotone map float -> uint32: a > b  <=>  key(a) > key(b).
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(float x) { return x; }
template <typename T> __device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return x;
  }
}

inline void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) fail("CUDA kernel {} failed to launch: {}", what, cudaGetErrorString(err));
}

// How many CTAs of `kernel` (`threads` each, `bytes` of dynamic shared memory, which is reserved for it
// here, as a launch needs) one SM holds at once; `what` names the kernel in the error when none fits.
template <typename Kernel> int ctas_per_sm(Kernel kernel, int threads, int bytes, const char* what) {
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) != cudaSuccess)
    fail("{}: cannot reserve {} bytes of shared memory per block", what, bytes);
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, bytes) != cudaSuccess || per_sm < 1)
    fail("{}: the kernel does not fit on an SM", what);
  return per_sm;
}

// Calls f with a null pointer of the element type that `e` names (for template dispatch).
template <typename F> void dispatch(Elem e, F&& f) {
  if (e == Elem::F16) {
    f(static_cast<__half*>(nullptr));
  } else {
    f(static_cast<__nv_bfloat16*>(nullptr));
  }
}

// ---- PTX wrappers ----

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1; valid = false writes zeros and reads nothing. The
// destination as a generic pointer or as a shared-window address (smem_u32), which loops can step without
// converting again. kL2Prefetch = 256 adds the L2 prefetch-size hint (.L2::256B: a miss fetches the whole
// aligned 256-byte segment into L2), for loaders whose neighbouring copies read that segment soon anyway:
// decode attention takes it; it made the gather GEMM slower (docs/benchmarks.md, 2026-12-08).
template <int kL2Prefetch = 0> __device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  static_assert(kL2Prefetch == 0 || kL2Prefetch == 256, "cp_async16: L2 prefetch size 0 or 256");
  if constexpr (kL2Prefetch == 256)
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(valid ? 16 : 0));
  else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
template <int kL2Prefetch = 0> __device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  cp_async16<kL2Prefetch>(smem_u32(dst), src, valid);
}
// 4-byte global -> shared copy (through L1: .cg takes 16 bytes only), for what 16-byte chunks leave over.
__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_u32(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ldmatrix from a shared-window address (smem_u32) or a generic pointer into shared memory.
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* p) { ldmatrix_x4(r, smem_u32(p)); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* p) { ldmatrix_x4_trans(r, smem_u32(p)); }

// c[16x8] += a[16x16] * b[16x8], fp32 accumulators, a/b in T (f16 or bf16).
template <typename T> __device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}


// ---- wgmma (sm_90a): warpgroup MMA, A from registers, B from shared memory ----

// Orders this thread's generic-proxy shared-memory writes (cp.async, stores) before async-proxy reads
// (wgmma's B operand): each writing thread fences, then the CTA synchronises.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Pins registers that in-flight wgmmas use (their accumulators) so the compiler neither reads nor
// moves them between the MMAs and wgmma_wait; otherwise ptxas has to serialise the MMAs.
template <int R> __device__ __forceinline__ void wgmma_fence_operands(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Shared-memory matrix descriptor of a K-major operand in the 128-byte swizzle layout: rows of 64 16-bit
// elements (128 bytes), 8-row groups 1024 bytes apart, the 16-byte chunk c of row r stored at chunk
// c ^ (r % 8). The tile must start 1024-byte aligned; the k16 slice kk of it is desc + 2·kk (32 bytes on).
__device__ __forceinline__ uint64_t smem_desc_k128(uint32_t addr) {
  return uint64_t((addr & 0x3FFFF) >> 4) | uint64_t(1) << 16 | uint64_t(1024 >> 4) << 32 | uint64_t(1) << 62;
}

// d[64 x N] += a[64 x 16] · b[N x 16]ᵀ as wgmma m64nNk16 with fp32 accumulators: each warp w of the
// warpgroup passes rows [16w, 16w + 16) of A in the mma.m16n8k16 A-fragment layout (a[4]), B is [N rows][16
// k] K-major at the descriptor, and d[N / 2] holds the warp's rows like N / 8 m16n8 accumulator tiles
// (d[4j + 2h + e] = row lane / 4 + 8h, column 8j + 2 (lane % 4) + e). Operands: the N / 2 accumulators
// (the tables below), then A's four registers, the descriptor and the accumulate flag.
#define POLAR_WGMMA_D0 "%0, %1, %2, %3, %4, %5, %6, %7"
#define POLAR_WGMMA_D1 "%8, %9, %10, %11, %12, %13, %14, %15"
#define POLAR_WGMMA_D2 "%16, %17, %18, %19, %20, %21, %22, %23"
#define POLAR_WGMMA_D3 "%24, %25, %26, %27, %28, %29, %30, %31"
#define POLAR_WGMMA_D4 "%32, %33, %34, %35, %36, %37, %38, %39"
#define POLAR_WGMMA_D5 "%40, %41, %42, %43, %44, %45, %46, %47"
#define POLAR_WGMMA_D6 "%48, %49, %50, %51, %52, %53, %54, %55"
#define POLAR_WGMMA_D7 "%56, %57, %58, %59, %60, %61, %62, %63"
#define POLAR_WGMMA_D8 "%64, %65, %66, %67, %68, %69, %70, %71"
#define POLAR_WGMMA_D9 "%72, %73, %74, %75, %76, %77, %78, %79"
#define POLAR_WGMMA_D10 "%80, %81, %82, %83, %84, %85, %86, %87"
#define POLAR_WGMMA_D11 "%88, %89, %90, %91, %92, %93, %94, %95"
#define POLAR_WGMMA_D12 "%96, %97, %98, %99, %100, %101, %102, %103"
#define POLAR_WGMMA_D13 "%104, %105, %106, %107, %108, %109, %110, %111"
#define POLAR_WGMMA_D14 "%112, %113, %114, %115, %116, %117, %118, %119"
#define POLAR_WGMMA_D15 "%120, %121, %122, %123, %124, %125, %126, %127"
#define POLAR_ACC8(i) \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define POLAR_WGMMA_RS(N, TYPE, REGS, A0, DESC, FLAG, ...)                                                 \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" FLAG ", 0;\n"                                        \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE " {" REGS "}, " A0        \
               ", %" DESC ", p, 1, 1, 0;\n}\n"                                                           \
               : __VA_ARGS__                                                                            \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate))
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t a[4], uint64_t desc, uint32_t accumulate = 1) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>);
  static_assert(N == 16 || N == 32 || N == 64 || N == 128 || N == 256, "wgmma_rs: N is 16, 32, 64, 128 or 256");
#define POLAR_WGMMA_TYPES(N, REGS, A0, DESC, FLAG, ...)                   \
  if constexpr (std::is_same_v<T, __half>) {                              \
    POLAR_WGMMA_RS(N, "f16", REGS, A0, DESC, FLAG, __VA_ARGS__);          \
  } else {                                                                \
    POLAR_WGMMA_RS(N, "bf16", REGS, A0, DESC, FLAG, __VA_ARGS__);         \
  }
#define POLAR_R16 POLAR_WGMMA_D0
#define POLAR_R32 POLAR_R16 ", " POLAR_WGMMA_D1
#define POLAR_R64 POLAR_R32 ", " POLAR_WGMMA_D2 ", " POLAR_WGMMA_D3
#define POLAR_R128 POLAR_R64 ", " POLAR_WGMMA_D4 ", " POLAR_WGMMA_D5 ", " POLAR_WGMMA_D6 ", " POLAR_WGMMA_D7
#define POLAR_R256                                                                                                  \
  POLAR_R128 ", " POLAR_WGMMA_D8 ", " POLAR_WGMMA_D9 ", " POLAR_WGMMA_D10 ", " POLAR_WGMMA_D11 ", " POLAR_WGMMA_D12 \
             ", " POLAR_WGMMA_D13 ", " POLAR_WGMMA_D14 ", " POLAR_WGMMA_D15
#define POLAR_A16 POLAR_ACC8(0)
#define POLAR_A32 POLAR_A16, POLAR_ACC8(8)
#define POLAR_A64 POLAR_A32, POLAR_ACC8(16), POLAR_ACC8(24)
#define POLAR_A128 POLAR_A64, POLAR_ACC8(32), POLAR_ACC8(40), POLAR_ACC8(48), POLAR_ACC8(56)
#define POLAR_A256 \
  POLAR_A128, POLAR_ACC8(64), POLAR_ACC8(72), POLAR_ACC8(80), POLAR_ACC8(88), POLAR_ACC8(96), POLAR_ACC8(104), POLAR_ACC8(112), POLAR_ACC8(120)
  if constexpr (N == 16) {
    POLAR_WGMMA_TYPES(16, POLAR_R16, "{%8, %9, %10, %11}", "12", "13", POLAR_A16)
  } else if constexpr (N == 32) {
    POLAR_WGMMA_TYPES(32, POLAR_R32, "{%16, %17, %18, %19}", "20", "21", POLAR_A32)
  } else if constexpr (N == 64) {
    POLAR_WGMMA_TYPES(64, POLAR_R64, "{%32, %33, %34, %35}", "36", "37", POLAR_A64)
  } else if constexpr (N == 128) {
    POLAR_WGMMA_TYPES(128, POLAR_R128, "{%64, %65, %66, %67}", "68", "69", POLAR_A128)
  } else {
    POLAR_WGMMA_TYPES(256, POLAR_R256, "{%128, %129, %130, %131}", "132", "133", POLAR_A256)
  }
}
#undef POLAR_WGMMA_TYPES
#undef POLAR_WGMMA_RS
#undef POLAR_ACC8
#undef POLAR_R16
#undef POLAR_R32
#undef POLAR_R64
#undef POLAR_R128
#undef POLAR_R256
#undef POLAR_A16
#undef POLAR_A32
#undef POLAR_A64
#undef POLAR_A128
#undef POLAR_A256
#undef POLAR_WGMMA_D0
#undef POLAR_WGMMA_D1
#undef POLAR_WGMMA_D2
#undef POLAR_WGMMA_D3
#undef POLAR_WGMMA_D4
#undef POLAR_WGMMA_D5
#undef POLAR_WGMMA_D6
#undef POLAR_WGMMA_D7
#undef POLAR_WGMMA_D8
#undef POLAR_WGMMA_D9
#undef POLAR_WGMMA_D10
#undef POLAR_WGMMA_D11
#undef POLAR_WGMMA_D12
#undef POLAR_WGMMA_D13
#undef POLAR_WGMMA_D14
#undef POLAR_WGMMA_D15

}  // namespace polar::cuda::detail
