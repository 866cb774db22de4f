// The two memory ceilings that benchmarks judge time against (../shared/docs/anchors-h200.md): the copy
// rate (a device-to-device copy, bytes read + written per second) and the streaming read rate (a kernel
// that only reads). Decode steps and their kernels read and hardly write, so the read rate is their
// physical limit; the copy-based figures stay beside it for continuity with earlier results.
#pragma once
#include "ops/backend.h"

namespace polar {

struct MemoryRates {
  double copy_gbps = 0;
  double read_gbps = 0;
  static MemoryRates measure(Backend& be) { return {be.measure_memory_gbps(), be.measure_read_gbps()}; }
};

}  // namespace polar
