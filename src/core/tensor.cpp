#include "core/tensor.h"

#include <cstdlib>
#include <cstring>

namespace polar {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::F16: return 2;
    case DType::BF16: return 2;
    case DType::I32: return 4;
    case DType::I64: return 8;
    case DType::U8: return 1;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::F16: return "f16";
    case DType::BF16: return "bf16";
    case DType::I32: return "i32";
    case DType::I64: return "i64";
    case DType::U8: return "u8";
  }
  return "?";
}

namespace {
class HostStorage final : public Storage {
 public:
  explicit HostStorage(size_t bytes) : size_(bytes) {
    size_t rounded = (bytes + 63) / 64 * 64;
    ptr_ = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
    if (!ptr_) fail("out of host memory allocating {} bytes", bytes);
  }
  ~HostStorage() override { std::free(ptr_); }
  void* data() override { return ptr_; }
  size_t size() const override { return size_; }

 private:
  void* ptr_ = nullptr;
  size_t size_ = 0;
};
}  // namespace

std::shared_ptr<Storage> host_storage(size_t bytes) { return std::make_shared<HostStorage>(bytes); }

std::string shape_str(const Shape& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

int64_t numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

Tensor::Tensor(std::shared_ptr<Storage> storage, size_t offset, DType dtype, Shape shape)
    : storage_(std::move(storage)), offset_(offset), dtype_(dtype), shape_(std::move(shape)) {
  for (int64_t d : shape_) check(d >= 0, "negative dimension in shape {}", shape_str(shape_));
  check(offset_ + nbytes() <= storage_->size(), "tensor of shape {} ({} bytes at offset {}) exceeds its storage of {} bytes",
        shape_str(shape_), nbytes(), offset_, storage_->size());
}

Tensor Tensor::empty(DType dtype, Shape shape) {
  size_t bytes = polar::numel(shape) * dtype_size(dtype);
  return Tensor(host_storage(bytes), 0, dtype, std::move(shape));
}

Tensor Tensor::zeros(DType dtype, Shape shape) {
  Tensor t = empty(dtype, std::move(shape));
  std::memset(t.raw(), 0, t.nbytes());
  return t;
}

Tensor Tensor::reshape(Shape shape) const {
  check(polar::numel(shape) == numel(), "cannot reshape {} to {}", shape_str(shape_), shape_str(shape));
  return Tensor(storage_, offset_, dtype_, std::move(shape));
}

Tensor Tensor::view(int64_t offset, Shape shape) const {
  check(offset >= 0 && offset + polar::numel(shape) <= numel(), "view of {} elements at {} outside a tensor of {}",
        polar::numel(shape), offset, numel());
  return Tensor(storage_, offset_ + offset * dtype_size(dtype_), dtype_, std::move(shape));
}

Tensor Tensor::slice_rows(int64_t begin, int64_t end) const {
  check(ndim() >= 1 && 0 <= begin && begin <= end && end <= shape_[0], "row slice [{}, {}) out of range for {}", begin, end,
        shape_str(shape_));
  Shape s = shape_;
  s[0] = end - begin;
  size_t row_bytes = (shape_[0] == 0 ? 0 : nbytes() / shape_[0]);
  return Tensor(storage_, offset_ + begin * row_bytes, dtype_, std::move(s));
}

}  // namespace polar
