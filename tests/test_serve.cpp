// polar serve's HTTP layer (serve/server.h, serve/openai_api.h) in process on 127.0.0.1, over stories260K:
// completions whole and streamed equal generate(), chat through a fixture's template, the error statuses and
// bodies, auth, the queue bound, a client that disconnects mid-stream (its request cancelled, its blocks
// back), and a drain that lets a running request finish.
#ifdef POLAR_HAVE_SERVE
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <httplib.h>

#include <fstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "io/checkpoint.h"
#include "model/model.h"
#include "runtime/generate.h"
#include "bench/serve_bench.h"
#include "bench/shapes.h"
#include "serve/http_bench.h"
#include "serve/server.h"
#include "test_util.h"

using namespace polar;
using ::testing::HasSubstr;
using nlohmann::json;

namespace {

struct Stories {
  Checkpoint ck = load_checkpoint(test::shared_path("models/stories260K/stories260K.gguf"));
  std::unique_ptr<Backend> backend = make_cpu_backend();
  std::unique_ptr<Model> model = make_model(ck, *backend);
};

Stories& stories() {
  static Stories s;
  return s;
}

// A server on a free port over stories260K; `chat` adds the SmolLM2 fixture's chat template.
struct Running {
  std::optional<ChatTemplate> tmpl;
  serve::Server server;
  httplib::Client client;
  explicit Running(serve::ServerOptions o = {}, bool chat = false, int64_t max_seqs = 8)
      : server([&] {
          o.port = 0;
          return o;
        }()),
        client("127.0.0.1", server.port()) {
    Stories& s = stories();
    serve::ApiContext ctx;
    ctx.model_name = "stories";
    ctx.tokenizer = s.ck.tokenizer.get();
    if (chat) {
      std::ifstream f(test::shared_path("fixtures/chat/smollm2-instruct.json"));
      tmpl.emplace(json::parse(f)["template"].get<std::string>());
      ctx.chat_template = &*tmpl;
    }
    ctx.vocab_size = s.model->config().vocab_size;
    ctx.max_total_tokens = s.model->config().max_positions;
    server.serve(*s.model, {.max_seqs = max_seqs, .max_batch_tokens = 64, .kv_tokens = 4096, .tokenizer = ctx.tokenizer},
                 ctx);
    client.set_read_timeout(60, 0);
  }
  httplib::Result post(const std::string& path, const json& body, const httplib::Headers& headers = {}) {
    return client.Post(path.c_str(), headers, body.dump(), "application/json");
  }
};

std::string greedy_text(const std::string& prompt, int64_t n) {
  Stories& s = stories();
  GenerateOptions opt;
  opt.max_new_tokens = n;
  opt.tokenizer = s.ck.tokenizer.get();
  const auto ids = generate(*s.model, {s.ck.tokenizer->encode(prompt, true)}, opt);
  return s.ck.tokenizer->decode(ids[0]);
}

// The "data: " payloads of an SSE body, [DONE] last.
std::vector<std::string> sse_events(const std::string& body) {
  std::vector<std::string> out;
  size_t at = 0;
  while ((at = body.find("data: ", at)) != std::string::npos) {
    const size_t end = body.find("\n\n", at);
    out.push_back(body.substr(at + 6, end - at - 6));
    at = end;
  }
  return out;
}

bool wait_for(const std::function<bool()>& done, std::chrono::seconds limit = std::chrono::seconds(20)) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!done()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

}  // namespace

TEST(Serve, CompletionsWholeAndStreamedEqualGenerate) {
  Running r;
  const std::string want = greedy_text("Once upon a time", 24);
  auto whole = r.post("/v1/completions", {{"model", "stories"}, {"prompt", "Once upon a time"}, {"max_tokens", 24},
                                          {"temperature", 0}});
  ASSERT_TRUE(whole);
  ASSERT_EQ(whole->status, 200) << whole->body;
  const json j = json::parse(whole->body);
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["choices"][0]["text"], want);
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  EXPECT_TRUE(j["choices"][0]["logprobs"].is_null()) << "not asked for";
  EXPECT_EQ(j["usage"]["prompt_tokens"], 5);
  EXPECT_EQ(j["usage"]["completion_tokens"], 24);
  EXPECT_EQ(j["usage"]["total_tokens"], 29);

  auto streamed = r.post("/v1/completions", {{"prompt", "Once upon a time"}, {"max_tokens", 24}, {"temperature", 0},
                                             {"stream", true}, {"stream_options", {{"include_usage", true}}}});
  ASSERT_TRUE(streamed);
  ASSERT_EQ(streamed->status, 200);
  EXPECT_THAT(streamed->get_header_value("Content-Type"), HasSubstr("text/event-stream"));
  const auto events = sse_events(streamed->body);
  ASSERT_GE(events.size(), 3u);
  EXPECT_EQ(events.back(), "[DONE]");
  std::string text;
  for (size_t i = 0; i + 2 < events.size(); ++i) text += json::parse(events[i])["choices"][0]["text"].get<std::string>();
  EXPECT_EQ(text, want);
  EXPECT_EQ(json::parse(events[events.size() - 3])["choices"][0]["finish_reason"], "length");
  const json usage = json::parse(events[events.size() - 2]);
  EXPECT_TRUE(usage["choices"].empty());
  EXPECT_EQ(usage["usage"]["completion_tokens"], 24);
}

