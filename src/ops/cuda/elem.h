// What every CUDA kernel file shares: `Elem` names the activation dtype of the tensors behind void pointers
// (all activations, weights and KV of one backend share it; arithmetic is fp32), and the bits of the
// device-side error flag.
#pragma once
#include <cstdint>

namespace polar::cuda {

enum class Elem { F16, BF16 };

// Any kernel that meets bad data it cannot reject on the host (an id outside a table) ORs a bit into a
// device-side flag, which the backend reads back at its next synchronisation.
enum ErrorBit : int32_t {
  kErrorIdOutOfRange = 1,
  kErrorSlotOutOfRange = 2,
  kErrorHeadOutOfRange = 4,
  kErrorNeuronOutOfRange = 8,
};

}  // namespace polar::cuda
