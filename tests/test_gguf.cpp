#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <map>
#include <random>

#include "core/half.h"
#include "io/checkpoint.h"
#include "io/gguf.h"
#include "test_util.h"

using namespace polar;
using namespace polar::gguf;
using polar::test::shared_path;
using polar::test::TempDir;
using polar::test::write_bytes;

namespace {

// ---- Reference decoders: element i of a tensor, computed straight from the block layout, one element at a
// time. Deliberately unlike the production decoders (which work a block at a time).

uint16_t u16_at(const uint8_t* p) { return static_cast<uint16_t>(p[0] | p[1] << 8); }
float half_at(const uint8_t* p) { return f16_to_f32(u16_at(p)); }

// The 12-byte scale table of Q4_K/Q5_K: eight 6-bit scales and eight 6-bit mins. Entries 0-3 are the low six
// bits of bytes 0-3 (scales) and 4-7 (mins); entries 4-7 are the nibbles of bytes 8-11 (low nibble: scale,
// high nibble: min) with bits 4-5 taken from the top two bits of bytes 0-3 (scales) and 4-7 (mins).
void unpack_k_scales(const uint8_t* t, int scale[8], int min[8]) {
  for (int k = 0; k < 4; ++k) {
    scale[k] = t[k] % 64;
    min[k] = t[4 + k] % 64;
    scale[4 + k] = t[8 + k] % 16 + (t[k] / 64) * 16;
    min[4 + k] = t[8 + k] / 16 + (t[4 + k] / 64) * 16;
  }
}

// Q4_K/Q5_K: sub-block s (32 elements) reads bytes 32 * (s / 2) .. + 31 of qs, low nibbles for even s,
// high nibbles for odd s. Q5_K's fifth bit of element j is bit s of qh[j % 32].
float reference_k(const uint8_t* b, int j, bool five_bit) {
  const int s = j / 32, l = j % 32;
  const uint8_t* qs = b + (five_bit ? 48 : 16);
  const uint8_t byte = qs[32 * (s / 2) + l];
  int q = s % 2 == 0 ? byte % 16 : byte / 16;
  if (five_bit && (b[16 + l] >> s) % 2 == 1) q += 16;
  int scale[8], min[8];
  unpack_k_scales(b + 4, scale, min);
  return half_at(b) * scale[s] * q - half_at(b + 2) * min[s];
}

// Q6_K: element j of the super-block is in half h = j / 128; within it, quarter k = (j % 128) / 32 and
// lane l = j % 32. Low four bits: nibble (low for k < 2) of ql[64 h + 32 (k % 2) + l]; high two bits:
// bits 2k, 2k+1 of qh[32 h + l]; value offset by 32; scale j / 16; d is the last field.
float reference_q6_k(const uint8_t* b, int j) {
  const int h = j / 128, k = (j % 128) / 32, l = j % 32;
  const uint8_t lo_byte = b[64 * h + 32 * (k % 2) + l];
  const int lo = k < 2 ? lo_byte % 16 : lo_byte / 16;
  const int hi = (b[128 + 32 * h + l] >> (2 * k)) % 4;
  const int scale = static_cast<int8_t>(b[192 + j / 16]);
  return half_at(b + 208) * scale * (lo + 16 * hi - 32);
}

float reference_element(GGMLType type, const uint8_t* data, int64_t i) {
  const auto block = [&](int64_t elems, int64_t bytes) { return data + i / elems * bytes; };
  const int j32 = static_cast<int>(i % 32), j256 = static_cast<int>(i % 256);
  switch (type) {
    case GGMLType::F32: {
      float f;
      std::memcpy(&f, data + 4 * i, 4);
      return f;
    }
    case GGMLType::F16: return half_at(data + 2 * i);
    case GGMLType::BF16: return bf16_to_f32(u16_at(data + 2 * i));
    case GGMLType::Q8_0: {
      const uint8_t* b = block(32, 34);
      return static_cast<int8_t>(b[2 + j32]) * half_at(b);
    }
    case GGMLType::Q4_0: {
      const uint8_t* b = block(32, 18);
      const int q = j32 < 16 ? b[2 + j32] % 16 : b[2 + j32 - 16] / 16;
      return (q - 8) * half_at(b);
    }
    case GGMLType::Q4_1: {
      const uint8_t* b = block(32, 20);
      const int q = j32 < 16 ? b[4 + j32] % 16 : b[4 + j32 - 16] / 16;
      return q * half_at(b) + half_at(b + 2);
    }
    case GGMLType::Q4_K: return reference_k(block(256, 144), j256, false);
    case GGMLType::Q5_K: return reference_k(block(256, 176), j256, true);
    case GGMLType::Q6_K: return reference_q6_k(block(256, 210), j256);
    default: ADD_FAILURE() << "no reference for " << type_name(type); return 0;
  }
}

// Random blocks of a type; the f16 scale fields get finite values in [-2, 2], as a quantiser would write.
std::vector<uint8_t> random_blocks(GGMLType type, int64_t n, std::mt19937& rng) {
  std::vector<uint8_t> data(type_nbytes(type, n));
  std::uniform_int_distribution<int> byte(0, 255);
  for (uint8_t& b : data) b = static_cast<uint8_t>(byte(rng));
  std::uniform_real_distribution<float> scale(-2.0f, 2.0f);
  const auto set_half = [&](size_t at, uint16_t h) { std::memcpy(&data[at], &h, 2); };
  std::vector<size_t> half_fields;  // offsets of f16 fields within a block
  switch (type) {
    case GGMLType::Q8_0:
    case GGMLType::Q4_0: half_fields = {0}; break;
    case GGMLType::Q4_1:
    case GGMLType::Q4_K:
    case GGMLType::Q5_K: half_fields = {0, 2}; break;
    case GGMLType::Q6_K: half_fields = {208}; break;
    default: break;
  }
  const size_t bb = type_block_bytes(type);
  for (size_t at = 0; at < data.size(); at += bb)
    for (size_t f : half_fields) set_half(at + f, f32_to_f16(scale(rng)));
  // Raw F16/BF16/F32 values: any bits except inf/NaN (exponent all ones).
  for (size_t at = 0; at < data.size(); at += bb) {
    if (type == GGMLType::F16 && (data[at + 1] & 0x7c) == 0x7c) data[at + 1] ^= 0x40;
    if (type == GGMLType::BF16 && (data[at + 1] & 0x7f) == 0x7f && (data[at] & 0x80)) data[at + 1] ^= 0x40;
    if (type == GGMLType::F32 && (data[at + 3] & 0x7f) == 0x7f && (data[at + 2] & 0x80)) data[at + 3] ^= 0x40;
  }
  return data;
}

uint32_t bits(float f) { return std::bit_cast<uint32_t>(f); }

::testing::AssertionResult Contains(const std::string& text, const std::string& part) {
  if (text.find(part) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "\"" << text << "\" does not contain \"" << part << "\"";
}

// ---- Building and patching files.

// Little-endian GGUF bytes written field by field, for files the Writer cannot express.
struct Raw {
  std::vector<uint8_t> b;
  template <typename T>
  Raw& num(T v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    b.insert(b.end(), p, p + sizeof(T));
    return *this;
  }
  Raw& str(const std::string& s) {
    num<uint64_t>(s.size());
    b.insert(b.end(), s.begin(), s.end());
    return *this;
  }
  Raw& header(uint64_t n_tensors, uint64_t n_kv, uint32_t version = 3) {
    b.insert(b.end(), {'G', 'G', 'U', 'F'});
    return num(version).num(n_tensors).num(n_kv);
  }
};

// Metadata value type numbers as in the file.
enum : uint32_t { U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 };

// Offset of the field after tensor `name`'s name string in the tensor infos (its n_dims).
size_t tensor_info(const std::vector<uint8_t>& file, const std::string& name) {
  Raw enc;
  enc.str(name);
  auto it = std::search(file.begin(), file.end(), enc.b.begin(), enc.b.end());
  EXPECT_NE(it, file.end()) << name;
  return static_cast<size_t>(it - file.begin()) + enc.b.size();
}

template <typename T>
void patch(std::vector<uint8_t>& file, size_t at, T v) {
  std::memcpy(&file[at], &v, sizeof(T));
}

// A small valid file: a Q8_0 tensor (68 bytes, padded to 96) then an F32 tensor whose data ends the file,
// so that cutting the file anywhere loses something.
std::vector<uint8_t> small_file() {
  Writer w;
  w.set_string("general.architecture", "llama");
  w.set_strings("tokenizer.ggml.tokens", {"<unk>", "a", "bc"});
  w.set_u32("llama.context_length", 128);
  std::mt19937 rng(1);
  w.add_tensor("blk.q", GGMLType::Q8_0, {64}, random_blocks(GGMLType::Q8_0, 64, rng));
  w.add_f32_tensor("blk.f", {4, 2}, {1, 2, 3, 4, 5, 6, 7, 8});
  return w.bytes();
}
// In small_file(): after the name, n_dims (4), ne (8 each), type (4), offset (8).
constexpr size_t kFTypeField = 4 + 2 * 8, kFOffsetField = kFTypeField + 4;

struct Opened {
  TempDir dir;
  std::string path = dir.path("model.gguf");
  File file;
  explicit Opened(const std::vector<uint8_t>& bytes) : file((write_bytes(path, bytes), File::open(path))) {}
};

// The polar::Error that opening these bytes gives; checks that it names the file.
std::string open_error(const std::vector<uint8_t>& bytes) {
  TempDir dir;
  const std::string path = dir.path("bad.gguf");
  write_bytes(path, bytes);
  try {
    File::open(path);
  } catch (const polar::Error& e) {
    EXPECT_TRUE(Contains(e.what(), path));
    return e.what();
  }
  ADD_FAILURE() << "opened without error";
  return "";
}

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const polar::Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no polar::Error";
  return "";
}

const GGMLType kSupported[] = {GGMLType::F32,  GGMLType::F16,  GGMLType::BF16, GGMLType::Q8_0, GGMLType::Q4_0,
                               GGMLType::Q4_1, GGMLType::Q4_K, GGMLType::Q5_K, GGMLType::Q6_K};

}  // namespace