TEST(Serve, SeveralPromptsAndChoicesInOrderWithSeededSampling) {
  Running r;
  const json body = {{"prompt", json::array({"Once upon a time", "Lily and Ben"})}, {"max_tokens", 6}, {"n", 2},
                     {"temperature", 0.9}, {"seed", 42}};
  auto a = r.post("/v1/completions", body), b = r.post("/v1/completions", body);
  ASSERT_TRUE(a && b);
  ASSERT_EQ(a->status, 200) << a->body;
  const json ja = json::parse(a->body), jb = json::parse(b->body);
  ASSERT_EQ(ja["choices"].size(), 4u);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(ja["choices"][i]["index"], i);
    EXPECT_EQ(ja["choices"][i]["text"], jb["choices"][i]["text"]) << "seeded: the same text again";
  }
  EXPECT_EQ(ja["usage"]["completion_tokens"], 24);
  const Tokenizer& tok = *stories().ck.tokenizer;
  EXPECT_EQ(ja["usage"]["prompt_tokens"], tok.encode("Once upon a time", true).size() + tok.encode("Lily and Ben", true).size())
      << "each prompt counted once";
  // Token-id prompts are taken as they are (no BOS added).
  auto ids = r.post("/v1/completions", {{"prompt", json::array({1, 403, 407, 261, 378})}, {"max_tokens", 24},
                                        {"temperature", 0}});
  ASSERT_TRUE(ids);
  EXPECT_EQ(json::parse(ids->body)["choices"][0]["text"], greedy_text("Once upon a time", 24));
}

TEST(Serve, StopStringsEndTheTextBeforeThem) {
  Running r;
  const std::string full = greedy_text("Once upon a time", 24);  // ", there was a little girl named Lily..."
  auto res = r.post("/v1/completions", {{"prompt", "Once upon a time"}, {"max_tokens", 24}, {"temperature", 0},
                                        {"stop", json::array({"little"})}});
  ASSERT_TRUE(res);
  const json j = json::parse(res->body);
  EXPECT_EQ(j["choices"][0]["text"], full.substr(0, full.find("little")));
  EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");
}

TEST(Serve, ChatRendersTheTemplateAndStreamsTheRoleFirst) {
  Running r({}, /*chat=*/true);
  const json messages = json::array({{{"role", "user"}, {"content", "Tell me a story"}}});
  auto whole = r.post("/v1/chat/completions", {{"messages", messages}, {"max_tokens", 10}, {"temperature", 0}});
  ASSERT_TRUE(whole);
  ASSERT_EQ(whole->status, 200) << whole->body;
  const json j = json::parse(whole->body);
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_EQ(j["choices"][0]["message"]["role"], "assistant");
  // The same tokens as a completion of the rendered prompt.
  const std::string rendered = ChatTemplate(json::parse(std::ifstream(test::shared_path("fixtures/chat/smollm2-instruct.json")))
                                                ["template"].get<std::string>())
                                   .render(messages, true, "", "");
  auto plain = r.post("/v1/completions", {{"prompt", rendered}, {"max_tokens", 10}, {"temperature", 0}});
  ASSERT_TRUE(plain);
  EXPECT_EQ(j["choices"][0]["message"]["content"], json::parse(plain->body)["choices"][0]["text"]);

  auto streamed = r.post("/v1/chat/completions",
                         {{"messages", messages}, {"max_tokens", 10}, {"temperature", 0}, {"stream", true}});
  ASSERT_TRUE(streamed);
  const auto events = sse_events(streamed->body);
  ASSERT_GE(events.size(), 3u);
  const json first = json::parse(events[0]);
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(first["choices"][0]["delta"]["role"], "assistant");
  std::string text;
  for (size_t i = 1; i + 1 < events.size(); ++i)
    text += json::parse(events[i])["choices"][0]["delta"].value("content", "");
  EXPECT_EQ(text, j["choices"][0]["message"]["content"].get<std::string>());  // (nlohmann 3.11.3 has no string == json)

  // logprobs: every produced token, with top_logprobs alternatives, the greedy choice the most likely; its
  // bytes spell the content.
  auto scored = r.post("/v1/chat/completions", {{"messages", messages}, {"max_tokens", 10}, {"temperature", 0},
                                                {"logprobs", true}, {"top_logprobs", 2}});
  ASSERT_TRUE(scored);
  ASSERT_EQ(scored->status, 200) << scored->body;
  const json s = json::parse(scored->body);
  const json content = s["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(content.size(), s["usage"]["completion_tokens"].get<size_t>());
  std::string spelled;
  for (const json& t : content) {
    ASSERT_EQ(t["top_logprobs"].size(), 2u) << t;
    EXPECT_EQ(t["top_logprobs"][0]["token"], t["token"]);
    EXPECT_EQ(t["top_logprobs"][0]["logprob"], t["logprob"]);
    EXPECT_GE(t["top_logprobs"][0]["logprob"].get<double>(), t["top_logprobs"][1]["logprob"].get<double>());
    EXPECT_LE(t["logprob"].get<double>(), 0.0);
    for (const json& b : t["bytes"]) spelled += static_cast<char>(b.get<int>());
  }
  EXPECT_EQ(spelled, j["choices"][0]["message"]["content"].get<std::string>());
  for (const json& bad : {json{{"top_logprobs", 2}}, json{{"logprobs", true}, {"top_logprobs", 21}},
                          json{{"echo", true}}}) {
    json body = bad;
    body["messages"] = messages;
    auto res = r.post("/v1/chat/completions", body);
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 400) << bad;
    EXPECT_EQ(json::parse(res->body)["error"]["param"], bad.contains("echo") ? "echo" : "top_logprobs");
  }
}

