// polar chat-template, run as a user would: every fixture family's template (fixtures/chat) rendered from a
// template file and a messages file byte for byte as transformers renders it, with and without the
// generation prompt; a model's own template from GGUF metadata and from a Hugging Face directory
// (Checkpoint::chat_template), its BOS/EOS text (Tokenizer::bos_text/eos_text); and bad input as exit 1 with
// a message naming the problem.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "io/checkpoint.h"
#include "io/gguf.h"
#include "test_util.h"

using namespace polar;
using ::testing::HasSubstr;
using json = nlohmann::ordered_json;
using test::run_polar;
using test::RunResult;
using test::shared_path;
using test::TempDir;

namespace {

const std::string kGgufRel = "models/stories260K/stories260K.gguf";
const std::string kHfRel = "models/stories260K/hf";

std::string describe(const RunResult& r) {
  return "exit " + std::to_string(r.exit_code) + "\n--- stdout\n" + r.out + "\n--- stderr\n" + r.err;
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  f << text;
}

json read_fixture(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return json::parse(f);
}

std::vector<std::string> fixture_files() {
  std::vector<std::string> files;
  const std::filesystem::path dir = shared_path("fixtures/chat");
  if (!std::filesystem::is_directory(dir)) return files;
  for (const auto& entry : std::filesystem::directory_iterator(dir))
    if (entry.path().extension() == ".json") files.push_back(entry.path().string());
  std::sort(files.begin(), files.end());
  return files;
}

// The index of the first case of `fixture` with this add_generation_prompt that renders (has "expected").
int first_case(const json& fixture, bool add_generation_prompt) {
  for (size_t i = 0; i < fixture["cases"].size(); ++i) {
    const json& c = fixture["cases"][i];
    if (c["add_generation_prompt"] == add_generation_prompt && c.contains("expected")) return static_cast<int>(i);
  }
  return -1;
}

// polar chat-template --template <fixture's template> --messages <the case's messages> with the fixture's
// bos/eos and the case's kwargs as --var.
RunResult render_case(const TempDir& tmp, const json& fixture, const json& c) {
  write_text(tmp.path("template.jinja"), fixture["template"].get<std::string>());
  write_text(tmp.path("messages.json"), c["messages"].dump());
  std::vector<std::string> args = {"chat-template", "--template", tmp.path("template.jinja"), "--messages",
                                   tmp.path("messages.json")};
  if (!c["add_generation_prompt"].get<bool>()) args.push_back("--no-generation-prompt");
  for (const char* token : {"bos", "eos"})
    if (fixture[std::string(token) + "_token"].is_string())
      args.insert(args.end(), {std::string("--") + token, fixture[std::string(token) + "_token"].get<std::string>()});
  for (const auto& [name, value] : c["kwargs"].items()) args.insert(args.end(), {"--var", name + "=" + value.dump()});
  return run_polar(args);
}

// stories260K's GGUF with `entries` (key, GGUF value type, encoded value) added to its metadata. They go in
// front of the other entries, followed by a padding string entry that keeps the header's length a multiple of
// the data alignment, so the tensor data section moves by whole alignment units and stays valid.
std::string gguf_with_metadata(const TempDir& tmp, const std::string& name,
                               const std::vector<std::pair<std::string, std::vector<uint8_t>>>& entries) {
  const std::vector<uint8_t> src = test::read_bytes(shared_path(kGgufRel));
  const gguf::File f = gguf::File::open(shared_path(kGgufRel));
  const uint64_t align = f.has("general.alignment") ? f.get_int("general.alignment") : 32;
  auto put_u32 = [](std::vector<uint8_t>& b, uint32_t v) { for (int i = 0; i < 4; ++i) b.push_back(uint8_t(v >> (8 * i))); };
  auto put_u64 = [](std::vector<uint8_t>& b, uint64_t v) { for (int i = 0; i < 8; ++i) b.push_back(uint8_t(v >> (8 * i))); };
  auto put_str = [&](std::vector<uint8_t>& b, const std::string& s) {
    put_u64(b, s.size());
    b.insert(b.end(), s.begin(), s.end());
  };
  std::vector<uint8_t> kvs;
  for (const auto& [key, value] : entries) {
    put_str(kvs, key);
    kvs.insert(kvs.end(), value.begin(), value.end());
  }
  const std::string pad_key = "polar.test.padding";
  const size_t fixed = kvs.size() + 8 + pad_key.size() + 4 + 8;
  put_str(kvs, pad_key);
  put_u32(kvs, 8);  // string
  put_str(kvs, std::string((align - fixed % align) % align, ' '));
  EXPECT_EQ(kvs.size() % align, 0u);
  uint64_t n_kv = 0;
  std::memcpy(&n_kv, src.data() + 16, 8);
  std::vector<uint8_t> out(src.begin(), src.begin() + 16);
  put_u64(out, n_kv + entries.size() + 1);
  out.insert(out.end(), kvs.begin(), kvs.end());
  out.insert(out.end(), src.begin() + 24, src.end());
  const std::string path = tmp.path(name);
  test::write_bytes(path, out);
  return path;
}

std::vector<uint8_t> gguf_string_value(const std::string& s) {
  std::vector<uint8_t> b = {8, 0, 0, 0};
  for (int i = 0; i < 8; ++i) b.push_back(uint8_t(uint64_t(s.size()) >> (8 * i)));
  b.insert(b.end(), s.begin(), s.end());
  return b;
}

const std::string kTinyTemplate =
    "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}";

// ---- Every fixture family, through the command line.

TEST(ChatCli, RendersEveryFixtureLikeTransformers) {
  const std::vector<std::string> files = fixture_files();
  ASSERT_FALSE(files.empty()) << "no fixtures under " << shared_path("fixtures/chat");
  for (const std::string& file : files) {
    const json fixture = read_fixture(file);
    for (bool gen : {true, false}) {
      const int i = first_case(fixture, gen);
      ASSERT_GE(i, 0) << file << ": no case with add_generation_prompt=" << gen;
      TempDir tmp;
      const json& c = fixture["cases"][i];
      RunResult r = render_case(tmp, fixture, c);
      ASSERT_EQ(r.exit_code, 0) << file << " case " << i << ": " << describe(r);
      EXPECT_EQ(r.out, c["expected"].get<std::string>()) << file << " case " << i;
    }
  }
}

// A template's raise_exception (Gemma refuses a system role) is an error carrying the template's message.
TEST(ChatCli, TemplateErrorsExitWithTheirMessage) {
  const std::vector<std::string> files = fixture_files();
  int checked = 0;
  for (const std::string& file : files) {
    const json fixture = read_fixture(file);
    for (const json& c : fixture["cases"]) {
      if (!c.contains("expected_error")) continue;
      TempDir tmp;
      RunResult r = render_case(tmp, fixture, c);
      EXPECT_EQ(r.exit_code, 1) << file << ": " << describe(r);
      EXPECT_TRUE(r.out.empty()) << file;
      const std::string message = c["expected_error"].get<std::string>().substr(std::strlen("TemplateError: "));
      EXPECT_THAT(r.err, HasSubstr(message)) << file;
      EXPECT_THAT(r.err, HasSubstr(tmp.path("template.jinja"))) << file;
      ++checked;
    }
  }
  EXPECT_GT(checked, 0) << "no fixture case expects an error";
}

// Content as a list of text parts (as OpenAI clients send it) renders as their concatenation, and the
// messages may come wrapped in {"messages": [...]}.
TEST(ChatCli, MessagesFileShapes) {
  const json fixture = read_fixture(shared_path("fixtures/chat/smollm2-instruct.json"));
  const json& c = fixture["cases"][first_case(fixture, true)];
  ASSERT_EQ(c["messages"].size(), 1u);
  const std::string content = c["messages"][0]["content"].get<std::string>();
  ASSERT_GE(content.size(), 2u);
  TempDir tmp;
  write_text(tmp.path("t.jinja"), fixture["template"].get<std::string>());
  json parts = json::array({{{"type", "text"}, {"text", content.substr(0, 2)}}, {{"type", "text"}, {"text", content.substr(2)}}});
  json as_parts = json::array({{{"role", c["messages"][0]["role"]}, {"content", parts}}});
  for (const json& messages : {as_parts, json{{"messages", c["messages"]}}, json{{"messages", as_parts}}}) {
    write_text(tmp.path("m.json"), messages.dump());
    RunResult r = run_polar({"chat-template", "--template", tmp.path("t.jinja"), "--messages", tmp.path("m.json"),
                             "--bos", "<|im_start|>", "--eos", "<|im_end|>"});
    ASSERT_EQ(r.exit_code, 0) << messages.dump() << ": " << describe(r);
    EXPECT_EQ(r.out, c["expected"].get<std::string>()) << messages.dump();
  }
}

// --var values are JSON where they parse as JSON, strings otherwise; bos/eos default to empty.
TEST(ChatCli, VariablesParseAsJsonElseString) {
  TempDir tmp;
  write_text(tmp.path("t.jinja"),
             "{{ a is string }} {{ a }}|{{ n + 1 }}|{{ l | tojson }}|{{ s is string }} {{ s }}|{{ b }}|"
             "{{ q }}|{{ e is string }}[{{ e }}]|[{{ bos_token }}][{{ eos_token }}]");
  write_text(tmp.path("m.json"), "[]");
  RunResult r = run_polar({"chat-template", "--template", tmp.path("t.jinja"), "--messages", tmp.path("m.json"),
                           "--var", "a=26 Jul 2024", "--var", "n=41", "--var", "l=[1, \"x\"]", "--var", "s=\"7\"",
                           "--var", "b=true", "--var", "q=x=y", "--var", "e="});
  ASSERT_EQ(r.exit_code, 0) << describe(r);
  EXPECT_EQ(r.out, "True 26 Jul 2024|42|[1, \"x\"]|True 7|True|x=y|True[]|[][]");
}

TEST(ChatCli, BadInputExitsWithAMessage) {
  TempDir tmp;
  write_text(tmp.path("t.jinja"), kTinyTemplate);
  write_text(tmp.path("ok.json"), R"([{"role": "user", "content": "hi"}])");
  const std::string ok = tmp.path("ok.json");
  auto with_messages = [&](const std::string& name, const std::string& text) {
    write_text(tmp.path(name), text);
    return std::vector<std::string>{"chat-template", "--template", tmp.path("t.jinja"), "--messages", tmp.path(name)};
  };
  auto with_var = [&](const std::string& var) {
    return std::vector<std::string>{"chat-template", "--template", tmp.path("t.jinja"), "--messages", ok, "--var", var};
  };
  auto with_template = [&](const std::string& name, const std::string& text) {
    write_text(tmp.path(name), text);
    return std::vector<std::string>{"chat-template", "--template", tmp.path(name), "--messages", ok};
  };
  const std::vector<std::pair<std::vector<std::string>, std::vector<std::string>>> cases = {
      {with_messages("malformed.json", R"([{"role": "user",)"), {"malformed.json", "malformed JSON"}},
      {with_messages("object.json", R"({"role": "user", "content": "hi"})"), {"object.json", "expected a list of messages"}},
      {with_messages("number.json", "42"), {"number.json", "expected a list of messages"}},
      {with_messages("inner.json", R"({"messages": {"role": "user"}})"), {"inner.json", "expected a list of messages"}},
      {with_messages("notobj.json", R"([{"role": "user", "content": "hi"}, "hello"])"), {"message 1", "not an object"}},
      {with_messages("norole.json", R"([{"content": "hi"}])"), {"message 0", "\"role\""}},
      {with_messages("content.json", R"([{"role": "user", "content": 5}])"), {"message 0", "content"}},
      {with_messages("image.json", R"([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])"),
       {"message 0", "'image_url'", "only text parts"}},
      {with_messages("notext.json", R"([{"role": "user", "content": [{"type": "text"}]}])"), {"message 0", "\"text\""}},
      {{"chat-template", "--template", tmp.path("t.jinja"), "--messages", tmp.path("absent.json")}, {"absent.json"}},
      {with_var("novalue"), {"--var 'novalue'", "NAME=VALUE"}},
      {with_var("=3"), {"--var '=3'", "NAME=VALUE"}},
      {with_var("1x=3"), {"'1x' is not a variable name"}},
      {with_var("a-b=3"), {"'a-b' is not a variable name"}},
      {with_var("messages=[]"), {"--var messages", "--messages"}},
      {with_var("add_generation_prompt=false"), {"--no-generation-prompt"}},
      {with_template("raise.jinja", "{{ raise_exception('no such luck') }}"), {"raise.jinja", "no such luck"}},
      {with_template("filter.jinja", "{{ messages | frobnicate }}"), {"filter.jinja", "frobnicate"}},
      {{"chat-template", "--template", tmp.path("absent.jinja"), "--messages", ok}, {"absent.jinja"}},
      {{"chat-template", "--messages", ok}, {"--model", "--template"}},
  };
  for (const auto& [args, wants] : cases) {
    RunResult r = run_polar(args);
    EXPECT_EQ(r.exit_code, 1) << describe(r);
    EXPECT_TRUE(r.out.empty()) << describe(r);
    for (const std::string& want : wants) EXPECT_THAT(r.err, HasSubstr(want)) << describe(r);
  }
  // --model and --template together, or no --messages: the parser's to report.
  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {"chat-template", "--model", shared_path(kGgufRel), "--template", tmp.path("t.jinja"), "--messages", ok},
           {"chat-template", "--template", tmp.path("t.jinja")}}) {
    RunResult r = run_polar(args);
    EXPECT_GT(r.exit_code, 0) << describe(r);
    EXPECT_LT(r.exit_code, 128) << describe(r);
    EXPECT_FALSE(r.err.empty());
  }
}