TEST(GgufTypes, NamesAndSizes) {
  EXPECT_STREQ(type_name(GGMLType::Q4_K), "Q4_K");
  EXPECT_STREQ(type_name(GGMLType::BF16), "BF16");
  EXPECT_STREQ(type_name(static_cast<GGMLType>(99)), "type 99");
  EXPECT_EQ(type_block_elems(GGMLType::Q6_K), 256);
  EXPECT_EQ(type_block_bytes(GGMLType::Q6_K), 210);
  EXPECT_EQ(type_block_bytes(GGMLType::Q5_K), 176);
  EXPECT_EQ(type_block_bytes(GGMLType::Q4_K), 144);
  EXPECT_EQ(type_block_bytes(GGMLType::Q4_1), 20);
  EXPECT_EQ(type_nbytes(GGMLType::Q8_0, 64), 68u);
  EXPECT_EQ(type_nbytes(GGMLType::F16, 3), 6u);
  for (GGMLType t : kSupported) EXPECT_TRUE(type_supported(t)) << type_name(t);
  EXPECT_FALSE(type_supported(GGMLType::Q5_0));
  EXPECT_FALSE(type_supported(GGMLType::Q2_K));
  EXPECT_TRUE(Contains(error_of([] { type_block_bytes(static_cast<GGMLType>(99)); }), "unknown ggml type 99"));
  EXPECT_TRUE(Contains(error_of([] { type_nbytes(GGMLType::Q4_K, 100); }), "not a whole number"));
}

