// GGUF (v2 and v3) reading and writing. https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
//
// Layout: magic "GGUF", u32 version, u64 tensor_count, u64 kv_count, kv_count metadata entries
// (string key, u32 value type, value), tensor_count tensor infos (string name, u32 n_dims, u64 ne[n_dims],
// u32 ggml type, u64 offset relative to the data section), padding to general.alignment (default 32),
// then the data section. Tensor dims are listed fastest-varying first (ne[0] is the row length).
//
// GGUFFile::open validates the whole header against the file size before anything is read through it:
// truncation, lengths past the end, unknown value or tensor types, misaligned, out-of-range or overlapping
// tensor data all give a polar::Error that names the file and the problem.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/mapped_file.h"
#include "core/tensor.h"

namespace polar::gguf {

// ggml tensor types (values as in the file). Only those listed in `supported` can be dequantised.
enum class GGMLType : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15, BF16 = 30,
};
// Every ggml type has a name and block size (files holding types we cannot dequantise still open);
// type_block_* and type_nbytes throw polar::Error for a value ggml does not define, and type_name's
// "type 99" for such a value lasts until the calling thread's next type_name call.
const char* type_name(GGMLType t);            // "Q4_K", or "type 99" for an unknown value
bool type_supported(GGMLType t);              // F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q4_K Q5_K Q6_K
int64_t type_block_elems(GGMLType t);         // elements per block (1 for float types, 32, 256)
int64_t type_block_bytes(GGMLType t);         // bytes per block
// Bytes of a row-major tensor of n elements (n must be a multiple of the block size).
size_t type_nbytes(GGMLType t, int64_t n);

// Dequantise n elements (a multiple of the block size) of type t from src to dst (fp32).
void dequantize(GGMLType t, const void* src, float* dst, int64_t n);

struct TensorInfo {
  std::string name;
  std::vector<int64_t> ne;  // GGUF order: ne[0] fastest
  GGMLType type;
  uint64_t offset;          // absolute byte offset in the file
  size_t nbytes;
  // Row-major shape (ne reversed): a 2-D weight with ne = {in, out} is [out, in].
  Shape shape() const;
};

class File {
 public:
  static File open(const std::string& path);

  const std::string& path() const { return map_->path(); }
  uint32_t version() const { return version_; }
  // Metadata as JSON: integers, floats, bools, strings, and arrays of them (arrays of arrays too).
  const nlohmann::json& metadata() const { return metadata_; }
  bool has(const std::string& key) const { return metadata_.contains(key); }
  // Typed access; a missing key or a value of the wrong type is a polar::Error naming the key.
  std::string get_string(const std::string& key) const;
  int64_t get_int(const std::string& key) const;
  double get_float(const std::string& key) const;  // accepts integer values too
  bool get_bool(const std::string& key) const;
  std::optional<int64_t> find_int(const std::string& key) const;
  std::optional<double> find_float(const std::string& key) const;
  // A token id (tokenizer.ggml.bos_token_id, ...): ids are I32 everywhere, so a value outside [-1, 2^31)
  // (-1: "none", as some converters write) is a polar::Error naming the key, not narrowed into another token.
  std::optional<int32_t> find_token_id(const std::string& key) const;

  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find(const std::string& name) const;  // nullptr if absent
  const uint8_t* data(const TensorInfo& t) const { return map_->bytes() + t.offset; }
  // The tensor as fp32, row-major shape t.shape(). F32 tensors are returned as a view of the mapping
  // (no copy); everything else is dequantised into a new host tensor. Unsupported types are an error.
  Tensor load_f32(const TensorInfo& t) const;

 private:
  std::shared_ptr<MappedFile> map_;
  uint32_t version_ = 0;
  nlohmann::json metadata_ = nlohmann::json::object();
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, size_t> index_;  // name -> position in tensors_
};

// Writes GGUF v3 files: used by tests (synthetic blocks, malformed files) and by tools. Entries are
// written in the order given and keys or names are not deduplicated, so tests can build invalid files.
// Tensor data is aligned to 32 bytes, or to general.alignment when that is set with set_u32.
class Writer {
 public:
  void set_u32(const std::string& key, uint32_t v);
  void set_i32(const std::string& key, int32_t v);
  void set_u64(const std::string& key, uint64_t v);
  void set_f32(const std::string& key, float v);
  void set_bool(const std::string& key, bool v);
  void set_string(const std::string& key, const std::string& v);
  void set_strings(const std::string& key, const std::vector<std::string>& v);
  void set_f32s(const std::string& key, const std::vector<float>& v);
  void set_i32s(const std::string& key, const std::vector<int32_t>& v);
  // Raw data must be type_nbytes(type, numel) bytes; ne in GGUF order (ne[0] fastest).
  void add_tensor(const std::string& name, GGMLType type, std::vector<int64_t> ne, std::vector<uint8_t> data);
  void add_f32_tensor(const std::string& name, std::vector<int64_t> ne, const std::vector<float>& values);
  // The whole file as bytes, or written to path.
  std::vector<uint8_t> bytes() const;
  void write(const std::string& path) const;

 private:
  struct PendingTensor {
    std::string name;
    GGMLType type;
    std::vector<int64_t> ne;
    std::vector<uint8_t> data;
  };
  std::vector<std::pair<std::string, std::vector<uint8_t>>> kvs_;  // key, encoded value type + value
  std::vector<PendingTensor> tensors_;
  uint32_t alignment_ = 32;
};

}  // namespace polar::gguf