// ---- A model's own template.

TEST(ChatCli, ModelWithoutTemplateSaysToPassOne) {
  TempDir tmp;
  write_text(tmp.path("m.json"), R"([{"role": "user", "content": "hi"}])");
  for (const std::string& model : {shared_path(kGgufRel), shared_path(kHfRel)}) {
    RunResult r = run_polar({"chat-template", "--model", model, "--messages", tmp.path("m.json")});
    EXPECT_EQ(r.exit_code, 1) << describe(r);
    EXPECT_TRUE(r.out.empty());
    EXPECT_THAT(r.err, HasSubstr(model));
    EXPECT_THAT(r.err, HasSubstr("no chat template"));
    EXPECT_THAT(r.err, HasSubstr("--template"));
  }
}

TEST(ChatCli, RendersTheTemplateInAGguf) {
  TempDir tmp;
  const std::string model =
      gguf_with_metadata(tmp, "chat.gguf", {{"tokenizer.chat_template", gguf_string_value(kTinyTemplate)}});
  write_text(tmp.path("m.json"), R"([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}])");
  RunResult r = run_polar({"chat-template", "--model", model, "--messages", tmp.path("m.json")});
  ASSERT_EQ(r.exit_code, 0) << describe(r);
  EXPECT_EQ(r.out, "<s>[user] hi</s>\n[assistant] ho</s>\n[assistant] ");
  r = run_polar({"chat-template", "--model", model, "--messages", tmp.path("m.json"), "--no-generation-prompt",
                 "--bos", "", "--eos", "<end>"});
  ASSERT_EQ(r.exit_code, 0) << describe(r);
  EXPECT_EQ(r.out, "[user] hi<end>\n[assistant] ho<end>\n");
}