TEST(GgufDequant, MatchesReferenceDecoder) {
  // 81920 elements per tensor: enough blocks to take the OpenMP path.
  const std::vector<int64_t> ne = {1024, 80};
  std::mt19937 rng(12345);
  Writer w;
  std::vector<std::vector<uint8_t>> raw;
  for (GGMLType t : kSupported) {
    raw.push_back(random_blocks(t, numel(ne), rng));
    w.add_tensor(type_name(t), t, ne, raw.back());
  }
  Opened o(w.bytes());
  for (size_t k = 0; k < std::size(kSupported); ++k) {
    const GGMLType t = kSupported[k];
    SCOPED_TRACE(type_name(t));
    const TensorInfo* info = o.file.find(type_name(t));
    ASSERT_NE(info, nullptr);
    EXPECT_EQ(info->type, t);
    Tensor x = o.file.load_f32(*info);
    ASSERT_EQ(x.shape(), (Shape{80, 1024}));
    const float* got = x.data<float>();
    for (int64_t i = 0; i < x.numel(); ++i) {
      const float want = reference_element(t, raw[k].data(), i);
      ASSERT_TRUE(std::isfinite(want)) << "element " << i;
      ASSERT_EQ(bits(got[i]), bits(want)) << "element " << i << ": " << got[i] << " vs " << want;
    }
  }
}

TEST(GgufDequant, KnownValues) {
  // Q8_0: d = 0.5, q = -128, -127, ..., -97.
  std::vector<uint8_t> q8(34);
  patch<uint16_t>(q8, 0, f32_to_f16(0.5f));
  for (int j = 0; j < 32; ++j) q8[2 + j] = static_cast<uint8_t>(-128 + j);
  float y[256];
  dequantize(GGMLType::Q8_0, q8.data(), y, 32);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(y[j], (-128 + j) * 0.5f) << j;

  // Q4_0: d = 2; byte j holds j in its low nibble (element j) and 15 - j in its high nibble (element 16 + j).
  std::vector<uint8_t> q4(18);
  patch<uint16_t>(q4, 0, f32_to_f16(2.0f));
  for (int j = 0; j < 16; ++j) q4[2 + j] = static_cast<uint8_t>(j | (15 - j) << 4);
  dequantize(GGMLType::Q4_0, q4.data(), y, 32);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(y[j], (j - 8) * 2.0f) << j;
    EXPECT_EQ(y[16 + j], (15 - j - 8) * 2.0f) << j;
  }

  // Q4_1: d = 0.25, m = -1; every byte 0x3a: low nibbles 10, high nibbles 3.
  std::vector<uint8_t> q41(20, 0x3a);
  patch<uint16_t>(q41, 0, f32_to_f16(0.25f));
  patch<uint16_t>(q41, 2, f32_to_f16(-1.0f));
  dequantize(GGMLType::Q4_1, q41.data(), y, 32);
  EXPECT_EQ(y[0], 1.5f);
  EXPECT_EQ(y[31], -0.25f);

  // Q4_K: every scale and min is 63 (all bits set, so the split high bits are exercised); qs bytes 0xf0.
  // Even sub-blocks read the low nibble 0: -63; odd ones the high nibble 15: 63 * 15 - 63.
  std::vector<uint8_t> q4k(144, 0xf0);
  patch<uint16_t>(q4k, 0, f32_to_f16(1.0f));
  patch<uint16_t>(q4k, 2, f32_to_f16(1.0f));
  std::fill(q4k.begin() + 4, q4k.begin() + 16, 0xff);
  dequantize(GGMLType::Q4_K, q4k.data(), y, 256);
  for (int j = 0; j < 256; ++j) EXPECT_EQ(y[j], (j / 32) % 2 == 0 ? -63.0f : 882.0f) << j;

  // Q6_K: all quants 0 (value -32), scale of element j is j / 16 + 1, d = 0.5 stored at the end.
  std::vector<uint8_t> q6k(210, 0);
  for (int s = 0; s < 16; ++s) q6k[192 + s] = static_cast<uint8_t>(s + 1);
  patch<uint16_t>(q6k, 208, f32_to_f16(0.5f));
  dequantize(GGMLType::Q6_K, q6k.data(), y, 256);
  for (int j = 0; j < 256; ++j) EXPECT_EQ(y[j], -16.0f * (j / 16 + 1)) << j;

  EXPECT_TRUE(Contains(error_of([&] { dequantize(GGMLType::Q6_K, q6k.data(), y, 100); }), "100 elements"));
}

