// safetensors: round trips through write/open, exact fp16/bf16 -> fp32 conversion, and every kind of
// malformed file giving a polar::Error that names the file and the problem (never a crash).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "core/half.h"
#include "io/safetensors.h"
#include "test_util.h"

using namespace polar;
using ::testing::HasSubstr;
using test::TempDir;

namespace {

// A host tensor whose bytes are a position-dependent pattern, so any misplaced byte shows.
Tensor patterned(DType dtype, Shape shape, uint8_t salt) {
  Tensor t = Tensor::empty(dtype, std::move(shape));
  auto* p = static_cast<uint8_t*>(t.raw());
  for (size_t i = 0; i < t.nbytes(); ++i) p[i] = static_cast<uint8_t>(i * 31 + salt);
  return t;
}

std::vector<uint8_t> bytes_of(const Tensor& t) {
  auto* p = static_cast<const uint8_t*>(t.raw());
  return {p, p + t.nbytes()};
}

// A file image: u64 header length, the header text as given, then `data_bytes` zero bytes.
std::vector<uint8_t> file_image(const std::string& header, size_t data_bytes, uint64_t header_len) {
  std::vector<uint8_t> out(8 + header.size() + data_bytes, 0);
  std::memcpy(out.data(), &header_len, 8);
  std::memcpy(out.data() + 8, header.data(), header.size());
  return out;
}
std::vector<uint8_t> file_image(const std::string& header, size_t data_bytes = 0) {
  return file_image(header, data_bytes, header.size());
}

// Opens bytes written to a temp file; returns the polar::Error message, or "" if the file opened.
std::string open_error(const std::vector<uint8_t>& bytes, const std::string& path) {
  test::write_bytes(path, bytes);
  try {
    safetensors::File::open(path);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Safetensors, RoundTripsEveryDtypeWithMetadata) {
  TempDir tmp;
  const std::string path = tmp.path("t.safetensors");
  // Odd sizes (3 x 5 f16 = 30 bytes) put later tensors at offsets that are not multiples of their size.
  std::vector<std::pair<std::string, Tensor>> tensors = {
      {"a.f32", patterned(DType::F32, {2, 3}, 1)},  {"b.f16", patterned(DType::F16, {3, 5}, 2)},
      {"c.bf16", patterned(DType::BF16, {7}, 3)},   {"d.i32", patterned(DType::I32, {1, 2, 3}, 4)},
      {"e.i64", patterned(DType::I64, {4}, 5)},     {"f.scalar", patterned(DType::F32, {}, 6)},
      {"g.empty", patterned(DType::F32, {0, 4}, 7)},
  };
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "h\u00e9llo \"quoted\""}};
  safetensors::write(path, tensors, meta);

  safetensors::File f = safetensors::File::open(path);
  EXPECT_EQ(f.metadata(), meta);
  ASSERT_EQ(f.tensors().size(), tensors.size());
  for (auto& [name, t] : tensors) {
    const safetensors::TensorInfo* info = f.find(name);
    ASSERT_NE(info, nullptr) << name;
    EXPECT_EQ(info->dtype, t.dtype()) << name;
    EXPECT_EQ(info->shape, t.shape()) << name;
    EXPECT_EQ(info->nbytes, t.nbytes()) << name;
    Tensor v = f.view(*info);
    EXPECT_EQ(v.shape(), t.shape()) << name;
    EXPECT_EQ(bytes_of(v), bytes_of(t)) << name;
  }
  EXPECT_EQ(f.find("missing"), nullptr);
}

TEST(Safetensors, WritesNoMetadataKeyWhenThereIsNone) {
  TempDir tmp;
  const std::string path = tmp.path("t.safetensors");
  safetensors::write(path, {{"x", patterned(DType::F32, {2}, 0)}});
  safetensors::File f = safetensors::File::open(path);
  EXPECT_TRUE(f.metadata().empty());
  ASSERT_EQ(f.tensors().size(), 1u);
  EXPECT_EQ(f.tensors()[0].name, "x");
}