TEST(ChatCli, RendersTheTemplateOfAHfDirectory) {
  TempDir tmp;
  const std::string dir = tmp.path("hf");
  std::filesystem::copy(shared_path(kHfRel), dir, std::filesystem::copy_options::recursive);
  write_text(dir + "/tokenizer_config.json", json{{"chat_template", kTinyTemplate}}.dump());
  write_text(tmp.path("m.json"), R"({"messages": [{"role": "user", "content": "hi"}]})");
  RunResult r = run_polar({"chat-template", "--model", dir, "--messages", tmp.path("m.json"), "--bos", "<B>"});
  ASSERT_EQ(r.exit_code, 0) << describe(r);
  EXPECT_EQ(r.out, "<B>[user] hi\n[assistant] ");  // no tokenizer there: eos_token is empty
}

// The default model (scripts/fetch-model.sh) carries SmolLM2's template; checked where it has been fetched.
TEST(ChatCli, DefaultModelRendersLikeTheSmolLm2Fixture) {
  const std::string model =
      (std::filesystem::path(__FILE__).parent_path().parent_path() / "models/SmolLM2-135M-Instruct.Q4_1.gguf").string();
  if (!std::filesystem::exists(model)) GTEST_SKIP() << model << " not fetched";
  const json fixture = read_fixture(shared_path("fixtures/chat/smollm2-instruct.json"));
  for (bool gen : {true, false}) {
    const json& c = fixture["cases"][first_case(fixture, gen)];
    TempDir tmp;
    write_text(tmp.path("m.json"), c["messages"].dump());
    std::vector<std::string> args = {"chat-template", "--model", model, "--messages", tmp.path("m.json")};
    if (!gen) args.push_back("--no-generation-prompt");
    RunResult r = run_polar(args);
    ASSERT_EQ(r.exit_code, 0) << describe(r);
    EXPECT_EQ(r.out, c["expected"].get<std::string>());
  }
}