TEST(Serve, ErrorsHaveTheirStatusAndOpenAiBody) {
  serve::ServerOptions o;
  o.max_body = 4096;
  Running r(o);
  struct Case {
    std::string path, body;
    int status;
    std::string param, message;
  };
  for (const Case& c : std::vector<Case>{
           {"/v1/completions", "{bad json", 400, "", "not valid JSON"},
           {"/v1/completions", "[1, 2]", 400, "", "must be a JSON object"},
           {"/v1/completions", R"({"max_tokens": 3})", 400, "prompt", "'prompt' is required"},
           {"/v1/completions", R"({"prompt": ""})", 400, "prompt", "is empty"},
           {"/v1/completions", R"({"prompt": [1, 99999]})", 400, "prompt", "token id 99999 is out of range"},
           {"/v1/completions", R"({"prompt": "hi", "temperature": "hot"})", 400, "temperature", "must be a number"},
           {"/v1/completions", R"({"prompt": "hi", "temperature": 3})", 400, "temperature", "must be in [0, 2]"},
           {"/v1/completions", R"({"prompt": "hi", "max_tokens": 1.5})", 400, "max_tokens", "must be an integer"},
           {"/v1/completions", R"({"prompt": "hi", "max_tokens": 600})", 400, "max_tokens",
            "maximum context length is 512 tokens"},
           {"/v1/completions", R"({"prompt": "hi", "n": 0})", 400, "n", "must be in [1, 64]"},
           {"/v1/completions", R"({"prompt": "hi", "stop": [""]})", 400, "stop", "must not be empty"},
           {"/v1/completions", R"({"prompt": "hi", "logprobs": 6})", 400, "logprobs", "'logprobs' must be in [0, 5], got 6"},
           {"/v1/completions", R"({"prompt": "hi", "logprobs": -1})", 400, "logprobs", "must be in [0, 5], got -1"},
           {"/v1/completions", R"({"prompt": "hi", "logprobs": "x"})", 400, "logprobs", "must be an integer, got string"},
           {"/v1/completions", R"({"prompt": "hi", "logprobs": true})", 400, "logprobs", "must be an integer, got boolean"},
           {"/v1/completions", R"({"prompt": "hi", "logprobs": 1.5})", 400, "logprobs", "must be an integer, got number"},
           {"/v1/completions", R"({"prompt": "hi", "echo": 1})", 400, "echo", "'echo' must be a boolean"},
           {"/v1/completions", R"({"prompt": "hi", "top_logprobs": 2})", 400, "top_logprobs", "not supported"},
           {"/v1/completions", R"({"prompt": "hi", "presence_penalty": 2.5})", 400, "presence_penalty", "must be in [-2, 2]"},
           {"/v1/completions", R"({"prompt": "hi", "model": "gpt-4"})", 404, "model", "'gpt-4' does not exist"},
           {"/v1/chat/completions", R"({"messages": []})", 400, "messages", "non-empty list"},
           {"/v1/chat/completions", R"({"messages": [{"role": "user", "content": "hi"}]})", 400, "messages",
            "no chat template"},
           {"/v1/completions", std::string(5000, ' '), 413, "", "larger than the server's --max-body"},
       }) {
    SCOPED_TRACE(c.body.substr(0, 80));
    auto res = r.client.Post(c.path.c_str(), c.body, "application/json");
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, c.status) << res->body;
    const json e = json::parse(res->body)["error"];
    EXPECT_THAT(e["message"].get<std::string>(), HasSubstr(c.message));
    EXPECT_EQ(e["param"], c.param.empty() ? json() : json(c.param));
    EXPECT_TRUE(e["type"].is_string());
  }
  auto unknown = r.client.Get("/v2/nothing");
  ASSERT_TRUE(unknown);
  EXPECT_EQ(unknown->status, 404);
  EXPECT_THAT(unknown->body, HasSubstr("no route GET /v2/nothing"));
  auto method = r.client.Get("/v1/completions");
  ASSERT_TRUE(method);
  EXPECT_EQ(method->status, 405);
  EXPECT_EQ(method->get_header_value("Allow"), "POST");
}