// Values exactly representable in each half format (normals, subnormals, extremes, signed zero, inf): the
// conversion to fp32 must reproduce them bit for bit.
TEST(Safetensors, LoadF32ConvertsHalfFormatsExactly) {
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> f16_values = {0.0f, -0.0f, 1.0f, -2.5f, 0.099975586f, 65504.0f, -65504.0f,
                                         std::ldexp(1.0f, -24), std::ldexp(1.0f, -14), 1.0009765625f, inf, -inf};
  const std::vector<float> bf16_values = {0.0f, -0.0f, 1.0f, -2.5f, std::ldexp(255.0f, 120), std::ldexp(1.0f, -133),
                                          1.0078125f, -std::ldexp(51.0f, -9), inf, -inf};
  struct Case {
    DType dtype;
    const std::vector<float>* values;
    uint16_t (*encode)(float);
  };
  for (const Case& c : {Case{DType::F16, &f16_values, f32_to_f16}, Case{DType::BF16, &bf16_values, f32_to_bf16}}) {
    SCOPED_TRACE(dtype_name(c.dtype));
    const int64_t n = static_cast<int64_t>(c.values->size());
    Tensor t = Tensor::empty(c.dtype, {n});
    for (int64_t i = 0; i < n; ++i) {
      t.data<uint16_t>()[i] = c.encode((*c.values)[i]);
      // Guard the test itself: each value must survive the format.
      ASSERT_EQ(c.dtype == DType::F16 ? f16_to_f32(t.data<uint16_t>()[i]) : bf16_to_f32(t.data<uint16_t>()[i]),
                (*c.values)[i]);
    }
    TempDir tmp;
    const std::string path = tmp.path("h.safetensors");
    // A 1-byte U8 tensor first leaves the half tensor at an odd address: conversion must not assume alignment.
    safetensors::write(path, {{"a", patterned(DType::U8, {1}, 0)}, {"h", t}});
    safetensors::File f = safetensors::File::open(path);
    Tensor out = f.load_f32(*f.find("h"));
    ASSERT_EQ(out.dtype(), DType::F32);
    ASSERT_EQ(out.shape(), Shape{n});
    for (int64_t i = 0; i < n; ++i) {
      EXPECT_EQ(out.data<float>()[i], (*c.values)[i]) << i;
      EXPECT_EQ(std::signbit(out.data<float>()[i]), std::signbit((*c.values)[i])) << i;
    }
  }
}

TEST(Safetensors, LoadF32OfMisalignedF32CopiesTheValues) {
  TempDir tmp;
  const std::string path = tmp.path("m.safetensors");
  Tensor x = Tensor::empty(DType::F32, {5});
  for (int i = 0; i < 5; ++i) x.data<float>()[i] = 0.25f * i - 1.0f;
  safetensors::write(path, {{"a", patterned(DType::U8, {3}, 0)}, {"x", x}});
  safetensors::File f = safetensors::File::open(path);
  Tensor out = f.load_f32(*f.find("x"));
  ASSERT_EQ(reinterpret_cast<uintptr_t>(out.raw()) % alignof(float), 0u);
  EXPECT_EQ(bytes_of(out), bytes_of(x));
}

TEST(Safetensors, LoadF32RejectsIntegerTensors) {
  TempDir tmp;
  const std::string path = tmp.path("i.safetensors");
  safetensors::write(path, {{"ids", patterned(DType::I64, {3}, 0)}});
  safetensors::File f = safetensors::File::open(path);
  try {
    f.load_f32(*f.find("ids"));
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("'ids'"));
  }
}

// ---- Malformed files: one table, each case an exact file image and what its error must say.

struct BadFile {
  std::string name;
  std::vector<uint8_t> bytes;
  std::string expect;  // substring of the error message
};

void PrintTo(const BadFile& b, std::ostream* os) { *os << b.name; }

const std::string kTensorA = R"("a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]})";