// ---- The library side: Checkpoint::chat_template and the BOS/EOS text.

TEST(CheckpointChatTemplate, FromGgufMetadata) {
  EXPECT_FALSE(load_checkpoint(shared_path(kGgufRel)).chat_template.has_value());
  TempDir tmp;
  const std::string path =
      gguf_with_metadata(tmp, "chat.gguf", {{"tokenizer.chat_template", gguf_string_value(kTinyTemplate)}});
  const Checkpoint ck = load_checkpoint(path);
  ASSERT_TRUE(ck.chat_template.has_value());
  EXPECT_EQ(*ck.chat_template, kTinyTemplate);
  // Everything else is as in the original file.
  const Checkpoint orig = load_checkpoint(shared_path(kGgufRel));
  EXPECT_EQ(ck.n_params(), orig.n_params());
  EXPECT_EQ(ck.weight_types, orig.weight_types);
  for (const auto& [name, t] : orig.tensors) {
    ASSERT_TRUE(ck.tensors.count(name)) << name;
    EXPECT_EQ(std::memcmp(ck.tensors.at(name).data<float>(), t.data<float>(), t.numel() * sizeof(float)), 0) << name;
  }
}

TEST(CheckpointChatTemplate, GgufTemplateOfAnotherTypeIsAnError) {
  TempDir tmp;
  const std::string path = gguf_with_metadata(tmp, "chat.gguf", {{"tokenizer.chat_template", {4, 0, 0, 0, 7, 0, 0, 0}}});
  const std::string err = test::error_of([&] { load_checkpoint(path); });
  EXPECT_THAT(err, HasSubstr(path));
  EXPECT_THAT(err, HasSubstr("tokenizer.chat_template"));
  EXPECT_THAT(err, HasSubstr("not a string"));
}