TEST(Serve, ApiKeyAndQueueBound) {
  serve::ServerOptions o;
  o.api_key = "sesame";
  o.max_queue = 1;
  Running r(o);
  auto none = r.post("/v1/completions", {{"prompt", "hi"}});
  ASSERT_TRUE(none);
  EXPECT_EQ(none->status, 401);
  EXPECT_EQ(json::parse(none->body)["error"]["code"], "invalid_api_key");
  auto health = r.client.Get("/health");  // not behind the key
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 200);
  const httplib::Headers key = {{"Authorization", "Bearer sesame"}};
  auto ok = r.post("/v1/completions", {{"prompt", "hi"}, {"max_tokens", 2}}, key);
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->status, 200) << ok->body;
  auto full = r.post("/v1/completions", {{"prompt", "hi"}, {"max_tokens", 2}, {"n", 2}}, key);
  ASSERT_TRUE(full);
  EXPECT_EQ(full->status, 429) << "two requests would wait beyond --max-queue 1";
  EXPECT_THAT(full->body, HasSubstr("queue is full"));
}

// A streaming client that reads one chunk and hangs up: its request is cancelled and its blocks come back.
TEST(Serve, ClientGoneMidStreamCancelsItsRequest) {
  Running r;
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/completions";
  req.set_header("Content-Type", "application/json");
  req.body = json{{"prompt", "Once upon a time"}, {"max_tokens", 400}, {"stream", true}, {"ignore_eos", true}}.dump();
  int chunks = 0;
  req.content_receiver = [&](const char*, size_t, uint64_t, uint64_t) { return ++chunks < 2; };
  httplib::Response res;
  httplib::Error err = httplib::Error::Success;
  r.client.send(req, res, err);
  EXPECT_EQ(chunks, 2);
  Scheduler& s = *r.server.scheduler();
  EXPECT_TRUE(wait_for([&] { return s.running() == 0 && s.waiting() == 0; })) << "the request was not cancelled";
  EXPECT_TRUE(wait_for([&] { return s.cache().free_blocks() == s.cache().num_blocks(); }));
  EXPECT_LT(s.stats().generated_tokens, 400) << "it stopped early";
}

// Shutdown while a request runs: new requests get 503, the running one completes whole.
TEST(Serve, ShutdownDrainsRunningRequests) {
  Running r;
  std::optional<httplib::Result> running;
  std::thread t([&] {
    running = r.post("/v1/completions", {{"prompt", "Once upon a time"}, {"max_tokens", 300}, {"ignore_eos", true}});
  });
  Scheduler& s = *r.server.scheduler();
  ASSERT_TRUE(wait_for([&] { return s.running() > 0; }));
  std::thread stopper([&] { r.server.shutdown(); });
  ASSERT_TRUE(wait_for([&] {
    auto h = httplib::Client("127.0.0.1", r.server.port()).Get("/health");
    return !h || h->status == 503;
  }));
  t.join();
  stopper.join();
  ASSERT_TRUE(running && *running);
  EXPECT_EQ((*running)->status, 200);
  EXPECT_EQ(json::parse((*running)->body)["usage"]["completion_tokens"], 300);
}

// /metrics after a few requests: the counts are exact, the cache is empty again, and Prometheus's own checker
// (promtool, Debian's prometheus package) accepts the exposition.
TEST(Serve, MetricsCountWhatHappenedAndPassPromtool) {
  Running r;
  for (int i = 0; i < 2; ++i) {
    auto ok = r.post("/v1/completions", {{"prompt", "Once upon a time"}, {"max_tokens", 5}, {"temperature", 0}});
    ASSERT_TRUE(ok && ok->status == 200);
  }
  auto bad = r.post("/v1/completions", {{"prompt", "hi"}, {"temperature", -1}});
  ASSERT_TRUE(bad && bad->status == 400);
  ASSERT_TRUE(r.client.Get("/nowhere"));
  const std::string prompt = std::to_string(stories().ck.tokenizer->encode("Once upon a time", true).size() * 2);
  const std::vector<std::string> lines = {
           std::string("polar_requests_total{finish_reason=\"length\"} 2"),
           std::string("polar_http_responses_total{route=\"/v1/completions\",status=\"200\"} 2"),
           std::string("polar_http_responses_total{route=\"/v1/completions\",status=\"400\"} 1"),
           std::string("polar_http_responses_total{route=\"other\",status=\"404\"} 1"),
           std::string("polar_generation_tokens_total 10"),
           "polar_prompt_tokens_total " + prompt,
           std::string("polar_time_to_first_token_seconds_count 2"),
           std::string("polar_e2e_request_latency_seconds_count 2"),
           std::string("polar_requests_running 0"),
           std::string("polar_kv_cache_used_blocks 0"),
           std::string("polar_head_density 1"),
           "polar_prefix_cache_queries_total " + std::to_string(2 * (std::stoi(prompt) / 2 - 1)),
           std::string("polar_prefix_cache_hits_total 0"),  // shorter than a block
  };
  // A response is counted just after it is sent (httplib's logger), so the last one may need a moment.
  std::string text;
  auto all_there = [&] {
    auto m = r.client.Get("/metrics");
    text = m && m->status == 200 ? m->body : "";
    for (const std::string& line : lines)
      if (text.find(line + "\n") == std::string::npos) return false;
    return true;
  };
  wait_for(all_there, std::chrono::seconds(5));
  for (const std::string& line : lines) EXPECT_THAT(text, HasSubstr(line + "\n"));
  test::TempDir tmp;
  std::ofstream(tmp.path("metrics.txt")) << text;
  const std::string cmd = "promtool check metrics < " + tmp.path("metrics.txt") + " > " + tmp.path("promtool.txt") + " 2>&1";
  const int rc = std::system(cmd.c_str());
  std::ifstream out(tmp.path("promtool.txt"));
  const std::string said((std::istreambuf_iterator<char>(out)), {});
  EXPECT_EQ(rc, 0) << "promtool check metrics (scripts/install-deps.sh installs it): " << said << "\n" << text;
}

