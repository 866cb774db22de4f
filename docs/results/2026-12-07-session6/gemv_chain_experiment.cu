// Standalone measurement program behind docs/benchmarks.md, "Issue 18, 2026-12-07 (sixth session)"; not part of
// polar's build. Build and run on a Hopper GPU: nvcc -O3 -std=c++17 -arch=sm_90a -o gemv_chain gemv_chain_experiment.cu -lcublas && ./gemv_chain
// Experiment (not part of polar): does one persistent kernel, with grid barriers between the projections of a
// llama-2-7b B1 decode step, remove the per-kernel fixed cost (~6 us per GEMV) that separate launches pay?
// Chain: 32 layers x (qkv 12288x4096, o 4096x4096, gate/up 22016x4096, down 4096x11008), bf16 weights, m = 1,
// each GEMV reading the previous one's output (first K entries). Variants:
//   launch   : one kernel per GEMV (grid = SMs x occ), 128 launches in one CUDA graph
//   persist  : one cooperative kernel, grid barrier after each GEMV
//   persist+L2: same, each CTA prefetches (prefetch.global.L2) its first rows of the next GEMV before the barrier
//   persist+reg: same, each thread loads its first row group of the next GEMV into registers before the barrier
// Same row partition and reduction order in all variants, so outputs must match bit for bit.
#include <cuda_bf16.h>
#include <cooperative_groups.h>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <cstdint>
#include <cublas_v2.h>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("CUDA %s at %d: %s\n", #x, __LINE__, cudaGetErrorString(e)); exit(1); } } while (0)

constexpr int kThreads = 256;
constexpr int kRows = 8;  // rows per group: kRows x 2 chunks in flight per thread at K = 4096

struct Gemv { const __nv_bfloat16* w; const __nv_bfloat16* x; __nv_bfloat16* y; int n, k; };
__constant__ Gemv c_chain[128];

__device__ __forceinline__ float dot8(uint4 w, uint4 x) {
  const __nv_bfloat162* a = reinterpret_cast<const __nv_bfloat162*>(&w);
  const __nv_bfloat162* b = reinterpret_cast<const __nv_bfloat162*>(&x);
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) { float2 fa = __bfloat1622float2(a[i]), fb = __bfloat1622float2(b[i]); s += fa.x * fb.x + fa.y * fb.y; }
  return s;
}

// CTA b of G computes rows [b*n/G, (b+1)*n/G) of y = W x; groups of kRows rows, all threads over K.
// pre: optional registers holding the first group's first chunk per row (loaded before a barrier).
template <bool kHavePre>
__device__ void gemv_cta(const Gemv& g, int b, int G, float (*red)[kRows], const uint4* pre) {
  const int r0 = (int)((int64_t)b * g.n / G), r1 = (int)((int64_t)(b + 1) * g.n / G);
  const int kc = g.k / 8;
  const uint4* W = reinterpret_cast<const uint4*>(g.w);
  const uint4* X = reinterpret_cast<const uint4*>(g.x);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  bool first = true;
  for (int rg = r0; rg < r1; rg += kRows) {
    float acc[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[r] = 0.f;
    for (int c = tid; c < kc; c += 2 * kThreads) {
      uint4 w0[kRows], w1[kRows];
      const bool two = c + kThreads < kc;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int row = min(rg + r, r1 - 1);
        if (kHavePre && first) w0[r] = pre[r];
        else w0[r] = __ldcs(W + (int64_t)row * kc + c);
        if (two) w1[r] = __ldcs(W + (int64_t)row * kc + c + kThreads);
      }
      first = false;
      const uint4 x0 = X[c];
      const uint4 x1 = two ? X[c + kThreads] : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int r = 0; r < kRows; ++r) acc[r] += dot8(w0[r], x0) + (two ? dot8(w1[r], x1) : 0.f);
    }
    first = false;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float v = acc[r];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) red[warp][r] = v;
    }
    __syncthreads();
    if (tid < kRows && rg + tid < r1) {
      float s = 0.f;
      for (int w = 0; w < kThreads / 32; ++w) s += red[w][tid];
      g.y[rg + tid] = __float2bfloat16(s);
    }
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kThreads) gemv_kernel(int i) {
  __shared__ float red[kThreads / 32][kRows];
  gemv_cta<false>(c_chain[i], blockIdx.x, gridDim.x, red, nullptr);
}

