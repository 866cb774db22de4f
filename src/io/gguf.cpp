#include "io/gguf.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <string_view>

#include "core/error.h"
#include "core/half.h"

namespace polar::gguf {

// Multi-byte fields are read and written by memcpy in host order; GGUF is little-endian.
static_assert(std::endian::native == std::endian::little, "polar's GGUF code assumes a little-endian host");

namespace {

using nlohmann::json;

struct TypeInfo {
  uint32_t id;
  const char* name;
  int64_t block_elems;
  int64_t block_bytes;
};

// All ggml types with their block sizes (ggml's type_traits), so that a file holding types polar cannot
// dequantise still opens with every tensor's byte range checked.
constexpr TypeInfo kTypes[] = {
    {0, "F32", 1, 4},         {1, "F16", 1, 2},         {2, "Q4_0", 32, 18},      {3, "Q4_1", 32, 20},
    {6, "Q5_0", 32, 22},      {7, "Q5_1", 32, 24},      {8, "Q8_0", 32, 34},      {9, "Q8_1", 32, 36},
    {10, "Q2_K", 256, 84},    {11, "Q3_K", 256, 110},   {12, "Q4_K", 256, 144},   {13, "Q5_K", 256, 176},
    {14, "Q6_K", 256, 210},   {15, "Q8_K", 256, 292},   {16, "IQ2_XXS", 256, 66}, {17, "IQ2_XS", 256, 74},
    {18, "IQ3_XXS", 256, 98}, {19, "IQ1_S", 256, 50},   {20, "IQ4_NL", 32, 18},   {21, "IQ3_S", 256, 110},
    {22, "IQ2_S", 256, 82},   {23, "IQ4_XS", 256, 136}, {24, "I8", 1, 1},         {25, "I16", 1, 2},
    {26, "I32", 1, 4},        {27, "I64", 1, 8},        {28, "F64", 1, 8},        {29, "IQ1_M", 256, 56},
    {30, "BF16", 1, 2},       {34, "TQ1_0", 256, 54},   {35, "TQ2_0", 256, 66},   {39, "MXFP4", 32, 17},
};

const TypeInfo* find_type(GGMLType t) {
  for (const TypeInfo& i : kTypes)
    if (i.id == static_cast<uint32_t>(t)) return &i;
  return nullptr;
}

const TypeInfo& known_type(GGMLType t) {
  const TypeInfo* i = find_type(t);
  if (!i) fail("unknown ggml type {}", static_cast<uint32_t>(t));
  return *i;
}

// Metadata value types, as numbered in the file.
enum ValueType : uint32_t { U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 };
// Smallest encoding of each value type (a string is at least its length, an array its type and count):
// lets a count be rejected before anything is allocated for it.
constexpr uint64_t kMinValueBytes[] = {1, 1, 2, 2, 4, 4, 4, 1, 8, 12, 8, 8, 8};
constexpr uint32_t kNumValueTypes = std::size(kMinValueBytes);
// Each nesting level costs only 12 bytes of file, so without a limit a small file could exhaust the stack.
constexpr int kMaxArrayDepth = 16;
// Key length + value type + smallest value; name length + n_dims + one dim + type + offset.
constexpr uint64_t kMinKvBytes = 8 + 4 + 1, kMinTensorInfoBytes = 8 + 4 + 8 + 4 + 8;

// The only way the parser touches the mapping: every read is checked against the file size first.
class Reader {
 public:
  explicit Reader(const MappedFile& f) : path_(f.path()), p_(f.bytes()), size_(f.size()) {}

  size_t pos() const { return pos_; }
  uint64_t remaining() const { return size_ - pos_; }

  template <typename... Args>
  [[noreturn]] void error(fmt::format_string<Args...> f, Args&&... args) const {
    fail("{}: {}", path_, fmt::format(f, std::forward<Args>(args)...));
  }