// Prefix caching through the API: the same long prompt again reads its cached whole blocks (the counters
// and the response's usage.prompt_tokens_details.cached_tokens say how many) and answers the same; after
// POST /reset_prefix_cache it is computed in full again.
TEST(Serve, RepeatedPromptsHitThePrefixCacheUntilReset) {
  Running r;
  const std::string text =
      "Once upon a time there was a little girl named Lily. She loved to play outside in the park with her "
      "friends. One day she saw a big red ball.";
  const int64_t n = static_cast<int64_t>(stories().ck.tokenizer->encode(text, true).size());
  ASSERT_GT(n, 33) << "the prompt spans whole blocks of 16";
  const int64_t cached = (n - 1) / 16 * 16;
  auto hits = [&] {
    auto m = r.client.Get("/metrics");
    const std::string body = m ? m->body : "";
    const std::string name = "polar_prefix_cache_hits_total ";
    const size_t at = body.find("\n" + name);
    return at == std::string::npos ? int64_t(-1) : std::stoll(body.substr(at + 1 + name.size()));
  };
  std::vector<std::string> answers;
  std::vector<int64_t> after, reported;
  for (int i = 0; i < 3; ++i) {
    if (i == 2) {
      auto reset = r.client.Post("/reset_prefix_cache");
      ASSERT_TRUE(reset);
      EXPECT_EQ(reset->status, 200) << reset->body;
    }
    auto res = r.post("/v1/completions", {{"prompt", text}, {"max_tokens", 6}, {"temperature", 0}});
    ASSERT_TRUE(res && res->status == 200);
    const json body = json::parse(res->body);
    answers.push_back(body["choices"][0]["text"]);
    reported.push_back(body["usage"]["prompt_tokens_details"]["cached_tokens"]);
    after.push_back(hits());
  }
  EXPECT_EQ(reported, (std::vector<int64_t>{0, cached, 0})) << "usage.prompt_tokens_details.cached_tokens";
  EXPECT_EQ(after[0], 0);
  EXPECT_EQ(after[1], cached) << "the second request read its prompt's whole blocks from the cache";
  EXPECT_EQ(after[2], cached) << "after the reset nothing was cached";
  EXPECT_EQ(answers[1], answers[0]);
  EXPECT_EQ(answers[2], answers[0]);
  auto get = r.client.Get("/reset_prefix_cache");
  ASSERT_TRUE(get);
  EXPECT_EQ(get->status, 405);
}

// bench-serve --url against an in-process server over a tiny synthetic model (no tokenizer: a chunk per
// token): every request's tokens arrive, the counts are exact, and the command prints its table.
TEST(Serve, HttpBenchmarkSeesEveryToken) {
  const ModelConfig c = shape_config("tiny-llama");
  Checkpoint ck = synthetic_checkpoint(c, "tiny", 1);
  auto backend = make_cpu_backend();
  auto model = make_model(ck, *backend);
  serve::ServerOptions o;
  o.port = 0;
  serve::Server server(o);
  serve::ApiContext ctx;
  ctx.model_name = "tiny";
  ctx.vocab_size = c.vocab_size;
  ctx.max_total_tokens = c.max_positions;
  ctx.ignore_eos_default = true;
  server.serve(*model, {.max_seqs = 8, .max_batch_tokens = 64, .kv_tokens = 4096}, ctx);
  ServeWorkloadOptions w;
  w.requests = 12;
  w.prompt = {3, 20};
  w.output = {1, 9};
  const auto requests = make_serve_workload(w, c.vocab_size, 200.0);
  const std::string url = "http://127.0.0.1:" + std::to_string(server.port());
  // Without a tokenizer the text is empty and tokens are named by id, all at text offset 0.
  httplib::Client client("127.0.0.1", server.port());
  auto scored = client.Post("/v1/completions",
                            json{{"prompt", {5, 6, 7}}, {"max_tokens", 2}, {"echo", true}, {"logprobs", 1}}.dump(),
                            "application/json");
  ASSERT_TRUE(scored);
  ASSERT_EQ(scored->status, 200) << scored->body;
  const json lp = json::parse(scored->body)["choices"][0]["logprobs"];
  ASSERT_EQ(lp["tokens"].size(), 5u);
  EXPECT_EQ(lp["tokens"][0], "token_id:5");
  EXPECT_EQ(lp["tokens"][2], "token_id:7");
  EXPECT_EQ(lp["text_offset"], json::array({0, 0, 0, 0, 0}));
  EXPECT_TRUE(lp["top_logprobs"][1].contains("token_id:6"));
  const ServeResult r = serve::run_http_bench(url, requests);
  int64_t output = 0;
  for (const auto& q : requests) output += q.output;
  EXPECT_EQ(r.output_tokens, output);
  EXPECT_EQ(r.requests, 12);
  EXPECT_LE(r.ttft_ms.p50, r.e2e_ms.p99);
  EXPECT_GT(r.output_tokens_per_s, 0);

  test::RunResult cli = test::run_polar({"bench-serve", "--url", url, "--shape", "tiny-llama", "--requests", "6",
                                         "--prompt-len", "4-8", "--output-len", "3"});
  EXPECT_EQ(cli.exit_code, 0) << cli.err;
  EXPECT_THAT(cli.out, HasSubstr("tiny-llama   http     inf"));
  EXPECT_THAT(cli.err, HasSubstr("warming up with 6 requests"));  // the server's first-use costs stay untimed
  test::RunResult bad = test::run_polar({"bench-serve", "--url", "ftp://x", "--shape", "tiny-llama"});
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_THAT(bad.err, HasSubstr("expected http://HOST:PORT"));
}

