// A read-only memory-mapped file. Loaders keep tensors as views into the mapping (MappedFile is a
// Storage), so a multi-GB checkpoint is paged in lazily and never copied unless it must be converted.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "core/tensor.h"

namespace polar {

class MappedFile final : public Storage {
 public:
  // Throws polar::Error naming the path if it cannot be opened or mapped. An empty file maps to size 0.
  static std::shared_ptr<MappedFile> open(const std::string& path);
  ~MappedFile() override;
  void* data() override { return ptr_; }
  size_t size() const override { return size_; }
  const uint8_t* bytes() const { return static_cast<const uint8_t*>(ptr_); }
  const std::string& path() const { return path_; }

 private:
  MappedFile() = default;
  void* ptr_ = nullptr;
  size_t size_ = 0;
  std::string path_;
};

}  // namespace polar