TEST(GgufMetadata, WriterRoundTrip) {
  Writer w;
  w.set_u32("u32", 4000000000u);
  w.set_i32("i32", -7);
  w.set_u64("u64", 1ull << 40);
  w.set_f32("f32", 1e-5f);
  w.set_bool("yes", true);
  w.set_bool("no", false);
  w.set_string("str", "héllo");
  w.set_strings("strs", {"", "a", "<0x0A>"});
  w.set_f32s("f32s", {0.5f, -2.0f});
  w.set_i32s("i32s", {-1, 0, 1 << 30});
  Opened o(w.bytes());
  const File& f = o.file;
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.metadata().size(), 10u);
  EXPECT_EQ(f.get_int("u32"), 4000000000);
  EXPECT_EQ(f.get_int("i32"), -7);
  EXPECT_EQ(f.get_int("u64"), int64_t{1} << 40);
  EXPECT_EQ(f.get_float("f32"), static_cast<double>(1e-5f));
  EXPECT_EQ(f.get_float("i32"), -7.0);
  EXPECT_TRUE(f.get_bool("yes"));
  EXPECT_FALSE(f.get_bool("no"));
  EXPECT_EQ(f.get_string("str"), "héllo");
  EXPECT_EQ(f.metadata().at("strs"), nlohmann::json({"", "a", "<0x0A>"}));
  EXPECT_EQ(f.metadata().at("f32s"), nlohmann::json({0.5, -2.0}));
  EXPECT_EQ(f.metadata().at("i32s"), nlohmann::json({-1, 0, 1 << 30}));
  EXPECT_EQ(f.find_int("i32"), -7);
  EXPECT_EQ(f.find_int("absent"), std::nullopt);
  EXPECT_EQ(f.find_float("f32s.absent"), std::nullopt);
  EXPECT_TRUE(f.tensors().empty());
}

TEST(GgufMetadata, EveryValueType) {
  Raw r;
  r.header(0, 16, /*version=*/2);
  r.str("u8").num(U8).num<uint8_t>(200);
  r.str("i8").num(I8).num<int8_t>(-100);
  r.str("u16").num(U16).num<uint16_t>(60000);
  r.str("i16").num(I16).num<int16_t>(-30000);
  r.str("u32").num(U32).num<uint32_t>(4000000000u);
  r.str("i32").num(I32).num<int32_t>(-2000000000);
  r.str("f32").num(F32).num<float>(0.1f);
  r.str("bool").num(BOOL).num<uint8_t>(1);
  r.str("string").num(STRING).str("value");
  r.str("u64").num(U64).num<uint64_t>(~0ull);
  r.str("i64").num(I64).num<int64_t>(INT64_MIN);
  r.str("f64").num(F64).num<double>(0.1);
  r.str("strings").num(ARRAY).num(STRING).num<uint64_t>(2).str("x").str("yz");
  r.str("empty").num(ARRAY).num(U8).num<uint64_t>(0);
  r.str("bools").num(ARRAY).num(BOOL).num<uint64_t>(2).num<uint8_t>(0).num<uint8_t>(1);
  // [[1, 2], [-3]] as an array of arrays of i16.
  r.str("nested").num(ARRAY).num(ARRAY).num<uint64_t>(2);
  r.num(I16).num<uint64_t>(2).num<int16_t>(1).num<int16_t>(2);
  r.num(I16).num<uint64_t>(1).num<int16_t>(-3);
  Opened o(r.b);
  const nlohmann::json& m = o.file.metadata();
  EXPECT_EQ(o.file.version(), 2u);
  EXPECT_EQ(m.at("u8"), 200);
  EXPECT_EQ(m.at("i8"), -100);
  EXPECT_EQ(m.at("u16"), 60000);
  EXPECT_EQ(m.at("i16"), -30000);
  EXPECT_EQ(m.at("u32"), 4000000000u);
  EXPECT_EQ(m.at("i32"), -2000000000);
  EXPECT_EQ(m.at("f32").get<double>(), static_cast<double>(0.1f));
  EXPECT_EQ(m.at("bool"), true);
  EXPECT_EQ(m.at("string"), "value");
  EXPECT_EQ(m.at("u64").get<uint64_t>(), ~0ull);
  EXPECT_EQ(m.at("i64").get<int64_t>(), INT64_MIN);
  EXPECT_EQ(m.at("f64").get<double>(), 0.1);
  EXPECT_EQ(m.at("strings"), nlohmann::json({"x", "yz"}));
  EXPECT_EQ(m.at("empty"), nlohmann::json::array());
  EXPECT_EQ(m.at("bools"), nlohmann::json({false, true}));
  EXPECT_EQ(m.at("nested"), nlohmann::json({{1, 2}, {-3}}));
}