__device__ unsigned g_count, g_gen;

__device__ __forceinline__ void grid_barrier(unsigned nblocks) {
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned gen = *(volatile unsigned*)&g_gen;
    __threadfence();
    if (atomicAdd(&g_count, 1u) == nblocks - 1) {
      g_count = 0;
      __threadfence();
      atomicAdd(&g_gen, 1u);
    } else {
      while (*(volatile unsigned*)&g_gen == gen) { }
    }
    __threadfence();
  }
  __syncthreads();
}

// mode 0: plain, 1: L2 prefetch of the next GEMV's first rows, 2: register preload of the first row group.
template <int kMode>
__global__ void __launch_bounds__(kThreads) persist_kernel(int count, int l2_bytes) {
  __shared__ float red[kThreads / 32][kRows];
  uint4 pre[kRows];
  for (int i = 0; i < count; ++i) {
    const Gemv& g = c_chain[i];
    if (kMode == 2 && i > 0) gemv_cta<true>(g, blockIdx.x, gridDim.x, red, pre);
    else gemv_cta<false>(g, blockIdx.x, gridDim.x, red, nullptr);
    if (i + 1 < count) {
      const Gemv& nx = c_chain[i + 1];
      const int r0 = (int)((int64_t)blockIdx.x * nx.n / gridDim.x), r1 = (int)((int64_t)(blockIdx.x + 1) * nx.n / gridDim.x);
      const int kc = nx.k / 8;
      const uint4* W = reinterpret_cast<const uint4*>(nx.w);
      if (kMode == 1) {
        const char* base = reinterpret_cast<const char*>(W + (int64_t)r0 * kc);
        const int64_t slice = (int64_t)(r1 - r0) * kc * 16; const int64_t bytes = slice < l2_bytes ? slice : l2_bytes;
        for (int64_t o = (int64_t)threadIdx.x * 128; o < bytes; o += kThreads * 128)
          asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(base + o));
      } else if (kMode == 2) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const int row = min(r0 + r, r1 - 1);
          pre[r] = threadIdx.x < kc ? __ldcs(W + (int64_t)row * kc + threadIdx.x) : make_uint4(0, 0, 0, 0);
        }
      }
      grid_barrier(gridDim.x);
    }
  }
}


// ---- Warp-specialised persistent chain: a producer warp streams each CTA's weight rows into a shared-memory
// ring with bulk copies (cp.async.bulk + mbarriers) and runs ahead across GEMV boundaries, since weights do not
// depend on the previous output; consumer warps wait for the grid barrier only to read the new x.
constexpr int kSlot = 24576, kSlots = 8, kXBytes = 22528;

