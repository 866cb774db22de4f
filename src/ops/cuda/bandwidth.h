// The device's streaming read rate: a kernel that only reads. A decode step reads its weights and KV
// cache and writes almost nothing, so its physical limit is the read rate, which a device-to-device copy
// (half of whose traffic is writes) understates: on an H200, PyTorch's SDPA read its KV at 4.6 TB/s while
// a copy counted as read + write moved 4.25 TB/s (../shared/docs/anchors-h200.md).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace polar::cuda {

// Reads data [bytes] (16-byte aligned, bytes a multiple of 4) once, with 16-byte loads, several in
// flight per thread, over a grid of `blocks` CTAs striding the whole buffer, and XORs every 32-bit word
// into *xor_out (which the caller zeroes first): the result proves each word was read, so the compiler
// can drop no load, and a test can check it against the host.
void read_probe(const void* data, int64_t bytes, uint32_t* xor_out, int blocks, cudaStream_t stream);
// CTAs of read_probe's kernel that are resident on the device at once (its persistent grid).
int read_probe_blocks(int device);

}  // namespace polar::cuda