TEST(GgufMetadata, GetErrorsNameTheKey) {
  Raw r;
  r.header(0, 3);
  r.str("count").num(U32).num<uint32_t>(5);
  r.str("name").num(STRING).str("x");
  r.str("huge").num(U64).num<uint64_t>(~0ull);
  Opened o(r.b);
  const File& f = o.file;
  EXPECT_TRUE(Contains(error_of([&] { f.get_int("missing.key"); }), "missing metadata key missing.key"));
  EXPECT_TRUE(Contains(error_of([&] { f.get_string("count"); }), "metadata key count is a number, not a string"));
  EXPECT_TRUE(Contains(error_of([&] { f.get_int("name"); }), "metadata key name is a string, not an integer"));
  EXPECT_TRUE(Contains(error_of([&] { f.get_float("name"); }), "name"));
  EXPECT_TRUE(Contains(error_of([&] { f.get_bool("count"); }), "count"));
  EXPECT_TRUE(Contains(error_of([&] { f.find_int("name"); }), "name"));
  EXPECT_TRUE(Contains(error_of([&] { f.get_int("huge"); }), "huge"));
  EXPECT_TRUE(Contains(error_of([&] { f.get_string("nope"); }), o.path));
}

TEST(GgufFile, F32IsZeroCopyAndOthersAreDequantised) {
  Opened o(small_file());
  const TensorInfo* f32 = o.file.find("blk.f");
  ASSERT_NE(f32, nullptr);
  EXPECT_EQ(f32->ne, (std::vector<int64_t>{4, 2}));
  EXPECT_EQ(f32->shape(), (Shape{2, 4}));
  EXPECT_EQ(f32->nbytes, 32u);
  Tensor t = o.file.load_f32(*f32);
  EXPECT_EQ(t.data<float>(), reinterpret_cast<const float*>(o.file.data(*f32)));
  EXPECT_EQ(t.shape(), (Shape{2, 4}));
  EXPECT_EQ(t.data<float>()[5], 6.0f);

  const TensorInfo* q = o.file.find("blk.q");
  ASSERT_NE(q, nullptr);
  Tensor tq = o.file.load_f32(*q);
  EXPECT_NE(static_cast<const void*>(tq.data<float>()), static_cast<const void*>(o.file.data(*q)));
  EXPECT_EQ(tq.shape(), (Shape{64}));
  EXPECT_EQ(o.file.find("absent"), nullptr);
}

TEST(GgufFile, HonoursAlignment) {
  // Alignment 1 leaves the F32 data at offsets that are not float-aligned, which load_f32 must copy.
  for (uint32_t alignment : {1u, 8u, 64u}) {
    SCOPED_TRACE(alignment);
    Writer w;
    w.set_u32("general.alignment", alignment);
    w.add_f32_tensor("a", {3}, {1, 2, 3});
    w.add_f32_tensor("b", {5}, {4, 5, 6, 7, 8});
    Opened o(w.bytes());
    bool copied = false;
    for (const TensorInfo& t : o.file.tensors()) {
      EXPECT_EQ(t.offset % alignment, 0u) << t.name;
      Tensor x = o.file.load_f32(t);
      EXPECT_EQ(x.data<float>()[2], t.name == "a" ? 3.0f : 6.0f);
      copied |= x.data<float>() != reinterpret_cast<const float*>(o.file.data(t));
    }
    EXPECT_EQ(copied, alignment == 1);
  }
}

