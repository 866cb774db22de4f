#include "model/model.h"

#include <cmath>

namespace polar {

Tensor Model::load_weight(const Checkpoint& ck, const std::string& name, const Shape& shape) {
  Tensor t = backend_.upload(ck.get(name, shape), backend_.activation_dtype());
  weight_bytes_ += static_cast<int64_t>(t.nbytes());
  return t;
}

void Model::report_head_norms(Probe* probe, int layer, const Tensor& attn) const {
  Tensor a = backend_.to_host_f32(attn);
  const int64_t T = a.dim(0), H = a.dim(1), dh = a.dim(2);
  Tensor norms = Tensor::empty(DType::F32, {T, H});
  const float* pa = a.data<float>();
  for (int64_t i = 0; i < T * H; ++i) {
    double ss = 0;
    for (int64_t j = 0; j < dh; ++j) ss += double(pa[i * dh + j]) * pa[i * dh + j];
    norms.data<float>()[i] = static_cast<float>(std::sqrt(ss));
  }
  probe->head_norms(layer, norms);
}

std::unique_ptr<Model> make_model(const Checkpoint& ck, Backend& backend) {
  switch (ck.config.family) {
    case Family::OPT: return make_opt(ck, backend);
    case Family::Llama: return make_llama(ck, backend);
  }
  fail("unknown model family");
}

}  // namespace polar
