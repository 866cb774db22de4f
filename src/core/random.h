// Counter-based random numbers: value i of stream `seed` is a pure function of (seed, i), so the CPU and
// CUDA backends (and any thread order) draw identical numbers. SplitMix64's finaliser as the mixer.
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define POLAR_HOST_DEVICE __host__ __device__
#else
#define POLAR_HOST_DEVICE
#endif

namespace polar {

POLAR_HOST_DEVICE inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Uniform in [0, 1) with 24 random bits (exactly representable in float).
POLAR_HOST_DEVICE inline float uniform_hash(uint64_t seed, uint64_t i) {
  return static_cast<float>(mix64(mix64(seed) + i * 0x9E3779B97F4A7C15ULL) >> 40) * (1.0f / 16777216.0f);
}

}  // namespace polar