// A port another server holds is an error at start-up, not a second listener sharing it.
TEST(Serve, PortInUseIsAnError) {
  Running r;
  serve::ServerOptions o;
  o.port = r.server.port();
  EXPECT_THAT(test::error_of([&] { serve::Server second(o); }),
              HasSubstr("cannot listen on 127.0.0.1:" + std::to_string(r.server.port())));
  auto still = r.client.Get("/health");
  ASSERT_TRUE(still);
  EXPECT_EQ(still->status, 200);
}

namespace {

// A completions logprobs object against the one-pass reference over `ids` (the prompt, then the produced
// tokens): entry i scores ids[i] from reference row i - 1 (entry 0 of an echoed prompt has no score); each
// top_logprobs map holds the n most likely tokens' values, descending from the row's best, and the chosen
// token's; each token's text starts at its text_offset in `text`.
void expect_completion_logprobs(const json& lp, const std::vector<int32_t>& ids, size_t first, int64_t n,
                                const std::string& text) {
  const auto ref = test::log_softmax_rows(*stories().model, ids);
  ASSERT_TRUE(lp.is_object()) << lp;
  const json &tokens = lp["tokens"], &values = lp["token_logprobs"], &tops = lp["top_logprobs"],
             &offsets = lp["text_offset"];
  ASSERT_EQ(tokens.size(), ids.size() - first);
  ASSERT_EQ(values.size(), tokens.size());
  ASSERT_EQ(tops.size(), tokens.size());
  ASSERT_EQ(offsets.size(), tokens.size());
  int64_t last_offset = 0;
  for (size_t k = 0; k < tokens.size(); ++k) {
    SCOPED_TRACE(testing::Message() << "token " << k << " " << tokens[k]);
    const size_t i = first + k;
    const std::string tok = tokens[k].get<std::string>();
    const int64_t offset = offsets[k].get<int64_t>();
    EXPECT_GE(offset, last_offset);
    last_offset = offset;
    EXPECT_EQ(text.substr(static_cast<size_t>(offset), tok.size()), tok) << "text_offset into " << text;
    if (i == 0) {
      EXPECT_TRUE(values[k].is_null());
      EXPECT_TRUE(tops[k].is_null());
      EXPECT_EQ(offset, 0);
      continue;
    }
    const std::vector<double>& row = ref[i - 1];
    const double want = row[ids[i]];
    EXPECT_NEAR(values[k].get<double>(), want, test::scaled_tol(1e-5, want));
    std::vector<double> sorted = row, got;
    std::sort(sorted.begin(), sorted.end(), std::greater<double>());
    ASSERT_TRUE(tops[k].is_object());
    for (const auto& [key, v] : tops[k].items()) got.push_back(v.get<double>());
    std::sort(got.begin(), got.end(), std::greater<double>());
    EXPECT_GE(got.size(), static_cast<size_t>(std::max<int64_t>(n, 1)));
    EXPECT_LE(got.size(), static_cast<size_t>(n + 1)) << "the top n and the chosen token";
    ASSERT_TRUE(tops[k].contains(tok)) << tops[k];
    EXPECT_NEAR(tops[k][tok].get<double>(), want, test::scaled_tol(1e-5, want));
    for (int64_t j = 0; j < n; ++j) EXPECT_NEAR(got[j], sorted[j], test::scaled_tol(1e-5, sorted[j])) << "top " << j;
  }
}

std::vector<int32_t> greedy_ids(const std::vector<int32_t>& prompt, int64_t n) {
  Stories& s = stories();
  GenerateOptions opt;
  opt.max_new_tokens = n;
  opt.tokenizer = s.ck.tokenizer.get();
  std::vector<int32_t> all = prompt;
  const std::vector<int32_t> produced = generate(*s.model, {prompt}, opt)[0];
  all.insert(all.end(), produced.begin(), produced.end());
  return all;
}

}  // namespace