TEST(CheckpointChatTemplate, FromHfDirectory) {
  EXPECT_FALSE(load_checkpoint(shared_path(kHfRel)).chat_template.has_value());
  TempDir tmp;
  const std::string dir = tmp.path("hf");
  std::filesystem::copy(shared_path(kHfRel), dir, std::filesystem::copy_options::recursive);
  write_text(dir + "/tokenizer_config.json", json{{"bos_token", "<s>"}, {"chat_template", kTinyTemplate}}.dump());
  const Checkpoint ck = load_checkpoint(dir);
  ASSERT_TRUE(ck.chat_template.has_value());
  EXPECT_EQ(*ck.chat_template, kTinyTemplate);
  EXPECT_FALSE(ck.tensors.empty());
}

// load_checkpoint_metadata: everything but the tensors.
TEST(CheckpointChatTemplate, MetadataOnlyLoadSkipsTensors) {
  TempDir tmp;
  const std::string path =
      gguf_with_metadata(tmp, "chat.gguf", {{"tokenizer.chat_template", gguf_string_value(kTinyTemplate)}});
  for (const std::string& model : {path, shared_path(kHfRel)}) {
    const Checkpoint full = load_checkpoint(model), meta = load_checkpoint_metadata(model);
    EXPECT_TRUE(meta.tensors.empty()) << model;
    EXPECT_EQ(meta.config.describe(), full.config.describe()) << model;
    EXPECT_EQ(meta.weight_types, full.weight_types) << model;
    EXPECT_EQ(meta.chat_template, full.chat_template) << model;
    EXPECT_EQ(meta.tokenizer != nullptr, full.tokenizer != nullptr) << model;
  }
}

TEST(CheckpointChatTemplate, TokenizerBosEosText) {
  const Checkpoint ck = load_checkpoint_metadata(shared_path(kGgufRel));
  ASSERT_TRUE(ck.tokenizer);
  EXPECT_EQ(ck.tokenizer->bos_text(), "<s>");
  EXPECT_EQ(ck.tokenizer->eos_text(), "</s>");
  EXPECT_EQ(ck.tokenizer->bos_text(), ck.tokenizer->token_text(ck.tokenizer->bos_id()));
  // What the text encodes to is the token itself.
  EXPECT_EQ(ck.tokenizer->encode(ck.tokenizer->bos_text(), false), std::vector<int32_t>{ck.tokenizer->bos_id()});
  EXPECT_EQ(ck.tokenizer->encode(ck.tokenizer->eos_text(), false), std::vector<int32_t>{ck.tokenizer->eos_id()});
}

}  // namespace
