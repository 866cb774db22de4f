// The CUDA backend's device memory (cuda_backend.cpp): a caching allocator over cudaMalloc and the Storage
// of a device tensor. cuda_block_bytes (cuda_backend.h) gives the size classes it caches by.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "core/tensor.h"
#include "ops/cuda/cuda_backend.h"

namespace polar::cuda {

// Caching device allocator: freed blocks are kept by size (cuda_block_bytes' classes) and handed out again, so the
// steady state of a decode loop, which asks for the same sizes every step, never calls cudaMalloc. All
// work runs on one stream, so a block freed on the host can be reused by the next op in stream order.
class DeviceAllocator {
 public:
  ~DeviceAllocator() { release_cached(); }

  void* get(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(bytes);
    if (it != free_.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      cached_bytes_ -= bytes;
      return p;
    }
    return allocate_locked(bytes);
  }

  void put(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_[bytes].push_back(p);
    cached_bytes_ += bytes;
  }

  size_t cached_bytes() const { return cached_bytes_; }
  void release_cached() {
    std::lock_guard<std::mutex> lock(mutex_);
    release_cached_locked();
  }

 private:
  // cudaMalloc, retried once after the cache is released; a polar::Error when the device is full.
  void* allocate_locked(size_t bytes);
  void release_cached_locked();
  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_bytes_ = 0;
};

// A device tensor's memory: a block of cuda_block_bytes(bytes) from the allocator, handed back when the
// last tensor viewing it goes.
class DeviceStorage final : public Storage {
 public:
  DeviceStorage(std::shared_ptr<DeviceAllocator> alloc, size_t bytes)
      : alloc_(std::move(alloc)), capacity_(cuda_block_bytes(bytes)), size_(bytes) {
    ptr_ = alloc_->get(capacity_);
  }
  ~DeviceStorage() override { alloc_->put(ptr_, capacity_); }
  void* data() override { return ptr_; }
  size_t size() const override { return size_; }
  Device device() const override { return Device::CUDA; }

 private:
  std::shared_ptr<DeviceAllocator> alloc_;
  void* ptr_ = nullptr;
  size_t capacity_, size_;
};


}  // namespace polar::cuda
