// Tensor: a typed, shaped view of bytes that some Storage owns (heap memory, a memory-mapped file, or,
// with the CUDA backend, device memory). Row-major and contiguous: every op in polar works on dense
// row-major buffers, so strides are implied by the shape (the last dimension is contiguous).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"

namespace polar {

enum class DType : uint8_t { F32, F16, BF16, I32, I64, U8 };
enum class Device : uint8_t { CPU, CUDA };

size_t dtype_size(DType t);
const char* dtype_name(DType t);

// Owner of a byte range. Subclasses decide how it is released (free, munmap, cudaFree).
class Storage {
 public:
  virtual ~Storage() = default;
  virtual void* data() = 0;
  virtual size_t size() const = 0;
  virtual Device device() const { return Device::CPU; }
};

// Heap storage, 64-byte aligned (cache line / AVX-512 friendly).
std::shared_ptr<Storage> host_storage(size_t bytes);

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);
int64_t numel(const Shape& s);

class Tensor {
 public:
  Tensor() = default;
  Tensor(std::shared_ptr<Storage> storage, size_t offset, DType dtype, Shape shape);

  // A new zero-filled host tensor.
  static Tensor zeros(DType dtype, Shape shape);
  static Tensor empty(DType dtype, Shape shape);

  bool defined() const { return storage_ != nullptr; }
  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_.at(i < 0 ? shape_.size() + i : i); }
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t numel() const { return polar::numel(shape_); }
  size_t nbytes() const { return numel() * dtype_size(dtype_); }
  Device device() const { return storage_ ? storage_->device() : Device::CPU; }

  void* raw() const { return static_cast<char*>(storage_->data()) + offset_; }
  template <typename T> T* data() const { return static_cast<T*>(raw()); }

  // Same bytes, another shape with the same number of elements.
  Tensor reshape(Shape shape) const;
  // `shape` worth of elements starting at element `offset` of this tensor's bytes, sharing storage.
  Tensor view(int64_t offset, Shape shape) const;
  // Rows [begin, end) of the first dimension, sharing storage.
  Tensor slice_rows(int64_t begin, int64_t end) const;

 private:
  std::shared_ptr<Storage> storage_;
  size_t offset_ = 0;
  DType dtype_ = DType::F32;
  Shape shape_;
};

}  // namespace polar