__device__ __forceinline__ unsigned smem_u32(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(uint64_t* b, unsigned n) { asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(b)), "r"(n)); }
__device__ __forceinline__ void mbar_expect_tx(uint64_t* b, unsigned tx) { asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(b)), "r"(tx) : "memory"); }
__device__ __forceinline__ void mbar_arrive(uint64_t* b) { asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(b)) : "memory"); }
__device__ __forceinline__ void mbar_wait(uint64_t* b, unsigned parity) {
  asm volatile("{\n .reg .pred p;\n W: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra W;\n}" ::"r"(smem_u32(b)), "r"(parity) : "memory");
}
__device__ __forceinline__ void bulk_load(void* dst, const void* src, unsigned bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(smem_u32(dst)), "l"(src), "r"(bytes), "r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void consumers_sync(int n) { asm volatile("bar.sync 1, %0;" ::"r"(n) : "memory"); }

// One warp computes a row: lane l takes 16-byte chunks l, l+32, ... (same order in every variant below).
__device__ __forceinline__ float warp_row(const uint4* w, const uint4* x, int kc, int lane) {
  float acc = 0.f;
#pragma unroll 8
  for (int c = lane; c < kc; c += 32) acc += dot8(w[c], x[c]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  return acc;
}

__device__ __forceinline__ void cta_rows(const Gemv& g, int b, int G, int& r0, int& r1) {
  r0 = (int)((int64_t)b * g.n / G); r1 = (int)((int64_t)(b + 1) * g.n / G);
}

// The same arithmetic launched per GEMV: warp per row, weights straight from global memory.
__global__ void __launch_bounds__(256) warp_row_kernel(int i) {
  const Gemv g = c_chain[i];
  const int kc = g.k / 8, lane = threadIdx.x & 31;
  const int gw = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, nw = (gridDim.x * blockDim.x) >> 5;
  const uint4* W = reinterpret_cast<const uint4*>(g.w);
  const uint4* X = reinterpret_cast<const uint4*>(g.x);
  for (int r = gw; r < g.n; r += nw) {
    float acc = 0.f;
#pragma unroll 8
    for (int c = lane; c < kc; c += 32) acc += dot8(__ldcs(W + (int64_t)r * kc + c), __ldcg(X + c));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) g.y[r] = __float2bfloat16(acc);
  }
}

template <int kConsumers>
__global__ void __launch_bounds__((kConsumers + 1) * 32, 1) tma_persist(int count) {
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* ring = smem;
  uint4* xs = reinterpret_cast<uint4*>(smem + kSlots * kSlot);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kSlots * kSlot + kXBytes);
  uint64_t* empty = full + kSlots;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kSlots; ++s) { mbar_init(full + s, 1); mbar_init(empty + s, 1); }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (warp == kConsumers) {  // producer
    if (lane == 0) {
      int s = 0;
      for (int i = 0; i < count; ++i) {
        const Gemv& g = c_chain[i];
        int r0, r1; cta_rows(g, blockIdx.x, gridDim.x, r0, r1);
        const int rps = kSlot / (g.k * 2);
        for (int r = r0; r < r1; r += rps, ++s) {
          const int slot = s % kSlots;
          if (s >= kSlots) mbar_wait(empty + slot, ((s / kSlots) - 1) & 1);
          const unsigned bytes = (unsigned)(min(rps, r1 - r) * g.k * 2);
          mbar_expect_tx(full + slot, bytes);
          bulk_load(ring + slot * kSlot, g.w + (int64_t)r * g.k, bytes, full + slot);
        }
      }
    }
    return;
  }
  const int nthreads = kConsumers * 32;
  int s = 0;
  for (int i = 0; i < count; ++i) {
    const Gemv& g = c_chain[i];
    int r0, r1; cta_rows(g, blockIdx.x, gridDim.x, r0, r1);
    const int kc = g.k / 8, rps = kSlot / (g.k * 2);
    const uint4* X = reinterpret_cast<const uint4*>(g.x);
    for (int c = threadIdx.x; c < kc; c += nthreads) xs[c] = __ldcg(X + c);
    consumers_sync(nthreads);
    for (int r = r0; r < r1; r += rps, ++s) {
      if (s % kConsumers != warp) continue;
      const int slot = s % kSlots;
      mbar_wait(full + slot, (s / kSlots) & 1);
      const uint4* w = reinterpret_cast<const uint4*>(ring + slot * kSlot);
      const int nr = min(rps, r1 - r);
      for (int j = 0; j < nr; ++j) {
        const float v = warp_row(w + j * kc, xs, kc, lane);
        if (lane == 0) g.y[r + j] = __float2bfloat16(v);
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(empty + slot);
    }
    consumers_sync(nthreads);
    if (i + 1 < count) {
      if (threadIdx.x == 0) {
        const unsigned gen = *(volatile unsigned*)&g_gen;
        __threadfence();
        if (atomicAdd(&g_count, 1u) == gridDim.x - 1) { g_count = 0; __threadfence(); atomicAdd(&g_gen, 1u); }
        else while (*(volatile unsigned*)&g_gen == gen) { }
        __threadfence();
      }
      consumers_sync(nthreads);
    }
  }
}

__global__ void read_kernel(const uint4* p, int64_t n, unsigned* sink) {
  uint4 a = make_uint4(0, 0, 0, 0);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    uint4 v = __ldcs(p + i); a.x ^= v.x; a.y ^= v.y; a.z ^= v.z; a.w ^= v.w;
  }
  if ((a.x ^ a.y ^ a.z ^ a.w) == 0x12345678u) *sink = 1;
}

