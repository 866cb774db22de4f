// Log-likelihood scoring of continuations: the building block of zero-shot evaluation. A request is a token
// sequence split into a context and a continuation; its score is the summed log-probability of the
// continuation's tokens, each given every token before it, and whether each was the greedy choice.
#pragma once
#include <cstdint>
#include <functional>
#include <string_view>
#include <vector>

#include "io/tokenizer.h"
#include "model/model.h"

namespace polar {

struct ScoreRequest {
  std::vector<int32_t> tokens;  // context then continuation
  // tokens[0, context_len) are the context, the rest are scored; 1 <= context_len < tokens.size(). Kept
  // per request so that a sparse scorer can run the context as a dense prefill and each continuation token
  // as its own decode step (with its own head selection), as serving would.
  int64_t context_len = 0;
  int64_t truncated = 0;  // context tokens dropped from the left to fit the model's context
};

// The request for `continuation` after `context`. Tokenization rule (lm-evaluation-harness's "encode the
// whole and split", made exact): the sequence is the tokenization of context + continuation as one text,
// with BOS when the model adds one by default; the context is the longest prefix of it that is also a prefix
// of the context's own tokenization. Usually that is the whole context's tokenization; where BPE merges
// across the boundary (or the context ends in whitespace that joins the continuation's first word) the
// tokens straddling the boundary are scored with the continuation, so every token holding a byte of the
// continuation is scored and the sequence fed is the one the tokenizer makes. Too long for the model's
// context (max_positions tokens): context tokens are dropped from the left, after BOS if there is one. A
// continuation that adds no tokens, one that fills the whole context, or an empty context without BOS (no
// token to predict the first from) is a polar::Error.
ScoreRequest make_request(const Tokenizer& tok, std::string_view context, std::string_view continuation,
                          int64_t max_positions);

struct Score {
  double logprob = 0;   // sum over the continuation's tokens of log p(token | all tokens before it)
  int64_t tokens = 0;   // continuation tokens scored
  bool greedy = true;   // every continuation token is its row's argmax (lowest index on ties)
};

struct ScoreOptions {
  int64_t batch = 16;  // requests per forward pass
  // A forward pass also stops taking requests when their logits (one fp32 row per continuation token,
  // copied to the host) would pass this many bytes; a request that alone passes it runs alone.
  int64_t max_logit_bytes = int64_t{1} << 30;
  // Sparse scoring with serving's semantics: the context runs as a dense prefill and each continuation
  // token as the sparse decode step that would process it (its own head selection and MLP neuron set), in
  // the same one pass (SeqChunk::sparse_from). sparse_context also sparsifies the context after its first
  // token (the paper's more pessimistic protocol). Null = dense.
  Sparsity* sparsity = nullptr;
  bool sparse_context = false;
};

// Scores the requests, batched: each forward pass runs up to options.batch requests as sequences of one
// engine step, every request whole (dense, or per ScoreOptions::sparsity), with the logits of every position; log-softmax in fp64 on the
// host. progress(done, total) is called after each forward pass. Results are in request order.
std::vector<Score> score(Model& model, const std::vector<ScoreRequest>& requests, const ScoreOptions& options,
                         const std::function<void(int64_t, int64_t)>& progress = {});

}  // namespace polar
