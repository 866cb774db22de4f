// The two models the router files of the seed corpus are made for (make_corpus.cpp) and that fuzz_routers
// loads them against: a ReLU (OPT) one with MLP routers, a gated (Llama) one without.
#pragma once
#include "io/model_config.h"

namespace polar::fuzz {

inline ModelConfig router_model(bool relu) {
  ModelConfig c;
  c.model_type = relu ? "opt" : "llama";
  c.gated_mlp = !relu;
  c.n_layers = 3;
  c.hidden = 8;
  c.n_heads = 4;
  c.n_kv_heads = relu ? 4 : 2;
  c.head_dim = 2;
  c.ffn = 16;
  return c;
}

}  // namespace polar::fuzz