  template <typename T>
  T read(std::string_view what) {
    if (sizeof(T) > remaining())
      error("truncated reading {} at offset {} (needs {} bytes, {} left)", what, pos_, sizeof(T), remaining());
    T v;
    std::memcpy(&v, p_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }

  std::string read_string(std::string_view what) {
    const size_t at = pos_;
    const auto n = read<uint64_t>(what);
    if (n > remaining()) error("{}: string length {} at offset {} runs past the end of the file", what, n, at);
    std::string s(reinterpret_cast<const char*>(p_ + pos_), n);
    pos_ += n;
    return s;
  }

 private:
  const std::string& path_;
  const uint8_t* p_;
  size_t size_;
  size_t pos_ = 0;
};

json read_value(Reader& r, uint32_t type, const std::string& key, int depth) {
  switch (type) {
    case U8: return r.read<uint8_t>(key);
    case I8: return r.read<int8_t>(key);
    case U16: return r.read<uint16_t>(key);
    case I16: return r.read<int16_t>(key);
    case U32: return r.read<uint32_t>(key);
    case I32: return r.read<int32_t>(key);
    case F32: return r.read<float>(key);
    case U64: return r.read<uint64_t>(key);
    case I64: return r.read<int64_t>(key);
    case F64: return r.read<double>(key);
    case STRING: return r.read_string(key);
    case BOOL: {
      const auto b = r.read<uint8_t>(key);
      if (b > 1) r.error("metadata key {}: invalid bool value {}", key, b);
      return b == 1;
    }
    case ARRAY: {
      const size_t at = r.pos();
      const auto elem_type = r.read<uint32_t>(key);
      const auto count = r.read<uint64_t>(key);
      if (elem_type >= kNumValueTypes) r.error("metadata key {}: unknown array element type {}", key, elem_type);
      if (count > r.remaining() / kMinValueBytes[elem_type])
        r.error("metadata key {}: array of {} elements at offset {} runs past the end of the file", key, count, at);
      if (depth >= kMaxArrayDepth) r.error("metadata key {}: arrays nested deeper than {}", key, kMaxArrayDepth);
      json a = json::array();
      a.get_ref<json::array_t&>().reserve(count);
      for (uint64_t i = 0; i < count; ++i) a.push_back(read_value(r, elem_type, key, depth + 1));
      return a;
    }
    default: r.error("metadata key {}: unknown value type {}", key, type);
  }
}

uint64_t align_up(uint64_t x, uint64_t alignment) { return (x + alignment - 1) / alignment * alignment; }

inline float f16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return f16_to_f32(h);
}

// Block decoders, following ggml's dequantize_row_* operation for operation. Every product is exact in fp32
// (an f16 scale has 11 significant bits and its integer factors multiply to less than 2^12), so the only rounding
// is the final add of a min, and the results are bit-identical to ggml whether or not the compiler fuses
// multiply-adds.

void decode_q8_0(const uint8_t* b, float* y) {
  const float d = f16_at(b);
  for (int j = 0; j < 32; ++j) y[j] = static_cast<int8_t>(b[2 + j]) * d;
}

void decode_q4_0(const uint8_t* b, float* y) {
  const float d = f16_at(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    y[j] = ((qs[j] & 0xF) - 8) * d;
    y[j + 16] = ((qs[j] >> 4) - 8) * d;
  }
}

void decode_q4_1(const uint8_t* b, float* y) {
  const float d = f16_at(b), m = f16_at(b + 2);
  const uint8_t* qs = b + 4;
  for (int j = 0; j < 16; ++j) {
    y[j] = (qs[j] & 0xF) * d + m;
    y[j + 16] = (qs[j] >> 4) * d + m;
  }
}

// Q4_K and Q5_K pack eight 6-bit scales and eight 6-bit mins into 12 bytes: sub-blocks 0-3 use the low six
// bits of bytes 0-3 (scale) and 4-7 (min); sub-blocks 4-7 take their low four bits from the nibbles of bytes
// 8-11 and their top two bits from the otherwise unused top bits of bytes 0-3 (scale) and 4-7 (min).
struct ScaleMin {
  int scale, min;
};
ScaleMin k4_scale_min(const uint8_t* s, int j) {
  if (j < 4) return {s[j] & 63, s[j + 4] & 63};
  return {(s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)};
}

// Q4_K/Q5_K: 256 elements in 4 groups of 64; group g reads 32 bytes of qs, low nibbles giving sub-block 2g
// and high nibbles sub-block 2g+1. Q5_K adds a fifth bit per element from qh: bit 2g for the low nibble of
// qs[l], bit 2g+1 for the high one.
template <bool HighBit>
void decode_k4_k5(const uint8_t* b, float* y) {
  const float d = f16_at(b), dmin = f16_at(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* qs = HighBit ? b + 48 : b + 16;
  for (int g = 0; g < 4; ++g, qs += 32, y += 64) {
    const ScaleMin lo = k4_scale_min(scales, 2 * g), hi = k4_scale_min(scales, 2 * g + 1);
    const float d_lo = d * lo.scale, m_lo = dmin * lo.min, d_hi = d * hi.scale, m_hi = dmin * hi.min;
    for (int l = 0; l < 32; ++l) {
      int q_lo = qs[l] & 0xF, q_hi = qs[l] >> 4;
      if constexpr (HighBit) {
        q_lo += ((qh[l] >> (2 * g)) & 1) << 4;
        q_hi += ((qh[l] >> (2 * g + 1)) & 1) << 4;
      }
      y[l] = d_lo * q_lo - m_lo;
      y[l + 32] = d_hi * q_hi - m_hi;
    }
  }
}

// Q6_K: ql[128], qh[64], int8 scales[16], f16 d last. Each half of 128 elements uses 64 bytes of ql and 32
// of qh; element l + 32k of the half takes a nibble of ql (k = 0, 1: low nibbles of ql[l], ql[l + 32];
// k = 2, 3: their high nibbles) and bits 2k..2k+1 of qh[l]. Every 16 elements share one scale.
void decode_q6_k(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const auto* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = f16_at(b + 208);
  for (int half = 0; half < 2; ++half, ql += 64, qh += 32, sc += 8, y += 128) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q0 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q1 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q2 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q3 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * sc[is] * q0;
      y[l + 32] = d * sc[is + 2] * q1;
      y[l + 64] = d * sc[is + 4] * q2;
      y[l + 96] = d * sc[is + 6] * q3;
    }
  }
}

template <typename Decode>
void decode_blocks(const uint8_t* src, float* dst, int64_t n, const TypeInfo& ti, Decode decode) {
  const int64_t blocks = n / ti.block_elems;
  // Below this size the threads cost more than the work.
#pragma omp parallel for schedule(static) if (n >= (int64_t{1} << 16))
  for (int64_t i = 0; i < blocks; ++i) decode(src + i * ti.block_bytes, dst + i * ti.block_elems);
}

template <typename T>
void put(std::vector<uint8_t>& out, T v) {
  const auto* p = reinterpret_cast<const uint8_t*>(&v);
  out.insert(out.end(), p, p + sizeof(T));
}

void put(std::vector<uint8_t>& out, const std::string& s) {
  put<uint64_t>(out, s.size());
  out.insert(out.end(), s.begin(), s.end());
}

template <typename T>
std::vector<uint8_t> encode_scalar(ValueType type, const T& v) {
  std::vector<uint8_t> e;
  put<uint32_t>(e, type);
  put(e, v);
  return e;
}

template <typename T>
std::vector<uint8_t> encode_array(ValueType elem_type, const std::vector<T>& v) {
  std::vector<uint8_t> e;
  put<uint32_t>(e, ARRAY);
  put<uint32_t>(e, elem_type);
  put<uint64_t>(e, v.size());
  for (const T& x : v) put(e, x);
  return e;
}

const json& lookup(const File& f, const std::string& key) {
  auto it = f.metadata().find(key);
  if (it == f.metadata().end()) fail("{}: missing metadata key {}", f.path(), key);
  return *it;
}

[[noreturn]] void wrong_type(const File& f, const std::string& key, const json& v, const char* wanted) {
  fail("{}: metadata key {} is a {}, not {}", f.path(), key, v.type_name(), wanted);
}

}  // namespace