TEST(GgufFile, UnsupportedTypeOpensButDoesNotLoad) {
  Writer w;
  w.add_tensor("blk.0.ffn_down.weight", GGMLType::Q2_K, {256, 2}, std::vector<uint8_t>(2 * 84));
  w.add_tensor("blk.0.attn_q.weight", GGMLType::Q5_0, {32}, std::vector<uint8_t>(22));
  Opened o(w.bytes());
  ASSERT_EQ(o.file.tensors().size(), 2u);
  EXPECT_EQ(o.file.tensors()[0].nbytes, 168u);
  EXPECT_TRUE(Contains(error_of([&] { o.file.load_f32(o.file.tensors()[0]); }),
                       "unsupported quantisation type Q2_K for tensor blk.0.ffn_down.weight"));
  EXPECT_TRUE(Contains(error_of([&] { o.file.load_f32(o.file.tensors()[1]); }),
                       "unsupported quantisation type Q5_0 for tensor blk.0.attn_q.weight"));
}

TEST(GgufFile, WriterRejectsBadInput) {
  Writer w;
  EXPECT_TRUE(
      Contains(error_of([&] { w.add_tensor("t", GGMLType::Q8_0, {32}, std::vector<uint8_t>(33)); }), "33 bytes"));
  EXPECT_TRUE(Contains(error_of([&] { w.write("/nonexistent-dir/x.gguf"); }), "/nonexistent-dir/x.gguf"));
}

TEST(GgufShared, Stories260K) {
  const File f = File::open(shared_path("models/stories260K/stories260K.gguf"));
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.tensors().size(), 47u);
  EXPECT_EQ(f.get_string("general.architecture"), "llama");
  EXPECT_EQ(f.get_int("llama.embedding_length"), 64);
  ASSERT_TRUE(f.metadata().at("tokenizer.ggml.tokens").is_array());
  EXPECT_EQ(f.metadata().at("tokenizer.ggml.tokens").size(), 512u);
  const TensorInfo* emb = f.find("token_embd.weight");
  ASSERT_NE(emb, nullptr);
  EXPECT_EQ(emb->shape(), (Shape{512, 64}));
  for (const TensorInfo& t : f.tensors()) {
    Tensor x = f.load_f32(t);
    for (int64_t i = 0; i < x.numel(); ++i) ASSERT_TRUE(std::isfinite(x.data<float>()[i])) << t.name << " " << i;
  }
}

TEST(GgufMalformed, EveryTruncationIsAnError) {
  const std::vector<uint8_t> good = small_file();
  Opened o(good);  // the whole file is fine
  for (size_t cut = 0; cut < good.size(); ++cut) {
    SCOPED_TRACE(cut);
    EXPECT_FALSE(open_error({good.begin(), good.begin() + cut}).empty());
  }
  EXPECT_TRUE(Contains(open_error({}), "truncated reading magic at offset 0"));
  EXPECT_TRUE(Contains(open_error({good.begin(), good.begin() + 24}), "more than the file can hold"));
  const size_t f_dims = tensor_info(good, "blk.f");
  EXPECT_TRUE(Contains(open_error({good.begin(), good.begin() + f_dims + 6}), "truncated reading blk.f at offset"));
  EXPECT_TRUE(Contains(open_error({good.begin(), good.end() - 1}), "tensor blk.f data"));
}

// Random damage to the header and tensor infos: every outcome is a clean open (whose tensors then load) or
// a polar::Error; any other exception fails the test, and the sanitizer build catches bad memory accesses.
TEST(GgufMalformed, RandomCorruptionIsCaughtOrHarmless) {
  const std::vector<uint8_t> good = small_file();
  const size_t header_end = tensor_info(good, "blk.f") + kFOffsetField + 8;
  std::mt19937 rng(99);
  TempDir dir;
  const std::string path = dir.path("damaged.gguf");
  for (int iter = 0; iter < 500; ++iter) {
    std::vector<uint8_t> f = good;
    for (int k = 1 + static_cast<int>(rng() % 4); k > 0; --k) f[rng() % header_end] = static_cast<uint8_t>(rng());
    write_bytes(path, f);
    try {
      const File file = File::open(path);
      for (const TensorInfo& t : file.tensors())
        if (type_supported(t.type)) file.load_f32(t);
    } catch (const polar::Error&) {
    }
  }
}

TEST(GgufMalformed, HeaderErrors) {
  std::vector<uint8_t> f = small_file();
  f[3] = 'X';
  EXPECT_TRUE(Contains(open_error(f), "not a GGUF file (bad magic)"));

  f = small_file();
  patch<uint32_t>(f, 4, 1);
  EXPECT_TRUE(Contains(open_error(f), "unsupported GGUF version 1"));
  patch<uint32_t>(f, 4, 0x03000000);
  EXPECT_TRUE(Contains(open_error(f), "big-endian"));

  EXPECT_TRUE(Contains(open_error(Raw().header(0, 1ull << 62).b), "more than the file can hold"));
  EXPECT_TRUE(Contains(open_error(Raw().header(~0ull, 0).b), "more than the file can hold"));
}

