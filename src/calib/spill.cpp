#include "calib/spill.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include <fmt/format.h>

#include "core/half.h"
#include "runtime/engine.h"

namespace polar::calib {

namespace {

// Tokens per collection step: enough to keep the GEMMs efficient, small enough that the step's
// activations and probe copies (a few [T, ffn] fp32 arrays) stay modest for any model.
constexpr int64_t kStepTokens = 2048;
// Writes are buffered this much per file; a collection has up to 3 files per layer open at once.
constexpr size_t kWriteBuffer = size_t(1) << 20;

int64_t row_bytes(const SpillDims& d, SpillKind kind) {
  switch (kind) {
    case SpillKind::Inputs: return 2 * d.hidden;
    case SpillKind::Norms: return 4 * d.heads;
    case SpillKind::Active: return d.mask_bytes();
  }
  fail("unknown spill kind");
}

bool layer_has(const SpillDims& d, SpillKind kind, int64_t layer) {
  switch (kind) {
    case SpillKind::Inputs: return d.has_inputs(layer);
    case SpillKind::Norms: return d.has_norms(layer);
    case SpillKind::Active: return d.mlp;
  }
  fail("unknown spill kind");
}

constexpr SpillKind kKinds[] = {SpillKind::Inputs, SpillKind::Norms, SpillKind::Active};

// One spill file, appended sequentially.
class SpillWriter {
 public:
  explicit SpillWriter(std::string path) : path_(std::move(path)), f_(std::fopen(path_.c_str(), "wb")) {
    if (!f_) fail("cannot create work file {}: {}", path_, std::strerror(errno));
    std::setvbuf(f_, nullptr, _IOFBF, kWriteBuffer);
  }
  SpillWriter(const SpillWriter&) = delete;
  SpillWriter& operator=(const SpillWriter&) = delete;
  ~SpillWriter() {
    if (f_) std::fclose(f_);
  }
  void write(const void* data, size_t n) {
    if (std::fwrite(data, 1, n, f_) != n) fail("error writing work file {}: {}", path_, std::strerror(errno));
  }
  void close() {
    const int rc = std::fclose(f_);
    f_ = nullptr;
    if (rc != 0) fail("error writing work file {}: {}", path_, std::strerror(errno));
  }

 private:
  std::string path_;
  std::FILE* f_;
};

// The probe of a collection: every array it is shown goes straight to its layer's file.
class Collector final : public Probe {
 public:
  Collector(const std::string& dir, const SpillDims& dims) : dims_(dims) {
    for (int64_t l = 0; l < dims.layers; ++l)
      for (SpillKind kind : kKinds) {
        auto& w = writers_[static_cast<size_t>(kind)];
        w.push_back(layer_has(dims, kind, l) ? std::make_unique<SpillWriter>(spill_path(dir, kind, l)) : nullptr);
      }
  }

  void attn_in(int layer, const Tensor& x) override {
    auto& w = writer(SpillKind::Inputs, layer);
    if (!w) return;
    const float* p = x.data<float>();
    half_.resize(static_cast<size_t>(x.numel()));
    for (size_t i = 0; i < half_.size(); ++i) {
      half_[i] = f32_to_f16(p[i]);
      // Exponent all ones: the value overflowed fp16 (or was not finite to begin with).
      if ((half_[i] & 0x7c00u) == 0x7c00u)
        fail("layer {}: a router input of {} is outside fp16's range, in which collection stores router inputs",
             layer, p[i]);
    }
    w->write(half_.data(), half_.size() * sizeof(uint16_t));
  }

  void head_norms(int layer, const Tensor& n) override {
    auto& w = writer(SpillKind::Norms, layer);
    if (w) w->write(n.raw(), n.nbytes());
  }

  void mlp_act(int layer, const Tensor& a) override {
    auto& w = writer(SpillKind::Active, layer);
    if (!w) return;
    const int64_t T = a.dim(0), D = a.dim(1), bytes = dims_.mask_bytes();
    bits_.assign(static_cast<size_t>(T * bytes), 0);
    for (int64_t t = 0; t < T; ++t) {
      const float* row = a.data<float>() + t * D;
      uint8_t* mask = bits_.data() + t * bytes;
      for (int64_t j = 0; j < D; ++j)
        if (row[j] > 0) mask[j / 8] |= static_cast<uint8_t>(1u << (j % 8));
    }
    w->write(bits_.data(), bits_.size());
  }

  void close() {
    for (auto& kind : writers_)
      for (auto& w : kind)
        if (w) w->close();
  }