__global__ void fill(__nv_bfloat16* p, int64_t n, uint32_t seed, float scale) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    uint32_t h = (uint32_t)i * 2654435761u ^ seed; h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
    p[i] = __float2bfloat16(((h & 0xffff) / 65536.f - 0.5f) * scale);
  }
}

static float median(std::vector<float> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; }

int main(int argc, char** argv) {
  int dev = 0; CK(cudaSetDevice(dev));
  cudaDeviceProp prop; CK(cudaGetDeviceProperties(&prop, dev));
  const int sms = prop.multiProcessorCount;
  printf("GPU %s, %d SMs, L2 %d MB\n", prop.name, sms, prop.l2CacheSize >> 20);
  struct Shape { int n, k; } shapes[4] = {{12288, 4096}, {4096, 4096}, {22016, 4096}, {4096, 11008}};
  const int L = 32, count = 4 * L;
  std::vector<Gemv> chain(count);
  int64_t total = 0;
  std::vector<__nv_bfloat16*> ws;
  for (int i = 0; i < count; ++i) total += (int64_t)shapes[i % 4].n * shapes[i % 4].k;
  __nv_bfloat16* wbuf; CK(cudaMalloc(&wbuf, total * 2));
  fill<<<4096, 256>>>(wbuf, total, 1, 0.05f);
  __nv_bfloat16* act[2]; CK(cudaMalloc(&act[0], 32768 * 2)); CK(cudaMalloc(&act[1], 32768 * 2));
  fill<<<64, 256>>>(act[0], 32768, 7, 1.f); fill<<<64, 256>>>(act[1], 32768, 9, 1.f);
  int64_t off = 0;
  for (int i = 0; i < count; ++i) {
    chain[i] = {wbuf + off, act[i & 1], act[(i + 1) & 1], shapes[i % 4].n, shapes[i % 4].k};
    off += (int64_t)shapes[i % 4].n * shapes[i % 4].k;
  }
  CK(cudaMemcpyToSymbol(c_chain, chain.data(), sizeof(Gemv) * count));
  __nv_bfloat16* x0; CK(cudaMalloc(&x0, 32768 * 2)); CK(cudaMemcpy(x0, act[0], 32768 * 2, cudaMemcpyDeviceToDevice));
  CK(cudaDeviceSynchronize());
  const double bytes = total * 2.0;

  // Read rate: 2 GiB read-only, best of 5.
  cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  unsigned* sink; CK(cudaMalloc(&sink, 4));
  const int64_t rn = (2ll << 30) / 16;
  float best = 1e9;
  for (int r = 0; r < 6; ++r) {
    CK(cudaEventRecord(e0)); read_kernel<<<sms * 8, 512>>>(reinterpret_cast<const uint4*>(wbuf), rn, sink); CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1)); float ms; CK(cudaEventElapsedTime(&ms, e0, e1)); if (r) best = std::min(best, ms);
  }
  const double rate = (2ll << 30) / (best * 1e-3) / 1e9;
  const double floor_ms = bytes / (rate * 1e9) * 1e3;
  printf("read rate %.0f GB/s, chain %.2f GB, floor %.3f ms\n", rate, bytes / 1e9, floor_ms);

  cudaStream_t s; CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  auto reset = [&] { CK(cudaMemcpyAsync(act[0], x0, 32768 * 2, cudaMemcpyDeviceToDevice, s)); };
  std::vector<__nv_bfloat16> ref(4096), out(4096);
  __nv_bfloat16* last = chain[count - 1].y;

  auto time_it = [&](const char* name, auto&& launch) {
    std::vector<float> t;
    for (int r = 0; r < 14; ++r) {
      reset();
      CK(cudaEventRecord(e0, s)); launch(); CK(cudaEventRecord(e1, s));
      CK(cudaEventSynchronize(e1)); float ms; CK(cudaEventElapsedTime(&ms, e0, e1)); if (r >= 2) t.push_back(ms);
    }
    CK(cudaMemcpy(out.data(), last, 4096 * 2, cudaMemcpyDeviceToHost));
    const float m = median(t);
    printf("%-34s %8.3f ms  %6.3fx floor  %5.2f us/GEMV over floor  match=%d\n", name, m, m / floor_ms,
           (m - floor_ms) * 1e3 / count, (int)std::equal(out.begin(), out.end(), ref.begin(),
           [](__nv_bfloat16 a, __nv_bfloat16 b) { return __bfloat16_as_ushort(a) == __bfloat16_as_ushort(b); }));
    return m;
  };

  // Separate launches in a graph, one wave: grid = SMs x occupancy.
  for (int per_sm : {1, 2, 4}) {
    const int G = sms * per_sm;
    cudaGraph_t graph; cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    for (int i = 0; i < count; ++i) gemv_kernel<<<G, kThreads, 0, s>>>(i);
    CK(cudaStreamEndCapture(s, &graph)); CK(cudaGraphInstantiate(&exec, graph, 0));
    if (per_sm == 1) {  // reference output from the first variant
      reset(); CK(cudaGraphLaunch(exec, s)); CK(cudaStreamSynchronize(s));
      CK(cudaMemcpy(ref.data(), last, 4096 * 2, cudaMemcpyDeviceToHost));
    }
    char name[64]; snprintf(name, sizeof name, "launches, %d CTA/SM", per_sm);
    time_it(name, [&] { CK(cudaGraphLaunch(exec, s)); });
    CK(cudaGraphExecDestroy(exec)); CK(cudaGraphDestroy(graph));
  }
  // Persistent cooperative kernel (the row partition depends on G: compare against a launch run with the same G).
  auto run_persist = [&](auto kernel, const char* label, int per_sm, int l2_bytes) {
    int occ = 0; CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, kThreads, 0));
    if (per_sm > occ) { printf("%s: %d CTA/SM does not fit (max %d)\n", label, per_sm, occ); return; }
    const int G = sms * per_sm;
    int c = count, l2 = l2_bytes;
    void* args[] = {&c, &l2};
    char name[64]; snprintf(name, sizeof name, "%s, %d CTA/SM%s", label, per_sm, l2_bytes ? "" : "");
    if (l2_bytes) snprintf(name, sizeof name, "%s %dK, %d CTA/SM", label, l2_bytes >> 10, per_sm);
    time_it(name, [&] { CK(cudaLaunchCooperativeKernel((void*)kernel, G, kThreads, args, 0, s)); });
  };
  for (int per_sm : {1, 2, 4}) {
    // reference for this partition
    {
      cudaGraph_t graph; cudaGraphExec_t exec;
      CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
      for (int i = 0; i < count; ++i) gemv_kernel<<<sms * per_sm, kThreads, 0, s>>>(i);
      CK(cudaStreamEndCapture(s, &graph)); CK(cudaGraphInstantiate(&exec, graph, 0));
      reset(); CK(cudaGraphLaunch(exec, s)); CK(cudaStreamSynchronize(s));
      CK(cudaMemcpy(ref.data(), last, 4096 * 2, cudaMemcpyDeviceToHost));
      CK(cudaGraphExecDestroy(exec)); CK(cudaGraphDestroy(graph));
    }
    run_persist(persist_kernel<0>, "persistent", per_sm, 0);
    run_persist(persist_kernel<1>, "persistent+L2", per_sm, 32 << 10);
    run_persist(persist_kernel<1>, "persistent+L2", per_sm, 128 << 10);
    run_persist(persist_kernel<2>, "persistent+reg", per_sm, 0);
  }
  // The same persistent kernel inside a graph (how a decode step would run it).
  {
    const int G = sms * 2; int c = count, l2 = 128 << 10; void* args[] = {&c, &l2};
    cudaGraph_t graph; cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    CK(cudaLaunchCooperativeKernel((void*)persist_kernel<1>, G, kThreads, args, 0, s));
    CK(cudaStreamEndCapture(s, &graph)); CK(cudaGraphInstantiate(&exec, graph, 0));
    time_it("persistent+L2 128K in a graph, 2/SM", [&] { CK(cudaGraphLaunch(exec, s)); });
  }
  // Warp-per-row arithmetic: launched per GEMV (reference), then the warp-specialised persistent chain.
  for (int per_sm : {1, 2}) {
    cudaGraph_t graph; cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    for (int i = 0; i < count; ++i) warp_row_kernel<<<sms * per_sm, 256, 0, s>>>(i);
    CK(cudaStreamEndCapture(s, &graph)); CK(cudaGraphInstantiate(&exec, graph, 0));
    reset(); CK(cudaGraphLaunch(exec, s)); CK(cudaStreamSynchronize(s));
    CK(cudaMemcpy(ref.data(), last, 4096 * 2, cudaMemcpyDeviceToHost));
    char name[64]; snprintf(name, sizeof name, "warp-row launches, %d CTA/SM", per_sm);
    time_it(name, [&] { CK(cudaGraphLaunch(exec, s)); });
    CK(cudaGraphExecDestroy(exec)); CK(cudaGraphDestroy(graph));
  }
  auto run_tma = [&](auto kernel, int consumers) {
    const int smem = kSlots * kSlot + kXBytes + 2 * kSlots * 8;
    CK(cudaFuncSetAttribute((const void*)kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    int occ = 0; CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, (consumers + 1) * 32, smem));
    if (occ < 1) { printf("tma: does not fit\n"); return; }
    int c = count; void* args[] = {&c};
    char name[64]; snprintf(name, sizeof name, "ring persistent, %d consumer warps", consumers);
    time_it(name, [&] { CK(cudaLaunchCooperativeKernel((void*)kernel, sms, (consumers + 1) * 32, args, smem, s)); });
  };
  run_tma(tma_persist<4>, 4);
  run_tma(tma_persist<8>, 8);
  run_tma(tma_persist<2>, 2);
  // cuBLAS chain (default algorithm), same weights and activations, y = W x as C[N,1] = A^T x.
  {
    cublasHandle_t h; cublasCreate(&h); cublasSetStream(h, s);
    const float one = 1.f, zero = 0.f;
    auto chain_blas = [&] {
      for (int i = 0; i < count; ++i)
        cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, chain[i].n, 1, chain[i].k, &one, chain[i].w, CUDA_R_16BF, chain[i].k,
                     chain[i].x, CUDA_R_16BF, chain[i].k, &zero, chain[i].y, CUDA_R_16BF, chain[i].n, CUBLAS_COMPUTE_32F,
                     CUBLAS_GEMM_DEFAULT);
    };
    chain_blas(); CK(cudaStreamSynchronize(s));
    cudaGraph_t graph; cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal)); chain_blas();
    CK(cudaStreamEndCapture(s, &graph)); CK(cudaGraphInstantiate(&exec, graph, 0));
    time_it("cuBLAS GemmEx chain (match: n/a)", [&] { CK(cudaGraphLaunch(exec, s)); });
    // per-shape: 32 of the same GEMV back to back (different layers' weights)
    for (int t = 0; t < 4; ++t) {
      for (int variant = 0; variant < 2; ++variant) {
        cudaGraph_t g2; cudaGraphExec_t e2;
        CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
        for (int l = 0; l < L; ++l) {
          const Gemv& c = chain[4 * l + t];
          if (variant == 0) cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, c.n, 1, c.k, &one, c.w, CUDA_R_16BF, c.k, c.x, CUDA_R_16BF,
                                         c.k, &zero, c.y, CUDA_R_16BF, c.n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
          else gemv_kernel<<<sms * 2, kThreads, 0, s>>>(4 * l + t);
        }
        CK(cudaStreamEndCapture(s, &g2)); CK(cudaGraphInstantiate(&e2, g2, 0));
        std::vector<float> tv;
        for (int r = 0; r < 12; ++r) { CK(cudaEventRecord(e0, s)); CK(cudaGraphLaunch(e2, s)); CK(cudaEventRecord(e1, s));
          CK(cudaEventSynchronize(e1)); float ms; CK(cudaEventElapsedTime(&ms, e0, e1)); if (r >= 2) tv.push_back(ms); }
        const double fl = 32.0 * chain[t].n * chain[t].k * 2 / (rate * 1e9) * 1e3;
        printf("  n%-5d k%-5d x32 %-8s %7.1f us/GEMV  floor %6.1f  over %5.2f us\n", chain[t].n, chain[t].k,
               variant ? "gemv" : "cuBLAS", median(tv) * 1e3 / 32, fl * 1e3 / 32, (median(tv) - fl) * 1e3 / 32);
      }
    }
  }
  return 0;
}