const char* type_name(GGMLType t) {
  if (const TypeInfo* i = find_type(t)) return i->name;
  // Only unknown values need a buffer; per thread so concurrent callers do not clobber each other.
  thread_local char buf[24];
  fmt::format_to_n(buf, sizeof(buf) - 1, "type {}", static_cast<uint32_t>(t)).out[0] = '\0';
  return buf;
}

bool type_supported(GGMLType t) {
  switch (t) {
    case GGMLType::F32:
    case GGMLType::F16:
    case GGMLType::BF16:
    case GGMLType::Q8_0:
    case GGMLType::Q4_0:
    case GGMLType::Q4_1:
    case GGMLType::Q4_K:
    case GGMLType::Q5_K:
    case GGMLType::Q6_K: return true;
    default: return false;
  }
}

int64_t type_block_elems(GGMLType t) { return known_type(t).block_elems; }
int64_t type_block_bytes(GGMLType t) { return known_type(t).block_bytes; }

size_t type_nbytes(GGMLType t, int64_t n) {
  const TypeInfo& ti = known_type(t);
  check(n >= 0 && n % ti.block_elems == 0, "{} elements is not a whole number of {} blocks of {}", n, ti.name,
        ti.block_elems);
  return static_cast<size_t>(n / ti.block_elems * ti.block_bytes);
}