 private:
  std::unique_ptr<SpillWriter>& writer(SpillKind kind, int layer) {
    return writers_[static_cast<size_t>(kind)][static_cast<size_t>(layer)];
  }
  SpillDims dims_;
  std::vector<std::unique_ptr<SpillWriter>> writers_[std::size(kKinds)];  // [kind][layer], null: no such file
  std::vector<uint16_t> half_;
  std::vector<uint8_t> bits_;
};

std::shared_ptr<MappedFile> map_spill(const std::string& dir, const SpillDims& dims, SpillKind kind, int64_t layer,
                                      int64_t tokens) {
  if (!layer_has(dims, kind, layer)) return nullptr;
  const std::string path = spill_path(dir, kind, layer);
  std::shared_ptr<MappedFile> f = MappedFile::open(path);
  const int64_t expected = tokens * row_bytes(dims, kind);
  check(static_cast<int64_t>(f->size()) == expected,
        "work file {} holds {} bytes, but {} tokens need {}: the collection is incomplete", path, f->size(), tokens,
        expected);
  return f;
}

}  // namespace

SpillDims SpillDims::of(const ModelConfig& c) {
  return {c.n_layers, c.hidden, c.n_heads, c.n_kv_heads, c.ffn, !c.gated_mlp};
}

int64_t SpillDims::bytes_per_token() const {
  int64_t bytes = 0;
  for (int64_t l = 0; l < layers; ++l)
    for (SpillKind kind : kKinds)
      if (layer_has(*this, kind, l)) bytes += row_bytes(*this, kind);
  return bytes;
}

std::string spill_path(const std::string& dir, SpillKind kind, int64_t layer) {
  static constexpr const char* kPatterns[] = {"attn_in.{}.f16", "head_norms.{}.f32", "mlp_act.{}.bits"};
  return (std::filesystem::path(dir) / fmt::format(fmt::runtime(kPatterns[static_cast<size_t>(kind)]), layer)).string();
}

std::vector<std::string> spill_files(const std::string& dir, const SpillDims& dims) {
  std::vector<std::string> out;
  std::error_code ec;
  for (int64_t l = 0; l < dims.layers; ++l)
    for (SpillKind kind : kKinds)
      if (layer_has(dims, kind, l) && std::filesystem::exists(spill_path(dir, kind, l), ec))
        out.push_back(spill_path(dir, kind, l));
  return out;
}

bool spill_complete(const std::string& dir, const SpillDims& dims, int64_t tokens) {
  std::error_code ec;
  for (int64_t l = 0; l < dims.layers; ++l)
    for (SpillKind kind : kKinds) {
      if (!layer_has(dims, kind, l)) continue;
      const auto size = std::filesystem::file_size(spill_path(dir, kind, l), ec);
      if (ec || static_cast<int64_t>(size) != tokens * row_bytes(dims, kind)) return false;
    }
  return true;
}

void collect(Model& model, const std::vector<std::vector<int32_t>>& sequences, const std::string& dir,
             const std::function<void(int64_t, int64_t)>& progress) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  check(!ec, "cannot create work directory {}: {}", dir, ec.message());
  int64_t total = 0;
  for (const auto& s : sequences) total += static_cast<int64_t>(s.size());
  Collector collector(dir, SpillDims::of(model.config()));
  constexpr int64_t kBlock = 16;  // Engine's default KV block: each sequence's cache rounds up to it
  int64_t done = 0;
  for (size_t first = 0; first < sequences.size();) {
    size_t last = first;
    int64_t step_tokens = 0, kv_tokens = 0;
    while (last < sequences.size() && (last == first || step_tokens + int64_t(sequences[last].size()) <= kStepTokens)) {
      step_tokens += static_cast<int64_t>(sequences[last].size());
      kv_tokens += static_cast<int64_t>(sequences[last].size()) + kBlock;
      ++last;
    }
    Engine engine(model, {.kv_tokens = kv_tokens, .block_size = kBlock});
    std::vector<SeqChunk> chunks;
    for (size_t s = first; s < last; ++s) chunks.push_back({engine.add_sequence(), sequences[s]});
    engine.forward(chunks, /*all_logits=*/false, &collector);
    done += step_tokens;
    if (progress) progress(done, total);
    first = last;
  }
  collector.close();
}

LayerSpill::LayerSpill(const std::string& dir, const SpillDims& dims, int64_t layer, int64_t tokens)
    : dims_(dims),
      tokens_(tokens),
      inputs_(map_spill(dir, dims, SpillKind::Inputs, layer, tokens)),
      norms_(map_spill(dir, dims, SpillKind::Norms, layer, tokens)),
      active_(map_spill(dir, dims, SpillKind::Active, layer, tokens)) {}

void LayerSpill::inputs(std::span<const int64_t> rows, float* out) const {
  check(inputs_ != nullptr, "this layer's router inputs were not collected (no router reads them)");
  const int64_t d = dims_.hidden;
  const auto* base = reinterpret_cast<const uint16_t*>(inputs_->bytes());
  for (size_t i = 0; i < rows.size(); ++i) {
    const uint16_t* src = base + rows[i] * d;
    for (int64_t j = 0; j < d; ++j) out[int64_t(i) * d + j] = f16_to_f32(src[j]);
  }
}

const float* LayerSpill::norms(int64_t row) const {
  check(norms_ != nullptr, "head norms are not collected on layer 0 (always dense)");
  return reinterpret_cast<const float*>(norms_->bytes()) + row * dims_.heads;
}

const uint8_t* LayerSpill::active(int64_t row) const {
  check(active_ != nullptr, "MLP activity is collected for ReLU MLPs only");
  return active_->bytes() + row * dims_.mask_bytes();
}

void LayerSpill::labels(std::span<const int64_t> rows, float* out) const {
  const int64_t D = dims_.ffn;
  for (size_t i = 0; i < rows.size(); ++i) {
    const uint8_t* mask = active(rows[i]);
    for (int64_t j = 0; j < D; ++j) out[int64_t(i) * D + j] = static_cast<float>((mask[j / 8] >> (j % 8)) & 1u);
  }
}

}  // namespace polar::calib
