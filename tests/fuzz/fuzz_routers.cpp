// Router files (a safetensors file with "polar.routers" metadata): read on their own (read_routers, as
// `polar routers --show` does) and against a small model (load_routers), then written back out as metadata.
#include <cstdint>
#include <string>

#include "core/error.h"
#include "fuzz_util.h"
#include "io/model_config.h"
#include "sparse/routers.h"
#include "router_models.h"

using namespace polar;

namespace {

void use(const Routers& r) {
  routers_metadata(r).dump();
  has_head_shares(r);
  if (r.mlp_k)
    for (int64_t l = 0; l < static_cast<int64_t>(r.mlp_k->k.size()); ++l) r.mlp_k->k_for(l, 3);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::write_file("model.routers.safetensors", fuzz::as_text(data, size));
  try {
    use(read_routers(path));
  } catch (const Error&) {
  }
  for (bool relu : {true, false}) try {
      const Routers r = load_routers(path, fuzz::router_model(relu), "fuzz");
      use(r);
    } catch (const Error&) {
    }
  return 0;
}