// echo with max_tokens 0, how lm-evaluation-harness scores a text: the prompt back with every token's
// log-probability (the first none), usage exact. With tokens produced (greedy): the prompt's then the
// produced tokens' log-probabilities, the log-softmax of the model's logits over the same tokens, and the
// text the prompt and the produced tokens decode to (without echo, what the produced ones add).
TEST(Serve, CompletionLogprobsAndEchoAreTheModelsLogSoftmax) {
  Running r;
  const std::string prompt = "Once upon a time";
  const std::vector<int32_t> ids = stories().ck.tokenizer->encode(prompt, true);
  auto scored = r.post("/v1/completions", {{"prompt", prompt}, {"max_tokens", 0}, {"echo", true}, {"logprobs", 2}});
  ASSERT_TRUE(scored);
  ASSERT_EQ(scored->status, 200) << scored->body;
  json j = json::parse(scored->body);
  EXPECT_EQ(j["choices"][0]["text"], prompt);
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(j["usage"]["prompt_tokens"], ids.size());
  EXPECT_EQ(j["usage"]["completion_tokens"], 0);
  EXPECT_EQ(j["usage"]["total_tokens"], ids.size());
  expect_completion_logprobs(j["choices"][0]["logprobs"], ids, 0, 2, prompt);
  // /metrics counts the prompt tokens scored: every one but the first, which has no score.
  auto m = r.client.Get("/metrics");
  ASSERT_TRUE(m && m->status == 200);
  EXPECT_THAT(m->body, HasSubstr("polar_scored_prompt_tokens_total " + std::to_string(ids.size() - 1) + "\n"));

  // echo without logprobs: the text only, nothing computed for max_tokens 0.
  auto echoed = r.post("/v1/completions", {{"prompt", prompt}, {"max_tokens", 0}, {"echo", true}});
  ASSERT_TRUE(echoed);
  EXPECT_EQ(json::parse(echoed->body)["choices"][0]["text"], prompt);
  EXPECT_TRUE(json::parse(echoed->body)["choices"][0]["logprobs"].is_null());

  // The text continues the prompt's: after "Once upon a" the first token, "▁time", keeps its space.
  const Tokenizer& tok = *stories().ck.tokenizer;
  for (const std::string& p : {prompt, std::string("Once upon a")}) {
    const std::vector<int32_t> prompt_ids = tok.encode(p, true), all = greedy_ids(prompt_ids, 8);
    const std::string full = tok.decode(all);
    ASSERT_TRUE(full.starts_with(p));
    for (bool echo : {true, false}) {
      SCOPED_TRACE(testing::Message() << p << (echo ? ", echo" : ", no echo"));
      auto res = r.post("/v1/completions", {{"prompt", p}, {"max_tokens", 8}, {"temperature", 0}, {"echo", echo},
                                            {"logprobs", 3}});
      ASSERT_TRUE(res);
      ASSERT_EQ(res->status, 200) << res->body;
      j = json::parse(res->body);
      const std::string text = j["choices"][0]["text"];
      EXPECT_EQ(text, echo ? full : full.substr(p.size()));
      expect_completion_logprobs(j["choices"][0]["logprobs"], all, echo ? 0 : prompt_ids.size(), 3, text);
      EXPECT_EQ(j["usage"]["completion_tokens"], 8);
    }
  }
}

// Streamed, each chunk carries its tokens' log-probabilities (the echoed prompt's in the first, with the
// prompt's text); concatenated they are the whole response's.
TEST(Serve, StreamedLogprobsConcatenateToTheWholeResponse) {
  Running r;
  const json body = {{"prompt", "Lily and Ben"}, {"max_tokens", 10}, {"temperature", 0.8}, {"seed", 9}, {"echo", true},
                     {"logprobs", 4}, {"n", 2}, {"ignore_eos", true}};
  auto whole = r.post("/v1/completions", body);
  ASSERT_TRUE(whole);
  ASSERT_EQ(whole->status, 200) << whole->body;
  json streamed_body = body;
  streamed_body["stream"] = true;
  auto streamed = r.post("/v1/completions", streamed_body);
  ASSERT_TRUE(streamed);
  const json w = json::parse(whole->body);
  std::vector<json> lp(2, serve::LogprobsWriter(serve::Endpoint::completions, nullptr).empty());
  std::vector<std::string> text(2);
  std::vector<int> chunks(2, 0);
  for (const std::string& e : sse_events(streamed->body)) {
    if (e == "[DONE]") break;
    const json c = json::parse(e)["choices"][0];
    const size_t i = c["index"];
    if (chunks[i]++ == 0) {
      EXPECT_THAT(c["text"].get<std::string>(), ::testing::StartsWith("Lily and Ben"));
    }
    text[i] += c["text"].get<std::string>();
    ASSERT_TRUE(c["logprobs"].is_object()) << e;
    serve::LogprobsWriter::append(lp[i], c["logprobs"]);
  }
  for (size_t i = 0; i < 2; ++i) {
    SCOPED_TRACE(testing::Message() << "choice " << i);
    const json& want = w["choices"][i]["logprobs"];
    ASSERT_EQ(want["tokens"].size(), w["usage"]["prompt_tokens"].get<size_t>() + 10) << "the prompt, then 10 tokens";
    EXPECT_EQ(text[i], w["choices"][i]["text"].get<std::string>());
    EXPECT_EQ(lp[i]["tokens"], want["tokens"]);
    EXPECT_EQ(lp[i]["text_offset"], want["text_offset"]);
    ASSERT_EQ(lp[i]["token_logprobs"].size(), want["token_logprobs"].size());
    EXPECT_TRUE(lp[i]["token_logprobs"][0].is_null());
    for (size_t k = 1; k < want["token_logprobs"].size(); ++k) {
      const double v = want["token_logprobs"][k];
      EXPECT_NEAR(lp[i]["token_logprobs"][k].get<double>(), v, test::scaled_tol(1e-5, v)) << k;
      EXPECT_EQ(lp[i]["top_logprobs"][k].size(), want["top_logprobs"][k].size()) << k;
    }
    EXPECT_GT(chunks[i], 1);
  }
}

