#include "io/safetensors.h"

#include <algorithm>
#include <cstring>
#include <fstream>

#include <nlohmann/json.hpp>

#include "core/half.h"
#include "io/json.h"

namespace polar::safetensors {

namespace {

DType parse_dtype(const std::string& s, const std::string& file, const std::string& name) {
  if (s == "F32") return DType::F32;
  if (s == "F16") return DType::F16;
  if (s == "BF16") return DType::BF16;
  if (s == "I32") return DType::I32;
  if (s == "I64") return DType::I64;
  if (s == "U8") return DType::U8;
  fail("{}: tensor '{}' has unsupported dtype {}", file, name, s);
}

const char* dtype_tag(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::I32: return "I32";
    case DType::I64: return "I64";
    case DType::U8: return "U8";
  }
  return "?";
}

// Max header size accepted (the format's own limit is 100 MB).
constexpr uint64_t kMaxHeader = 100u << 20;

}  // namespace

File File::open(const std::string& path) {
  File f;
  f.map_ = MappedFile::open(path);
  const size_t size = f.map_->size();
  check(size >= 8, "{}: not a safetensors file (only {} bytes)", path, size);
  uint64_t header_len;
  std::memcpy(&header_len, f.map_->bytes(), 8);
  check(header_len <= kMaxHeader, "{}: header length {} is implausibly large (corrupt file?)", path, header_len);
  check(header_len <= size - 8, "{}: header length {} runs past the end of the file ({} bytes): truncated or corrupt",
        path, header_len, size);
  nlohmann::json header;
  try {
    header = parse_json(f.map_->bytes() + 8, f.map_->bytes() + 8 + header_len);
  } catch (const nlohmann::json::exception& e) {
    fail("{}: malformed safetensors header: {}", path, e.what());
  }
  check(header.is_object(), "{}: safetensors header is not a JSON object", path);
  const size_t data_begin = 8 + header_len;
  const size_t data_size = size - data_begin;
  for (auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      check(entry.is_object(), "{}: __metadata__ is not an object", path);
      for (auto& [k, v] : entry.items()) {
        check(v.is_string(), "{}: metadata value for '{}' is not a string", path, k);
        f.metadata_[k] = v.get<std::string>();
      }
      continue;
    }
    check(entry.is_object() && entry.contains("dtype") && entry.contains("shape") && entry.contains("data_offsets"),
          "{}: tensor '{}' lacks dtype, shape or data_offsets", path, name);
    check(entry["dtype"].is_string() && entry["shape"].is_array() && entry["data_offsets"].is_array() &&
              entry["data_offsets"].size() == 2,
          "{}: tensor '{}' has a malformed entry", path, name);
    TensorInfo t;
    t.name = name;
    t.dtype = parse_dtype(entry["dtype"].get<std::string>(), path, name);
    uint64_t count = 1;
    for (auto& d : entry["shape"]) {
      check(d.is_number_unsigned(), "{}: tensor '{}' has a non-integer or negative dimension", path, name);
      uint64_t v = d.get<uint64_t>();
      check(v == 0 || count <= (uint64_t(1) << 62) / v, "{}: tensor '{}' shape overflows", path, name);
      count *= v;
      t.shape.push_back(static_cast<int64_t>(v));
    }
    auto& offs = entry["data_offsets"];
    check(offs[0].is_number_unsigned() && offs[1].is_number_unsigned(), "{}: tensor '{}' has invalid data_offsets",
          path, name);
    uint64_t b = offs[0].get<uint64_t>(), e = offs[1].get<uint64_t>();
    check(b <= e && e <= data_size, "{}: tensor '{}' data [{}, {}) lies outside the data section ({} bytes): truncated or corrupt",
          path, name, b, e, data_size);
    check(e - b == count * dtype_size(t.dtype), "{}: tensor '{}' has shape {} ({}) but {} bytes of data", path, name,
          shape_str(t.shape), dtype_name(t.dtype), e - b);
    t.begin = data_begin + b;
    t.nbytes = e - b;
    f.tensors_.push_back(std::move(t));
  }
  // Overlap check on the sorted byte ranges of the non-empty tensors (an empty tensor occupies no bytes, and
  // skipping it keeps it from hiding an overlap between its neighbours).
  std::vector<const TensorInfo*> order;
  for (auto& t : f.tensors_)
    if (t.nbytes > 0) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < order.size(); ++i)
    check(order[i - 1]->begin + order[i - 1]->nbytes <= order[i]->begin, "{}: tensors '{}' and '{}' overlap", path,
          order[i - 1]->name, order[i]->name);
  return f;
}

const TensorInfo* File::find(const std::string& name) const {
  for (auto& t : tensors_)
    if (t.name == name) return &t;
  return nullptr;
}

Tensor File::view(const TensorInfo& t) const { return Tensor(map_, t.begin, t.dtype, t.shape); }

Tensor File::load_f32(const TensorInfo& t) const {
  Tensor src = view(t);
  if (t.dtype == DType::F32) {
    // Unaligned data cannot be read as float directly; copy it then.
    if (reinterpret_cast<uintptr_t>(src.raw()) % alignof(float) == 0) return src;
    Tensor out = Tensor::empty(DType::F32, t.shape);
    std::memcpy(out.raw(), src.raw(), t.nbytes);
    return out;
  }
  check(t.dtype == DType::F16 || t.dtype == DType::BF16, "{}: tensor '{}' is {}, not a floating-point type", path(),
        t.name, dtype_name(t.dtype));
  Tensor out = Tensor::empty(DType::F32, t.shape);
  const uint8_t* in = static_cast<const uint8_t*>(src.raw());
  float* o = out.data<float>();
  const int64_t n = out.numel();
  const bool bf16 = t.dtype == DType::BF16;
#pragma omp parallel for schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, in + 2 * i, 2);
    o[i] = bf16 ? bf16_to_f32(h) : f16_to_f32(h);
  }
  return out;
}

void write(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
           const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  size_t offset = 0;
  for (auto& [name, t] : tensors) {
    check(t.device() == Device::CPU, "safetensors::write: tensor '{}' is not on the host", name);
    header[name] = {{"dtype", dtype_tag(t.dtype())}, {"shape", t.shape()}, {"data_offsets", {offset, offset + t.nbytes()}}};
    offset += t.nbytes();
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // keep the data section 8-byte aligned
  std::ofstream out(path, std::ios::binary);
  check(out.good(), "cannot create {}", path);
  uint64_t len = h.size();
  out.write(reinterpret_cast<const char*>(&len), 8);
  out.write(h.data(), static_cast<std::streamsize>(h.size()));
  for (auto& [name, t] : tensors) out.write(static_cast<const char*>(t.raw()), static_cast<std::streamsize>(t.nbytes()));
  out.close();
  check(!out.fail(), "error writing {}", path);
}

}  // namespace polar::safetensors