void dequantize(GGMLType t, const void* src, float* dst, int64_t n) {
  const TypeInfo& ti = known_type(t);
  check(n >= 0 && n % ti.block_elems == 0, "cannot dequantise {} elements of {}: blocks hold {}", n, ti.name,
        ti.block_elems);
  const auto* s = static_cast<const uint8_t*>(src);
  switch (t) {
    case GGMLType::F32: return decode_blocks(s, dst, n, ti, [](const uint8_t* b, float* y) { std::memcpy(y, b, 4); });
    case GGMLType::F16: return decode_blocks(s, dst, n, ti, [](const uint8_t* b, float* y) { *y = f16_at(b); });
    case GGMLType::BF16:
      return decode_blocks(s, dst, n, ti, [](const uint8_t* b, float* y) {
        uint16_t h;
        std::memcpy(&h, b, 2);
        *y = bf16_to_f32(h);
      });
    case GGMLType::Q8_0: return decode_blocks(s, dst, n, ti, decode_q8_0);
    case GGMLType::Q4_0: return decode_blocks(s, dst, n, ti, decode_q4_0);
    case GGMLType::Q4_1: return decode_blocks(s, dst, n, ti, decode_q4_1);
    case GGMLType::Q4_K: return decode_blocks(s, dst, n, ti, decode_k4_k5<false>);
    case GGMLType::Q5_K: return decode_blocks(s, dst, n, ti, decode_k4_k5<true>);
    case GGMLType::Q6_K: return decode_blocks(s, dst, n, ti, decode_q6_k);
    default: fail("unsupported quantisation type {}", ti.name);
  }
}

Shape TensorInfo::shape() const { return Shape(ne.rbegin(), ne.rend()); }