// n choices of an echoed prompt with logprobs: the prompt is scored once for the request, not once per choice
// (the scheduler's count of scored prompt tokens), and every choice echoes the same log-probabilities, those
// of the prompt sent with n = 1.
TEST(Serve, EchoedPromptIsScoredOnceForAllChoices) {
  Running r;
  const std::string prompt = "Once upon a time, there was a little girl";
  const size_t P = stories().ck.tokenizer->encode(prompt, true).size();
  auto complete = [&](int n) {
    auto res = r.post("/v1/completions", {{"prompt", prompt}, {"max_tokens", 2}, {"echo", true}, {"logprobs", 2},
                                          {"n", n}, {"temperature", 0.8}, {"seed", 3}});
    EXPECT_TRUE(res && res->status == 200) << (res ? res->body : "no response");
    return res ? json::parse(res->body) : json();
  };
  // Read after a choice's last token, which follows the step that scored its prompt (and published the count).
  auto scored = [&] { return r.server.scheduler()->gauges().stats.scored_prompt_tokens; };
  const json one = complete(1);
  EXPECT_EQ(scored(), static_cast<int64_t>(P) - 1) << "the first token has nothing before it to score it";
  const json three = complete(3);
  EXPECT_EQ(scored(), 2 * (static_cast<int64_t>(P) - 1)) << "scored once for the 3 choices";
  const json& want = one["choices"][0]["logprobs"];
  ASSERT_EQ(three["choices"].size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    SCOPED_TRACE(testing::Message() << "choice " << i);
    const json& lp = three["choices"][i]["logprobs"];
    ASSERT_EQ(lp["tokens"].size(), P + 2) << "the prompt, then 2 tokens";
    for (size_t k = 0; k < P; ++k) {
      SCOPED_TRACE(testing::Message() << "prompt token " << k);
      EXPECT_EQ(lp["tokens"][k], want["tokens"][k]);
      EXPECT_EQ(lp["token_logprobs"][k], three["choices"][0]["logprobs"]["token_logprobs"][k]);
      EXPECT_EQ(lp["top_logprobs"][k], three["choices"][0]["logprobs"]["top_logprobs"][k]);
      if (k == 0) {
        EXPECT_TRUE(lp["token_logprobs"][k].is_null());
        continue;
      }
      const double v = want["token_logprobs"][k];
      EXPECT_NEAR(lp["token_logprobs"][k].get<double>(), v, test::scaled_tol(1e-5, v));
    }
  }
}

// Token strings and offsets of a text whose "日本" stories260K spells as six byte tokens: each byte alone is
// not UTF-8, so it is written as OpenAI's "bytes:\xNN" escape, and text_offset counts characters.
TEST(Serve, LogprobTokensEscapeBytesAndOffsetsCountCharacters) {
  const Tokenizer& tok = *stories().ck.tokenizer;
  const std::vector<int32_t> ids = tok.encode("n日本 a", true);
  RequestEvent e;
  for (int32_t id : ids) e.prompt_logprobs.push_back({id, -1.0f, {{id, -1.0f}}});
  e.prompt_logprobs[0].logprob.reset();
  serve::LogprobsWriter writer(serve::Endpoint::completions, &tok);
  const json lp = writer.write(e);
  std::vector<std::string> bytes;
  for (const json& t : lp["tokens"])
    if (t.get<std::string>().starts_with("bytes:")) bytes.push_back(t);
  EXPECT_EQ(bytes, (std::vector<std::string>{"bytes:\\xe6", "bytes:\\x97", "bytes:\\xa5", "bytes:\\xe6", "bytes:\\x9c",
                                             "bytes:\\xac"}))
      << lp["tokens"];
  EXPECT_EQ(lp["text_offset"].back(), 3) << "'n', '日' and '本' before the last token: " << lp;
  EXPECT_EQ(lp["tokens"].back(), " a");
}

#endif  // POLAR_HAVE_SERVE