// Bounded work: counts and lengths are checked against the bytes left in the file before anything is
// allocated for them (under ASan an allocation of these sizes would abort the test instead of failing it).
TEST(GgufMalformed, HugeCountsAndLengthsAreRefusedBeforeAllocating) {
  constexpr uint64_t k2_40 = 1ull << 40, k2_60 = 1ull << 60;
  const std::vector<uint8_t> pad(64, 0);  // enough bytes left for one tensor info or metadata entry
  auto padded = [&](Raw r) {
    r.b.insert(r.b.end(), pad.begin(), pad.end());
    return r.b;
  };
  EXPECT_TRUE(Contains(open_error(padded(Raw().header(k2_40, 0))),
                       "header claims 0 metadata entries and 1099511627776 tensors, more than the file can hold"));
  EXPECT_TRUE(Contains(open_error(padded(Raw().header(0, k2_40))), "1099511627776 metadata entries"));
  EXPECT_TRUE(Contains(open_error(padded(Raw().header(0, 1).num(k2_60))),
                       "metadata key: string length 1152921504606846976 at offset 24 runs past the end"));
  EXPECT_TRUE(Contains(open_error(padded(Raw().header(0, 1).str("k").num(STRING).num(k2_60))),
                       "k: string length 1152921504606846976"));
  EXPECT_TRUE(Contains(open_error(padded(Raw().header(1, 0).num(k2_60))),
                       "tensor name: string length 1152921504606846976"));
  EXPECT_TRUE(Contains(open_error(padded(Raw().header(0, 1).str("arr").num(ARRAY).num(STRING).num(k2_40))),
                       "metadata key arr: array of 1099511627776 elements"));
  // A tensor of 2^40 elements (4 TiB of F32) in a small file.
  EXPECT_TRUE(Contains(open_error(padded(Raw().header(1, 0).str("t").num<uint32_t>(1).num(k2_40).num<uint32_t>(0))),
                       "tensor t (1099511627776 elements of F32) is larger than the file"));
}

TEST(GgufMalformed, MetadataErrors) {
  // String lengths past the end: in a key and in a value.
  EXPECT_TRUE(Contains(open_error(Raw().header(0, 1).num<uint64_t>(1ull << 62).num<uint64_t>(0).b),
                       "string length 4611686018427387904"));
  EXPECT_TRUE(Contains(open_error(Raw().header(0, 1).str("k").num(STRING).num<uint64_t>(1000).num<uint32_t>(0).b),
                       "k: string length 1000"));
  // An array count no file this size could hold is refused before anything is allocated.
  EXPECT_TRUE(Contains(open_error(Raw().header(0, 1).str("arr").num(ARRAY).num(U32).num<uint64_t>(1ull << 60).b),
                       "metadata key arr: array of 1152921504606846976 elements"));
  EXPECT_TRUE(Contains(open_error(Raw().header(0, 1).str("arr").num(ARRAY).num(STRING).num<uint64_t>(3).str("a").b),
                       "runs past the end"));
  EXPECT_TRUE(Contains(open_error(Raw().header(0, 1).str("k").num<uint32_t>(13).num<uint64_t>(0).b),
                       "metadata key k: unknown value type 13"));
  EXPECT_TRUE(Contains(open_error(Raw().header(0, 1).str("k").num(ARRAY).num<uint32_t>(99).num<uint64_t>(0).b),
                       "unknown array element type 99"));
  EXPECT_TRUE(Contains(open_error(Raw().header(0, 1).str("k").num(BOOL).num<uint8_t>(2).b), "invalid bool value 2"));

  Raw deep;
  deep.header(0, 1).str("deep").num(ARRAY);
  for (int i = 0; i < 100; ++i) deep.num(ARRAY).num<uint64_t>(1);
  deep.num(U8).num<uint64_t>(0);
  EXPECT_TRUE(Contains(open_error(deep.b), "nested deeper"));

  Writer dup;
  dup.set_u32("k", 1);
  dup.set_string("k", "again");
  EXPECT_TRUE(Contains(open_error(dup.bytes()), "duplicate metadata key k"));

  EXPECT_TRUE(Contains(open_error(Raw().header(0, 1).str("general.alignment").num(U32).num<uint32_t>(24).b),
                       "general.alignment must be a power of two, got 24"));
  EXPECT_TRUE(Contains(open_error(Raw().header(0, 1).str("general.alignment").num(STRING).str("32").b),
                       "general.alignment must be a power of two"));
}