std::vector<BadFile> bad_files() {
  auto one = [](const std::string& entry) { return "{" + entry + "}"; };
  return {
      {"Empty", {}, "only 0 bytes"},
      {"ShorterThanHeaderLength", {1, 0, 0, 0, 0}, "only 5 bytes"},
      {"HeaderLengthPastEnd", file_image("{}", 0, 1000), "runs past the end of the file"},
      {"HugeHeaderLength", file_image("{}", 0, std::numeric_limits<uint64_t>::max()), "implausibly large"},
      // Bounded work: a header length or a tensor size the file cannot hold is refused before anything is read
      // or allocated for it.
      {"HeaderLength2To60", file_image("{}", 0, 1ull << 60), "header length 1152921504606846976 is implausibly large"},
      {"Tensor2To40Elements",
       file_image(one(R"("a": {"dtype": "F32", "shape": [1099511627776], "data_offsets": [0, 16]})"), 16),
       "'a' has shape [1099511627776] (f32) but 16 bytes of data"},
      {"DeeplyNestedHeader", file_image(R"({"a": )" + std::string(200, '[') + std::string(200, ']') + "}"),
       "nested deeper than 128 levels"},
      {"HeaderLengthJustPastEnd", file_image(one(kTensorA), 16, one(kTensorA).size() + 17), "runs past the end"},
      {"MalformedJson", file_image(R"({"a": {"dtype": "F32", )"), "malformed safetensors header"},
      {"HeaderNotObject", file_image("[1, 2, 3]"), "not a JSON object"},
      {"EntryNotObject", file_image(R"({"a": 5})"), "'a' lacks dtype, shape or data_offsets"},
      {"MissingOffsets", file_image(R"({"a": {"dtype": "F32", "shape": [1]}})", 4), "'a' lacks dtype"},
      {"UnknownDtype", file_image(one(R"("a": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]})"), 4),
       "unsupported dtype F8_E4M3"},
      {"DtypeNotString", file_image(one(R"("a": {"dtype": 1, "shape": [4], "data_offsets": [0, 4]})"), 4),
       "'a' has a malformed entry"},
      {"ShapeByteCountMismatch", file_image(one(R"("a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]})"), 20),
       "'a' has shape [2, 3] (f32) but 20 bytes of data"},
      {"NegativeDim", file_image(one(R"("a": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]})"), 16),
       "'a' has a non-integer or negative dimension"},
      {"FractionalDim", file_image(one(R"("a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]})"), 4),
       "non-integer or negative dimension"},
      {"ShapeOverflow",
       file_image(one(R"("a": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]})")),
       "'a' shape overflows"},
      {"OffsetsPastEnd", file_image(one(kTensorA), 12), "'a' data [0, 16) lies outside the data section (12 bytes)"},
      {"OffsetsReversed", file_image(one(R"("a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]})"), 8),
       "lies outside the data section"},
      {"NegativeOffset", file_image(one(R"("a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]})"), 4),
       "'a' has invalid data_offsets"},
      {"OneOffset", file_image(one(R"("a": {"dtype": "F32", "shape": [1], "data_offsets": [0]})"), 4),
       "'a' has a malformed entry"},
      {"OverlappingTensors",
       file_image(one(kTensorA + R"(, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]})"), 16),
       "tensors 'a' and 'b' overlap"},
      // An empty tensor sorted between two overlapping ones must not hide the overlap.
      {"OverlapAcrossEmptyTensor",
       file_image(one(R"("a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},)"
                      R"("b": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]},)"
                      R"("c": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]})"),
                  16),
       "tensors 'a' and 'c' overlap"},
      {"MetadataNotObject", file_image(R"({"__metadata__": "x"})"), "__metadata__ is not an object"},
      {"MetadataValueNotString", file_image(R"({"__metadata__": {"k": 1}})"), "metadata value for 'k' is not a string"},
  };
}

class SafetensorsBadFile : public ::testing::TestWithParam<BadFile> {};

TEST_P(SafetensorsBadFile, GivesErrorNamingFileAndProblem) {
  TempDir tmp;
  const std::string path = tmp.path("bad.safetensors");
  const std::string msg = open_error(GetParam().bytes, path);
  ASSERT_NE(msg, "") << "opened without error";
  EXPECT_THAT(msg, HasSubstr(path));
  EXPECT_THAT(msg, HasSubstr(GetParam().expect));
}

INSTANTIATE_TEST_SUITE_P(Safetensors, SafetensorsBadFile, ::testing::ValuesIn(bad_files()),
                         [](const auto& info) { return info.param.name; });

// The images above are exact; make sure the well-formed variants of them do open, so each bad case fails
// for the stated reason and not for a mistake in how the image was built.
TEST(Safetensors, WellFormedHandBuiltImagesOpen) {
  TempDir tmp;
  const std::string path = tmp.path("ok.safetensors");
  EXPECT_EQ(open_error(file_image("{" + kTensorA + "}", 16), path), "");
  EXPECT_EQ(open_error(file_image("{}"), path), "");
  EXPECT_EQ(open_error(file_image("{" + kTensorA + R"(, "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]})" +
                                      R"(, "__metadata__": {"k": "v"}})",
                                  24),
                       path),
            "");
}

TEST(Safetensors, MissingFileNamesThePath) {
  TempDir tmp;
  const std::string path = tmp.path("does-not-exist.safetensors");
  try {
    safetensors::File::open(path);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(path));
  }
}

// A valid file cut at every length short of its full size (header length field, header, every byte of the
// data section) must be rejected with an Error; reading past the end of the mapping would be a crash or,
// under ASan, a report.
TEST(Safetensors, EveryTruncationIsAnError) {
  TempDir tmp;
  const std::string full = tmp.path("full.safetensors"), cut = tmp.path("cut.safetensors");
  safetensors::write(full, {{"w", patterned(DType::F32, {3, 4}, 1)}, {"b", patterned(DType::BF16, {5}, 2)},
                            {"i", patterned(DType::I64, {2}, 3)}},
                     {{"k", "v"}});
  const std::vector<uint8_t> bytes = test::read_bytes(full);
  ASSERT_GT(bytes.size(), 100u);
  ASSERT_EQ(open_error(bytes, cut), "");
  for (size_t n = 0; n < bytes.size(); ++n) {
    const std::string msg = open_error(std::vector<uint8_t>(bytes.begin(), bytes.begin() + n), cut);
    ASSERT_NE(msg, "") << "a file cut to " << n << " of " << bytes.size() << " bytes opened";
    ASSERT_THAT(msg, HasSubstr(cut)) << n;
  }
}

}  // namespace