File File::open(const std::string& path) {
  File f;
  f.map_ = MappedFile::open(path);
  Reader r(*f.map_);

  const auto magic = r.read<std::array<char, 4>>("magic");
  if (std::string_view(magic.data(), 4) != "GGUF") r.error("not a GGUF file (bad magic)");
  f.version_ = r.read<uint32_t>("version");
  if (f.version_ != 2 && f.version_ != 3) {
    const uint32_t swapped = __builtin_bswap32(f.version_);
    r.error("unsupported GGUF version {}{} (polar reads versions 2 and 3)", f.version_,
            swapped == 2 || swapped == 3 ? ", a big-endian file" : "");
  }
  const auto n_tensors = r.read<uint64_t>("tensor count");
  const auto n_kv = r.read<uint64_t>("metadata count");
  if (n_kv > r.remaining() / kMinKvBytes || n_tensors > r.remaining() / kMinTensorInfoBytes ||
      n_kv * kMinKvBytes + n_tensors * kMinTensorInfoBytes > r.remaining())
    r.error("header claims {} metadata entries and {} tensors, more than the file can hold", n_kv, n_tensors);

  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key = r.read_string("metadata key");
    const auto type = r.read<uint32_t>(key);
    json value = read_value(r, type, key, 0);
    if (f.metadata_.contains(key)) r.error("duplicate metadata key {}", key);
    f.metadata_[std::move(key)] = std::move(value);
  }

  uint64_t alignment = 32;
  if (auto it = f.metadata_.find("general.alignment"); it != f.metadata_.end()) {
    const json& a = *it;
    if (!a.is_number_integer() || (!a.is_number_unsigned() && a.get<int64_t>() <= 0) ||
        !std::has_single_bit(a.get<uint64_t>()))
      r.error("general.alignment must be a power of two, got {}", a.dump());
    alignment = a.get<uint64_t>();
  }

  f.tensors_.reserve(n_tensors);
  for (uint64_t i = 0; i < n_tensors; ++i) {
    TensorInfo t;
    t.name = r.read_string("tensor name");
    const auto n_dims = r.read<uint32_t>(t.name);
    if (n_dims < 1 || n_dims > 4) r.error("tensor {} has {} dimensions (1 to 4 allowed)", t.name, n_dims);
    int64_t n = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const auto len = r.read<int64_t>(t.name);
      if (len <= 0) r.error("tensor {} has dimension {} of length {}", t.name, d, len);
      if (__builtin_mul_overflow(n, len, &n)) r.error("tensor {}: element count overflows", t.name);
      t.ne.push_back(len);
    }
    const auto type = r.read<uint32_t>(t.name);
    t.type = static_cast<GGMLType>(type);
    const TypeInfo* ti = find_type(t.type);
    if (!ti) r.error("tensor {} has unknown ggml type {}", t.name, type);
    if (t.ne[0] % ti->block_elems != 0)
      r.error("tensor {} of type {} has row length {}, not a multiple of the block size {}", t.name, ti->name, t.ne[0],
              ti->block_elems);
    // Element counts up to 2^63 can still overflow in bytes; such a tensor cannot fit in the file anyway.
    uint64_t nbytes;
    if (__builtin_mul_overflow(static_cast<uint64_t>(n / ti->block_elems), static_cast<uint64_t>(ti->block_bytes),
                               &nbytes) ||
        nbytes > f.map_->size())
      r.error("tensor {} ({} elements of {}) is larger than the file", t.name, n, ti->name);
    t.nbytes = nbytes;
    t.offset = r.read<uint64_t>(t.name);
    if (t.offset % alignment != 0)
      r.error("tensor {} offset {} is not a multiple of the alignment {}", t.name, t.offset, alignment);
    if (!f.index_.emplace(t.name, f.tensors_.size()).second) r.error("duplicate tensor name {}", t.name);
    f.tensors_.push_back(std::move(t));
  }

  // Tensor offsets are relative to the data section, which starts at the first aligned offset after the infos.
  const uint64_t data_start = align_up(r.pos(), alignment), size = f.map_->size();
  for (TensorInfo& t : f.tensors_) {
    if (data_start > size || t.offset > size - data_start || t.nbytes > size - data_start - t.offset)
      r.error(
          "tensor {} data ({} bytes at offset {} of the data section at {}) runs past the end of the file ({} bytes)",
          t.name, t.nbytes, t.offset, data_start, size);
    t.offset += data_start;
  }
  std::vector<const TensorInfo*> by_offset;
  for (const TensorInfo& t : f.tensors_) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const TensorInfo &a = *by_offset[i - 1], &b = *by_offset[i];
    if (a.offset + a.nbytes > b.offset)
      r.error("tensors {} (bytes {}..{}) and {} (bytes {}..{}) overlap", a.name, a.offset, a.offset + a.nbytes, b.name,
              b.offset, b.offset + b.nbytes);
  }
  return f;
}

std::string File::get_string(const std::string& key) const {
  const json& v = lookup(*this, key);
  if (!v.is_string()) wrong_type(*this, key, v, "a string");
  return v.get<std::string>();
}

int64_t File::get_int(const std::string& key) const {
  const json& v = lookup(*this, key);
  if (!v.is_number_integer()) wrong_type(*this, key, v, "an integer");
  if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
    fail("{}: metadata key {} = {} does not fit in int64", path(), key, v.get<uint64_t>());
  return v.get<int64_t>();
}

double File::get_float(const std::string& key) const {
  const json& v = lookup(*this, key);
  if (!v.is_number()) wrong_type(*this, key, v, "a number");
  return v.get<double>();
}

bool File::get_bool(const std::string& key) const {
  const json& v = lookup(*this, key);
  if (!v.is_boolean()) wrong_type(*this, key, v, "a bool");
  return v.get<bool>();
}

std::optional<int64_t> File::find_int(const std::string& key) const {
  return has(key) ? std::optional(get_int(key)) : std::nullopt;
}

std::optional<int32_t> File::find_token_id(const std::string& key) const {
  const std::optional<int64_t> v = find_int(key);
  if (!v) return std::nullopt;
  check(*v >= -1 && *v <= std::numeric_limits<int32_t>::max(), "{}: metadata {} = {} is not a token id", path(), key,
        *v);
  return static_cast<int32_t>(*v);
}

std::optional<double> File::find_float(const std::string& key) const {
  return has(key) ? std::optional(get_float(key)) : std::nullopt;
}