// Model dimensions and token ids from metadata are bounded before the loader multiplies or narrows them: a
// head count of 2^40 times a head dim of 2^40 would overflow int64 on the way to the tensor shape checks, and
// a token id of 2^32 + 5 would be narrowed to token 5.
TEST(GgufMalformed, AbsurdDimensionsAndTokenIdsAreRefused) {
  TempDir tmp;
  // The config of a valid small llama file with one integer key set to `value` (added, or replacing the base's).
  auto config_error = [&](const std::string& key, int64_t value) -> std::string {
    std::map<std::string, int64_t> ints = {{"llama.embedding_length", 64}, {"llama.block_count", 1},
                                           {"llama.attention.head_count", 4}, {"llama.feed_forward_length", 128},
                                           {"llama.context_length", 256}, {"llama.vocab_size", 32}};
    if (!key.empty()) ints[key] = value;
    Writer w;
    w.set_string("general.architecture", "llama");
    w.set_f32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
    for (const auto& [k, v] : ints) v < 0 ? w.set_i32(k, static_cast<int32_t>(v)) : w.set_u64(k, static_cast<uint64_t>(v));
    const std::string path = tmp.path("m.gguf");
    w.write(path);
    try {
      load_checkpoint_metadata(path);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_EQ(config_error("", 0), "") << "the valid base file";
  EXPECT_TRUE(Contains(config_error("llama.attention.head_count", int64_t(1) << 40),
                       "metadata llama.attention.head_count must be in [1, 16777216], got 1099511627776"));
  EXPECT_TRUE(Contains(config_error("llama.attention.key_length", int64_t(1) << 40),
                       "llama.attention.key_length must be in [1, 16777216]"));
  EXPECT_TRUE(Contains(config_error("llama.context_length", int64_t(1) << 31), "llama.context_length must be in [1, 2147483647]"));
  EXPECT_TRUE(Contains(config_error("llama.vocab_size", int64_t(1) << 40), "llama.vocab_size must be in [1, 16777216]"));
  EXPECT_TRUE(Contains(config_error("tokenizer.ggml.bos_token_id", (int64_t(1) << 32) + 5),
                       "metadata tokenizer.ggml.bos_token_id = 4294967301 is not a token id"));
  EXPECT_TRUE(Contains(config_error("tokenizer.ggml.eos_token_id", -2), "tokenizer.ggml.eos_token_id = -2 is not a token id"));
  EXPECT_EQ(config_error("tokenizer.ggml.eos_token_id", 31), "") << "an id in range";
}

TEST(GgufMalformed, TensorInfoErrors) {
  const std::vector<uint8_t> good = small_file();
  const size_t f_info = tensor_info(good, "blk.f"), q_info = tensor_info(good, "blk.q");
  const auto with = [&](auto edit) {
    std::vector<uint8_t> f = good;
    edit(f);
    return open_error(f);
  };
  EXPECT_TRUE(Contains(with([&](auto& f) { patch<uint32_t>(f, f_info, 0); }), "tensor blk.f has 0 dimensions"));
  EXPECT_TRUE(Contains(with([&](auto& f) { patch<uint32_t>(f, f_info, 5); }), "tensor blk.f has 5 dimensions"));
  EXPECT_TRUE(
      Contains(with([&](auto& f) { patch<int64_t>(f, f_info + 4, 0); }), "tensor blk.f has dimension 0 of length 0"));
  EXPECT_TRUE(Contains(with([&](auto& f) { patch<int64_t>(f, f_info + 12, -4); }),
                       "tensor blk.f has dimension 1 of length -4"));
  EXPECT_TRUE(Contains(with([&](auto& f) {
                         patch<int64_t>(f, f_info + 4, int64_t{1} << 40);
                         patch<int64_t>(f, f_info + 12, int64_t{1} << 40);
                       }),
                       "tensor blk.f: element count overflows"));
  EXPECT_TRUE(Contains(with([&](auto& f) { patch<int64_t>(f, f_info + 4, int64_t{1} << 40); }),
                       "tensor blk.f (2199023255552 elements of F32) is larger than the file"));
  EXPECT_TRUE(Contains(with([&](auto& f) { patch<uint32_t>(f, f_info + kFTypeField, 99); }),
                       "tensor blk.f has unknown ggml type 99"));
  EXPECT_TRUE(Contains(with([&](auto& f) { patch<int64_t>(f, q_info + 4, 48); }),
                       "tensor blk.q of type Q8_0 has row length 48, not a multiple of the block size 32"));
  EXPECT_TRUE(Contains(with([&](auto& f) { patch<uint64_t>(f, f_info + kFOffsetField, 100); }),
                       "tensor blk.f offset 100 is not a multiple of the alignment 32"));
  EXPECT_TRUE(Contains(with([&](auto& f) { patch<uint64_t>(f, f_info + kFOffsetField, 1024); }),
                       "tensor blk.f data (32 bytes at offset 1024"));
  EXPECT_TRUE(Contains(with([&](auto& f) { patch<uint64_t>(f, f_info + kFOffsetField, ~0ull << 5); }),
                       "runs past the end of the file"));
  EXPECT_TRUE(Contains(with([&](auto& f) { patch<uint64_t>(f, f_info + kFOffsetField, 64); }), "tensors blk.q (bytes"));
  EXPECT_TRUE(Contains(with([&](auto& f) { patch<uint64_t>(f, f_info + kFOffsetField, 0); }), "overlap"));

  Writer dup;
  dup.add_f32_tensor("w", {1}, {1});
  dup.add_f32_tensor("w", {1}, {2});
  EXPECT_TRUE(Contains(open_error(dup.bytes()), "duplicate tensor name w"));
}
