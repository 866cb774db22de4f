// GGUF: header, metadata, tensor infos, the dequantisation of every tensor of a supported type, the typed
// metadata accessors, the GGUF-embedded tokenizer (loaded, then used) and the checkpoint loader on top
// (config_from_gguf, the tensor name mapping, the RoPE row permutation).
#include <cstdint>
#include <string>

#include "core/error.h"
#include "fuzz_util.h"
#include "io/checkpoint.h"
#include "io/gguf.h"
#include "io/tokenizer.h"

using namespace polar;

namespace {

void use_tokenizer(const Tokenizer& tok) {
  const std::vector<int32_t> ids = tok.encode("Hello world! <s></s> 12345 \xE2\x96\x81x\n\t \xFF\xC3", true);
  tok.decode(ids);
  StreamDecoder stream(tok, true);
  for (int32_t id : ids) stream.push(id);
  stream.flush();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::write_file("model.gguf", fuzz::as_text(data, size));
  try {
    const gguf::File f = gguf::File::open(path);
    for (const auto& [key, value] : f.metadata().items()) {
      // Each accessor either answers or refuses with a polar::Error.
      for (int kind = 0; kind < 4; ++kind) try {
          if (kind == 0) f.get_int(key);
          if (kind == 1) f.get_float(key);
          if (kind == 2) f.get_bool(key);
          if (kind == 3) f.get_string(key);
        } catch (const Error&) {
        }
    }
    for (const gguf::TensorInfo& t : f.tensors()) {
      fuzz::require(t.offset <= size && t.nbytes <= size - t.offset, "a GGUF tensor lies inside the file");
      fuzz::require(f.find(t.name) == &t, "every listed tensor can be found by name");
      if (!gguf::type_supported(t.type)) continue;
      const Tensor x = f.load_f32(t);
      float sum = 0;  // reads every element (F32 tensors are views of the mapping)
      for (int64_t i = 0; i < x.numel(); ++i) sum += x.data<float>()[i];
      (void)sum;
    }
    if (f.has("tokenizer.ggml.model")) try {
        use_tokenizer(*load_tokenizer(f));
      } catch (const Error&) {
      }
    const Checkpoint ck = load_checkpoint(path);
    if (ck.tokenizer) use_tokenizer(*ck.tokenizer);
    ck.config.describe();
  } catch (const Error&) {
  }
  return 0;
}
