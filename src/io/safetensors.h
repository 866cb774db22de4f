// safetensors reading and writing. https://huggingface.co/docs/safetensors
//
// Layout: u64 little-endian header length N, N bytes of JSON {"name": {"dtype", "shape", "data_offsets":
// [begin, end)}, "__metadata__": {str: str}}, then the data section; offsets are relative to it.
// SafetensorsFile::open validates the header against the file before any tensor is touched: truncation,
// header length past the end, malformed JSON, unknown dtypes, shapes that disagree with the byte range,
// ranges out of bounds or overlapping each give a polar::Error naming the file and the tensor.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/mapped_file.h"
#include "core/tensor.h"

namespace polar::safetensors {

struct TensorInfo {
  std::string name;
  DType dtype;
  Shape shape;
  size_t begin;  // absolute byte offset in the file
  size_t nbytes;
};

class File {
 public:
  static File open(const std::string& path);
  const std::string& path() const { return map_->path(); }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const TensorInfo* find(const std::string& name) const;
  // The tensor in its stored dtype, as a view of the mapping (no copy).
  Tensor view(const TensorInfo& t) const;
  // The tensor converted to fp32 (F32: a view; F16/BF16: converted into a new host tensor).
  Tensor load_f32(const TensorInfo& t) const;

 private:
  std::shared_ptr<MappedFile> map_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// Writes tensors (host, any dtype) and string metadata to path.
void write(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
           const std::map<std::string, std::string>& metadata = {});

}  // namespace polar::safetensors