const TensorInfo* File::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

Tensor File::load_f32(const TensorInfo& t) const {
  if (!type_supported(t.type))
    fail("{}: unsupported quantisation type {} for tensor {}", path(), type_name(t.type), t.name);
  // GGUF allows alignments below 4, so F32 data is used in place only when it is float-aligned.
  if (t.type == GGMLType::F32 && t.offset % alignof(float) == 0) return Tensor(map_, t.offset, DType::F32, t.shape());
  Tensor out = Tensor::empty(DType::F32, t.shape());
  dequantize(t.type, data(t), out.data<float>(), out.numel());
  return out;
}

void Writer::set_u32(const std::string& key, uint32_t v) {
  if (key == "general.alignment") {
    check(std::has_single_bit(v), "general.alignment must be a power of two, got {}", v);
    alignment_ = v;
  }
  kvs_.emplace_back(key, encode_scalar(U32, v));
}
void Writer::set_i32(const std::string& key, int32_t v) { kvs_.emplace_back(key, encode_scalar(I32, v)); }
void Writer::set_u64(const std::string& key, uint64_t v) { kvs_.emplace_back(key, encode_scalar(U64, v)); }
void Writer::set_f32(const std::string& key, float v) { kvs_.emplace_back(key, encode_scalar(F32, v)); }
void Writer::set_bool(const std::string& key, bool v) {
  kvs_.emplace_back(key, encode_scalar(BOOL, static_cast<uint8_t>(v)));
}
void Writer::set_string(const std::string& key, const std::string& v) {
  kvs_.emplace_back(key, encode_scalar(STRING, v));
}
void Writer::set_strings(const std::string& key, const std::vector<std::string>& v) {
  kvs_.emplace_back(key, encode_array(STRING, v));
}
void Writer::set_f32s(const std::string& key, const std::vector<float>& v) {
  kvs_.emplace_back(key, encode_array(F32, v));
}
void Writer::set_i32s(const std::string& key, const std::vector<int32_t>& v) {
  kvs_.emplace_back(key, encode_array(I32, v));
}

void Writer::add_tensor(const std::string& name, GGMLType type, std::vector<int64_t> ne, std::vector<uint8_t> data) {
  check(!ne.empty() && ne.size() <= 4, "tensor {}: {} dimensions (1 to 4 allowed)", name, ne.size());
  const size_t want = type_nbytes(type, numel(ne));
  check(data.size() == want, "tensor {}: {} bytes of data, {} of shape {} needs {}", name, data.size(), type_name(type),
        shape_str(ne), want);
  tensors_.push_back({name, type, std::move(ne), std::move(data)});
}

void Writer::add_f32_tensor(const std::string& name, std::vector<int64_t> ne, const std::vector<float>& values) {
  std::vector<uint8_t> data(values.size() * sizeof(float));
  std::memcpy(data.data(), values.data(), data.size());
  add_tensor(name, GGMLType::F32, std::move(ne), std::move(data));
}

std::vector<uint8_t> Writer::bytes() const {
  std::vector<uint8_t> out;
  out.insert(out.end(), {'G', 'G', 'U', 'F'});
  put<uint32_t>(out, 3);
  put<uint64_t>(out, tensors_.size());
  put<uint64_t>(out, kvs_.size());
  for (const auto& [key, value] : kvs_) {
    put(out, key);
    out.insert(out.end(), value.begin(), value.end());
  }
  uint64_t offset = 0;
  for (const PendingTensor& t : tensors_) {
    put(out, t.name);
    put<uint32_t>(out, t.ne.size());
    for (int64_t d : t.ne) put<uint64_t>(out, d);
    put<uint32_t>(out, static_cast<uint32_t>(t.type));
    put<uint64_t>(out, offset);
    offset = align_up(offset + t.data.size(), alignment_);
  }
  for (const PendingTensor& t : tensors_) {
    out.resize(align_up(out.size(), alignment_));
    out.insert(out.end(), t.data.begin(), t.data.end());
  }
  out.resize(align_up(out.size(), alignment_));
  return out;
}

void Writer::write(const std::string& path) const {
  const std::vector<uint8_t> b = bytes();
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  f.close();
  if (!f) fail("cannot write {}: {}", path, std::strerror(errno));
}

}  // namespace polar::gguf
