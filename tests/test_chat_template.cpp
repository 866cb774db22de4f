// The chat-template interpreter (io/chat_template.h): the fixtures' real templates rendered byte for byte as
// transformers does, each construct against what Jinja renders, and bad templates and runaway renders as
// errors naming the problem.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/chat_template.h"
#include "io/json.h"
#include "test_util.h"

using namespace polar;
using json = nlohmann::ordered_json;

namespace {

json read_fixture(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return json::parse(f);
}

// Renders src with no messages, bos_token <s>, eos_token </s> and `vars` (a JSON object) as variables.
std::string render(const std::string& src, const std::string& vars = "{}") {
  return ChatTemplate(src).render(json::array(), false, "<s>", "</s>", json::parse(vars));
}

// The message of the polar::Error that rendering (or parsing) src throws, or "(no error)".
std::string render_error(const std::string& src, const std::string& vars = "{}") {
  return test::error_of([&] { render(src, vars); });
}

std::string parse_error(const std::string& src) {
  return test::error_of([&] { ChatTemplate t(src); });
}

// ---- The fixtures: every case of every model family's template ----

struct FixtureCase {
  std::string file;  // under fixtures/chat
  size_t index;
};

std::vector<FixtureCase> fixture_cases() {
  std::vector<FixtureCase> cases;
  const std::filesystem::path dir = test::shared_path("fixtures/chat");
  if (!std::filesystem::is_directory(dir)) return cases;
  std::vector<std::string> files;
  for (const auto& entry : std::filesystem::directory_iterator(dir))
    if (entry.path().extension() == ".json") files.push_back(entry.path().filename().string());
  std::sort(files.begin(), files.end());
  for (const auto& file : files) {
    const json fixture = read_fixture((dir / file).string());
    for (size_t i = 0; i < fixture["cases"].size(); ++i) cases.push_back({file, i});
  }
  return cases;
}

class ChatTemplateFixture : public testing::TestWithParam<FixtureCase> {};

TEST_P(ChatTemplateFixture, RendersAsTransformers) {
  const json fixture = read_fixture(test::shared_path("fixtures/chat/" + GetParam().file));
  const json& c = fixture["cases"][GetParam().index];
  const ChatTemplate tmpl(fixture["template"].get<std::string>());
  auto token = [&](const char* name) { return fixture[name].is_string() ? fixture[name].get<std::string>() : ""; };
  auto run = [&] {
    return tmpl.render(c["messages"], c["add_generation_prompt"], token("bos_token"), token("eos_token"), c["kwargs"]);
  };
  if (c.contains("expected")) {
    EXPECT_EQ(run(), c["expected"].get<std::string>());
  } else {
    const std::string want = c["expected_error"].get<std::string>();
    const std::string prefix = "TemplateError: ";
    ASSERT_TRUE(want.starts_with(prefix)) << want;
    const std::string got = test::error_of([&] { run(); });
    EXPECT_NE(got.find(want.substr(prefix.size())), std::string::npos) << got;
  }
}

std::string fixture_case_name(const testing::TestParamInfo<FixtureCase>& info) {
  std::string name = info.param.file.substr(0, info.param.file.size() - 5) + "_" + std::to_string(info.param.index);
  for (char& ch : name)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return name;
}

INSTANTIATE_TEST_SUITE_P(ChatTemplates, ChatTemplateFixture, testing::ValuesIn(fixture_cases()), fixture_case_name);

TEST(ChatTemplateFixtures, AllFamiliesPresent) {
  // So that a missing shared directory fails rather than instantiating nothing.
  EXPECT_GE(fixture_cases().size(), 9u * 6u);
}

// ---- Each construct, against Jinja ----
// Each expected output is what jinja2 3.1 renders with transformers' settings (trim_blocks, lstrip_blocks,
// loopcontrols, its tojson and raise_exception), given the variables and messages=[], bos_token <s>,
// eos_token </s>, tools=none.

struct JinjaCase {
  const char* source;
  const char* vars;
  const char* expected;
};

const JinjaCase kJinjaCases[] = {
    // whitespace: trim_blocks, lstrip_blocks, - and + markers, comments, the final newline
    {"a\n{% if true %}\nb\n{% endif %}\nc\n", "{}", "a\nb\nc"},
    {"  {% if true %}\n  x\n  {% endif %}\n", "{}", "  x\n"},
    {"a  {% if true %}b{% endif %}", "{}", "a  b"},
    {"{{ s }}  {% if true %}b{% endif %}", "{\"s\": \"hi\"}", "hi  b"},
    {"x\n  {# note #}\ny", "{}", "x\ny"},
    {"a   {{- 'b' -}}   \n  c", "{}", "abc"},
    {"a\n  {%- if true -%}\n  b\n  {%- endif %}\nc", "{}", "abc"},
    {"a\n  {%+ if true %}b{% endif +%}\nc", "{}", "a\n  b\nc"},
    {"{%- if true %}\n\n{{ 'x' }}\n{% endif -%}\n\n", "{}", "\nx\n"},
    {"a {#- c -#}   b", "{}", "ab"},
    {"x\r\ny\rz\n", "{}", "x\ny\nz"},
    {"x\n\n", "{}", "x\n"},
    {"\t{% for i in [1, 2] %}\n\t{{ i }}\n\t{% endfor %}\n", "{}", "\t1\n\t2\n"},
    // literals
    {"{{ 'a\\'b' }}|{{ \"q\\\"\" }}|{{ 'tab\\there' }}|{{ '\\x41\\u00e9\\U0001F642' }}|{{ 'keep\\d' }}|{{ 'a' 'b' }}",
     "{}", "a'b|q\"|tab\there|Aé🙂|keep\\d|ab"},
    {"{{ 42 }} {{ 1_000 }} {{ 4.5 }} {{ 1e3 }} {{ 2.5e-3 }} {{ 1e20 }} {{ 0.1 + 0.2 }} {{ 10 / 4 }} {{ 1.0 }}", "{}",
     "42 1000 4.5 1000.0 0.0025 1e+20 0.30000000000000004 2.5 1.0"},
    {"{{ true }} {{ True }} {{ false }} {{ none }} {{ None }}", "{}", "True True False None None"},
    {"{{ [1, 'a', [none, true]] }} {{ {'k': 'v', 'n': 1} }} {{ (1, 2) }} {{ (1,) }} {{ () }} {{ [] }}", "{}",
     "[1, 'a', [None, True]] {'k': 'v', 'n': 1} (1, 2) (1,) () []"},
    {"{{ 'it\\'s' }} {{ ['it\\'s', 'a\"b', 'x\\ny'] }}", "{}", "it's [\"it's\", 'a\"b', 'x\\ny']"},
    // arithmetic and strings
    {"{{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % -3 }} {{ -7 % 3 }} {{ 7.5 // 2 }} {{ 2 ** 10 }} {{ 2 ** -1 }} {{ -3 }} {{ +3 "
     "}}",
     "{}", "3 -4 -2 2 3.0 1024 0.5 -3 3"},
    {"{{ 'a' + 'b' }} {{ 'a' ~ 1 ~ none ~ true }} {{ 'ab' * 3 }} {{ [1] * 3 }} {{ [1, 2] + [3] }} {{ 1 + 2 * 3 - 4 }}",
     "{}", "ab a1NoneTrue ababab [1, 1, 1] [1, 2, 3] 3"},
    {"{{ 1 + true }} {{ 3 * 1.5 }} {{ 1 == 1.0 }} {{ true == 1 }} {{ 'a' < 'b' }} {{ [1, 2] < [1, 3] }}", "{}",
     "2 4.5 True True True True"},
    {"{{ 1 < 2 < 3 }} {{ 3 > 2 > 2 }} {{ 1 != 2 }} {{ 2 >= 2 }}", "{}", "True False True True"},
    {"{{ 'b' in 'abc' }} {{ 2 in [1, 2] }} {{ 'k' in {'k': 1} }} {{ 'z' not in 'abc' }} {{ 'x' in undefined_thing }}",
     "{}", "True True True True False"},
    {"{{ 'x' and 'y' }} {{ '' or 'fallback' }} {{ 0 or none }} {{ not 0 }} {{ not not 'a' }}", "{}",
     "y fallback None True True"},
    {"{{ 'yes' if 1 else 'no' }} {{ 'yes' if 0 else 'no' }} [{{ 'yes' if 0 }}] {{ 'a' if 0 else 'b' if 1 else 'c' }}",
     "{}", "yes no [] b"},
    // variables, attributes, subscripts, slices, undefined
    {"{{ m.role }} {{ m['content'] }} {{ m.missing }}|{{ l[0] }} {{ l[-1] }} {{ l[9] }}|{{ l.0 }}",
     "{\"m\": {\"role\": \"user\", \"content\": \"hi\"}, \"l\": [1, 2, 3]}", "user hi |1 3 |1"},
    {"{{ l[1:] }} {{ l[:-1] }} {{ l[::-1] }} {{ l[::2] }} {{ l[5:] }} {{ l[-100:1] }} {{ s[1:3] }} {{ s[::-1] }}",
     "{\"l\": [1, 2, 3, 4], \"s\": \"héllo\"}", "[2, 3, 4] [1, 2, 3] [4, 3, 2, 1] [1, 3] [] [1] él olléh"},
    {"{{ s[1] }} {{ s|length }} {{ s[-1] }}", "{\"s\": \"日本語\"}", "本 3 語"},
    {"[{{ nothing }}] {{ nothing is defined }} {{ nothing is undefined }} {{ nothing|length }} {{ nothing|default('d') "
     "}} {% for x in nothing %}never{% endfor %}{{ 'end' }}",
     "{}", "[] False True 0 d end"},
    {"{{ m.content.content is defined }} {{ m.role.upper() }}", "{\"m\": {\"role\": \"user\", \"content\": \"text\"}}",
     "False USER"},
    {"{{ messages|length }} {{ add_generation_prompt }} {{ bos_token }}{{ eos_token }} {{ tools }}", "{}",
     "0 False <s></s> None"},
    // tests
    {"{{ s is string }} {{ n is number }} {{ f is float }} {{ n is integer }} {{ b is boolean }} {{ b is true }} {{ b "
     "is false }} {{ z is none }} {{ d is mapping }} {{ l is sequence }} {{ s is iterable }} {{ d is iterable }} {{ n "
     "is iterable }}",
     "{\"s\": \"x\", \"n\": 3, \"f\": 1.5, \"b\": true, \"z\": null, \"d\": {}, \"l\": []}",
     "True True True True True True False True True True True True False"},
    {"{{ 3 is odd }} {{ 4 is even }} {{ 9 is divisibleby 3 }} {{ 9 is divisibleby(4) }} {{ 'a' is equalto 'a' }} {{ 2 "
     "is eq 3 }} {{ 1 is lt 2 }} {{ 3 is ge 4 }} {{ 1 is in [1] }} {{ none is sameas none }}",
     "{}", "True True True False True False True False True True"},
    {"{{ 'abc' is lower }} {{ 'ABC' is upper }} {{ 'aB' is lower }} {{ x is not defined }} {{ 1 is not none }}", "{}",
     "True True False True True"},
    // filters
    {"[{{ '  x \\n'|trim }}] [{{ 'xxaxx'|trim('x') }}] [{{ ' wide　'|trim }}]", "{}", "[x] [a] [wide]"},
    {"{{ 'Hello'|upper }} {{ 'Hello'|lower }} {{ 'hello-world foo(bar)'|title }} {{ 'aBC dEF'|capitalize }}", "{}",
     "HELLO hello Hello-World Foo(Bar) Abc def"},
    {"{{ [1, 2, 3]|length }} {{ {'a': 1}|count }} {{ 'hé'|length }}", "{}", "3 1 2"},
    {"{{ [1, 2, 3]|join(', ') }} {{ ['a', 'b']|join }} {{ [{'n': 'x'}, {'n': 'y'}]|join('-', attribute='n') }}", "{}",
     "1, 2, 3 ab x-y"},
    {"{{ none|default('d') }} {{ ''|default('d') }} {{ ''|default('d', true) }} {{ missing|d('m') }} {{ 0|default(5, "
     "boolean=true) }}",
     "{}", "None  d m 5"},
    {"{{ [3, 1, 2]|first }} {{ [3, 1, 2]|last }} {{ 'abc'|first }} {{ 'abc'|list }} {{ {'k': 1, 'j': 2}|list }} {{ "
     "[]|first is defined }}",
     "{}", "3 2 a ['a', 'b', 'c'] ['k', 'j'] False"},
    {"{{ 1|string ~ 2 }} {{ [1, 'a']|string }} {{ '42'|int + 1 }} {{ '3.7'|int }} {{ 'x'|int }} {{ 'x'|int(7) }} {{ "
     "3.9|int }} {{ '0x1A'|int(0, 16) }} {{ '2.5'|float }} {{ 'no'|float }} {{ 2|float }}",
     "{}", "12 [1, 'a'] 43 3 0 7 3 26 2.5 0.0 2.0"},
    {"{{ 'a-b-c'|replace('-', '+') }} {{ 'a-b-c'|replace('-', '', 1) }} {{ 'ab'|replace('', '.') }}", "{}",
     "a+b+c ab-c .a.b."},
    {"{{ [1, 2, 3, 4]|select('odd')|list }} {{ [1, 2, 3, 4]|reject('odd')|list }} {{ ['a', 'b', 'a']|reject('equalto', "
     "'a')|list }} {{ [0, 1, '', 'x']|select|list }}",
     "{}", "[1, 3] [2, 4] ['b'] [1, 'x']"},
    {"{{ ms|selectattr('role', 'equalto', 'user')|list|length }} {{ ms|rejectattr('role', 'equalto', "
     "'user')|map(attribute='content')|list }} {{ ms|selectattr('tool')|list }} {{ ms|map(attribute='content')|join(' "
     "') }}",
     "{\"ms\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}, {\"role\": "
     "\"user\", \"content\": \"c\"}]}",
     "2 ['b'] [] a b c"},
    {"{{ ms|map(attribute='f.name')|list }} {{ ms|map(attribute='nope', default='-')|list }} {{ [1, "
     "2]|map('string')|list }} {{ ['a', 'b']|map('upper')|join }}",
     "{\"ms\": [{\"f\": {\"name\": \"x\"}}, {\"f\": {\"name\": \"y\"}}]}", "['x', 'y'] ['-', '-'] ['1', '2'] AB"},
    {"{% for k, v in d|items %}{{ k }}={{ v }};{% endfor %} {{ d|items|list }} {{ d|dictsort }} {{ "
     "d|dictsort(reverse=true) }} {{ d|dictsort(by='value') }}",
     "{\"d\": {\"b\": 2, \"a\": 3, \"c\": 1}}",
     "b=2;a=3;c=1; [('b', 2), ('a', 3), ('c', 1)] [('a', 3), ('b', 2), ('c', 1)] [('c', 1), ('b', 2), ('a', 3)] [('c', "
     "1), ('b', 2), ('a', 3)]"},
    {"{{ 'x'|safe }} {{ 'a\\nb\\n\\nc'|indent }} | {{ 'a\\nb'|indent(2, true) }} | {{ 'a\\n\\nb'|indent(2, blank=true) "
     "}} | {{ 'a\\nb\\n'|indent('> ') }}",
     "{}", "x a\n    b\n\n    c |   a\n  b | a\n  \n  b | a\n> b\n"},
    {"{{ 2.5|round }} {{ 3.5|round }} {{ 2.567|round(2) }} {{ 2.1|round(0, 'ceil') }} {{ 2.9|round(method='floor') }} "
     "{{ 7|round }} {{ -3|abs }} {{ -2.5|abs }}",
     "{}", "2.0 4.0 2.57 3.0 2.0 7 3 2.5"},
    {"{{ ['b', 'A', 'a', 'B']|unique|list }} {{ ['b', 'A', 'a']|unique(true)|list }} {{ [3, 1, 2]|sort }} {{ ['b', "
     "'A', 'c']|sort }} {{ ['b', 'A', 'c']|sort(case_sensitive=true) }} {{ [1, 3, 2]|sort(reverse=true) }}",
     "{}", "['b', 'A'] ['b', 'A', 'a'] [1, 2, 3] ['A', 'b', 'c'] ['A', 'b', 'c'] [3, 2, 1]"},
    {"{{ ps|sort(attribute='age')|map(attribute='name')|join(',') }} {{ [1, 2, 3]|reverse|list }} {{ 'abc'|reverse }}",
     "{\"ps\": [{\"name\": \"a\", \"age\": 30}, {\"name\": \"b\", \"age\": 20}]}", "b,a [3, 2, 1] cba"},
    // tojson
    {"{{ v|tojson }}",
     "{\"v\": {\"name\": \"f\", \"args\": [1, 2.5, null, true, \"é日 \\\"q\\\" \\\\ \\n\\t\\u0001\"], \"nested\": "
     "{\"e\": [], \"o\": {}}}}",
     "{\"name\": \"f\", \"args\": [1, 2.5, null, true, \"é日 \\\"q\\\" \\\\ \\n\\t\\u0001\"], \"nested\": {\"e\": [], "
     "\"o\": {}}}"},
    {"{{ v|tojson(indent=4) }}",
     "{\"v\": {\"name\": \"f\", \"parameters\": {\"type\": \"object\", \"properties\": {\"x\": {\"type\": "
     "\"integer\"}}, \"required\": [\"x\"]}, \"e\": [], \"o\": {}}}",
     "{\n    \"name\": \"f\",\n    \"parameters\": {\n        \"type\": \"object\",\n        \"properties\": {\n       "
     "     \"x\": {\n                \"type\": \"integer\"\n            }\n        },\n        \"required\": [\n       "
     "     \"x\"\n        ]\n    },\n    \"e\": [],\n    \"o\": {}\n}"},
    {"{{ v|tojson(indent=2, sort_keys=true) }} {{ v|tojson(ensure_ascii=true) }} {{ v|tojson(separators=(',', ':')) }}",
     "{\"v\": {\"z\": \"é🙂\", \"a\": [1, 2]}}",
     "{\n  \"a\": [\n    1,\n    2\n  ],\n  \"z\": \"é🙂\"\n} {\"z\": \"\\u00e9\\ud83d\\ude42\", \"a\": [1, 2]} "
     "{\"z\":\"é🙂\",\"a\":[1,2]}"},
    {"{{ 'x'|tojson }} {{ 1.0|tojson }} {{ 1e100|tojson }} {{ none|tojson }} {{ (1, 2)|tojson }}", "{}",
     "\"x\" 1.0 1e+100 null [1, 2]"},
    // methods
    {"[{{ '  a b  '.strip() }}] [{{ '  a '.lstrip() }}] [{{ ' a  '.rstrip() }}] [{{ 'xxaxx'.strip('x') }}] [{{ "
     "'abc'.rstrip('c') }}]",
     "{}", "[a b] [a ] [ a] [a] [ab]"},
    {"{{ 'hello'.startswith('he') }} {{ 'hello'.endswith('lo') }} {{ 'hello'.startswith(('x', 'h')) }} {{ "
     "'hello'.endswith('x') }}",
     "{}", "True True True False"},
    {"{{ 'a,b,,c'.split(',') }} {{ ' a  b \\n c '.split() }} {{ 'a,b,c'.split(',', 1) }} {{ 'a b c'.split(none, 1) }} "
     "{{ ''.split() }} {{ ''.split(',') }}",
     "{}", "['a', 'b', '', 'c'] ['a', 'b', 'c'] ['a', 'b,c'] ['a', 'b c'] [] ['']"},
    {"{{ 'Hi'.upper() }} {{ 'Hi'.lower() }} {{ \"they're bill's\".title() }} {{ 'hELLO'.capitalize() }} {{ "
     "'a-b'.replace('-', '=') }} {{ ', '.join(['x', 'y']) }}",
     "{}", "HI hi They'Re Bill'S Hello a=b x, y"},
    {"{% for k, v in d.items() %}{{ k }}:{{ v }} {% endfor %}{{ d.keys()|list }} {{ d.values()|list }} {{ d.get('a') "
     "}} {{ d.get('z') }} {{ d.get('z', 'dflt') }}",
     "{\"d\": {\"a\": 1, \"b\": 2}}", "a:1 b:2 ['a', 'b'] [1, 2] 1 None dflt"},
    // for loops
    {"{% for x in ['a', 'b', 'c'] %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.revindex0 }}{{ "
     "loop.first }}{{ loop.last }}{{ loop.length }} {% endfor %}",
     "{}", "1032TrueFalse3 2121FalseFalse3 3210FalseTrue3 "},
    {"{% for x in [1, 2, 3] %}{{ loop.previtem is defined }}{{ loop.previtem }}-{{ loop.nextitem }} {% endfor %}", "{}",
     "False-2 True1-3 True2- "},
    {"{% for x in range(10) if x is odd %}{{ x }}/{{ loop.index }}/{{ loop.length }} {% endfor %}", "{}",
     "1/1/5 3/2/5 5/3/5 7/4/5 9/5/5 "},
    {"{% for a, b in [[1, 2], [3, 4]] %}{{ a + b }} {% endfor %}{% for (a, b) in [(5, 6)] %}{{ a * b }}{% endfor %}",
     "{}", "3 7 30"},
    {"{% for x in [] %}x{% else %}empty{% endfor %} {% for x in [1] %}x{% else %}empty{% endfor %}", "{}", "empty x"},
    {"{% for x in range(10) %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 5 %}{% break %}{% endif %}{{ x }}{% "
     "endfor %}",
     "{}", "0134"},
    {"{% for i in range(2) %}{% for j in range(3) %}{% if j == 1 %}{% break %}{% endif %}{{ i }}{{ j }} {% endfor %}{% "
     "endfor %}",
     "{}", "00 10 "},
    {"{{ range(3)|list }} {{ range(1, 7, 2)|list }} {{ range(5, 0, -2)|list }} {{ range(0)|list }} {{ range(3, 1)|list "
     "}}",
     "{}", "[0, 1, 2] [1, 3, 5] [5, 3, 1] [] []"},
    {"{% for c in 'hé!' %}[{{ c }}]{% endfor %} {% for k in {'x': 1, 'y': 2} %}{{ k }}{% endfor %}", "{}",
     "[h][é][!] xy"},
    {"{% for x in 'ab' %}{{ loop.cycle('odd', 'even') }} {% endfor %}", "{}", "odd even "},
    // scoping and set
    {"{% set x = 0 %}{% for i in range(3) %}{{ x }}{% set x = i %}{{ x }}{% endfor %}{{ x }}", "{}", "0001020"},
    {"{% for i in range(3) %}{% if i == 0 %}{% set y = 5 %}{% endif %}[{{ y }}]{% endfor %}", "{}", "[5][][]"},
    {"{% if true %}{% set z = 'set in if' %}{% endif %}{{ z }}", "{}", "set in if"},
    {"{% set ns = namespace(count=0, found=false) %}{% for i in range(4) %}{% set ns.count = ns.count + i %}{% if i == "
     "2 %}{% set ns.found = true %}{% endif %}{% endfor %}{{ ns.count }} {{ ns.found }} {{ ns.missing is defined }}",
     "{}", "6 True False"},
    {"{% set ns = namespace() %}{% set ns.index = 0 %}{% set ns.index = ns.index + 1 %}{{ ns.index }}", "{}", "1"},
    {"{% set a, b = 1, 2 %}{{ a }}{{ b }} {% set t = 1, 2 %}{{ t }}", "{}", "12 (1, 2)"},
    {"{% set block %}\n  inner {{ 1 + 1 }}\n{% endset %}[{{ block }}]", "{}", "[  inner 2\n]"},
    {"{% set messages = messages[1:] %}{{ messages|length }}", "{}", "0"},
    // macros and generation blocks
    {"{% macro greet(name, punct='!') %}Hello {{ name }}{{ punct }}{% endmacro %}{{ greet('a') }} {{ greet('b', '?') "
     "}} {{ greet(punct='.', name='c') }} {{ greet() }}",
     "{}", "Hello a! Hello b? Hello c. Hello !"},
    {"{% set g = 'global' %}{% macro show() %}{{ g }}{% endmacro %}{% for i in [1] %}{% set g = 'loop' %}{{ show() "
     "}}{% endfor %}",
     "{}", "global"},
    {"{% macro fact(n) %}{% if n <= 1 %}1{% else %}{{ n * fact(n - 1)|int }}{% endif %}{% endmacro %}{{ fact(5) }}",
     "{}", "120"},
};

TEST(ChatTemplate, RendersAsJinja) {
  for (const auto& c : kJinjaCases) {
    SCOPED_TRACE(c.source);
    try {
      EXPECT_EQ(render(c.source, c.vars), c.expected);
    } catch (const Error& e) {
      ADD_FAILURE() << e.what();
    }
  }
}

TEST(ChatTemplate, GenerationBlockRendersItsBody) {
  // transformers' {% generation %} marks the assistant's text (for its masks); rendering keeps it as is.
  EXPECT_EQ(render("a{% generation %}b{{ 'c' }}{% endgeneration %}d"), "abcd");
}

TEST(ChatTemplate, DictsKeepTheirOrder) {
  const ChatTemplate t("{{ tools[0]|tojson }}|{% for k in tools[0] %}{{ k }}{% endfor %}");
  json tools = json::array({json::object()});
  tools[0]["name"] = "f";
  tools[0]["description"] = "d";
  tools[0]["arguments"] = json::object();
  EXPECT_EQ(t.render(json::array(), false, "", "", {{"tools", tools}}),
            R"({"name": "f", "description": "d", "arguments": {}}|namedescriptionarguments)");
}

TEST(ChatTemplate, ExtraVariablesOverrideTheDefaults) {
  const ChatTemplate t("{{ bos_token }}|{{ tools }}|{{ messages|length }}|{{ add_generation_prompt }}");
  EXPECT_EQ(t.render(json::array({{{"role", "user"}, {"content", "x"}}}), true, "<s>", "</s>",
                     {{"bos_token", "B"}, {"tools", json::array()}, {"messages", json::array()}}),
            "B|[]|1|True");
}

TEST(ChatTemplate, StrftimeNowFormatsToday) {
  const std::string year = render("{{ strftime_now('%Y') }}");
  ASSERT_EQ(year.size(), 4u);
  EXPECT_GE(std::stoi(year), 2024);
  EXPECT_EQ(render("{{ strftime_now('') }}"), "");
}

TEST(ChatTemplate, RaiseExceptionFailsWithItsMessage) {
  const std::string err =
      render_error("line one\n{% if true %}\n{{ raise_exception('Roles must alternate') }}\n{% endif %}");
  EXPECT_NE(err.find("Roles must alternate"), std::string::npos) << err;
  EXPECT_NE(err.find("line 3"), std::string::npos) << err;
}

TEST(ChatTemplate, UndefinedFailsWhereJinjaDoes) {
  EXPECT_NE(render_error("{{ x.y }}").find("'x' is undefined"), std::string::npos);
  EXPECT_NE(render_error("{{ d.a.b }}", R"({"d": {}})").find("'dict object' has no attribute 'a'"), std::string::npos);
  EXPECT_NE(render_error("{{ x + 1 }}").find("'x' is undefined"), std::string::npos);
  EXPECT_NE(render_error("{{ x|tojson }}").find("not JSON serializable"), std::string::npos);
  EXPECT_NE(render_error("{{ 1 + 'a' }}").find("unsupported operand"), std::string::npos);
  EXPECT_NE(render_error("{{ 1 // 0 }}").find("by zero"), std::string::npos);
  EXPECT_NE(render_error("{{ 9223372036854775807 + 1 }}").find("overflow"), std::string::npos);
}

// ---- Bad templates: errors naming the construct and its line ----

TEST(ChatTemplateBadInput, UnclosedBlocksNameTheOpeningLine) {
  std::string err = parse_error("a\n{% for m in messages %}\n{{ m }}");
  EXPECT_NE(err.find("line 2"), std::string::npos) << err;
  EXPECT_NE(err.find("'for' is never closed (expected 'endfor')"), std::string::npos) << err;
  err = parse_error("{% if x %}a{% else %}b");
  EXPECT_NE(err.find("'if' is never closed"), std::string::npos) << err;
  err = parse_error("{% macro m() %}");
  EXPECT_NE(err.find("'macro' is never closed"), std::string::npos) << err;
  EXPECT_NE(parse_error("x\n{{ messages ").find("line 2: '{{' is never closed"), std::string::npos);
  EXPECT_NE(parse_error("{% if x ").find("'{%' is never closed"), std::string::npos);
  EXPECT_NE(parse_error("{# note").find("comment"), std::string::npos);
  EXPECT_NE(parse_error("{{ 'abc }}").find("string literal is never closed"), std::string::npos);
  EXPECT_NE(parse_error("{% endif %}").find("unexpected 'endif'"), std::string::npos);
  EXPECT_NE(parse_error("{% if x %}{% endfor %}{% endif %}").find("unexpected 'endfor'"), std::string::npos);
}

TEST(ChatTemplateBadInput, UnknownNamesAreErrorsAtParseTime) {
  auto expect_parse_error = [](const std::string& src, const std::string& needle) {
    const std::string err = parse_error(src);
    EXPECT_NE(err.find(needle), std::string::npos) << src << ": " << err;
    EXPECT_NE(err.find("line 2"), std::string::npos) << src << ": " << err;
  };
  expect_parse_error("ok\n{{ x | frobnicate }}", "unknown filter 'frobnicate'");
  expect_parse_error("ok\n{{ x is frobnicated }}", "unknown test 'frobnicated'");
  expect_parse_error("ok\n{% frob %}", "unknown statement 'frob'");
  expect_parse_error("ok\n{% include 'other.jinja' %}", "unsupported statement 'include'");
  expect_parse_error("ok\n{% filter upper %}x{% endfilter %}", "unsupported statement 'filter'");
  expect_parse_error("ok\n{{ x.frob() }}", "unknown method 'frob'");
  expect_parse_error("ok\n{{ frob(1) }}", "unknown function 'frob'");
  expect_parse_error("ok\n{% for x in y recursive %}{% endfor %}", "recursive loops are not supported");
  expect_parse_error("ok\n{% break %}", "'break' outside a loop");
  expect_parse_error("ok\n{% for x in y %}{% macro m() %}{% continue %}{% endmacro %}{% endfor %}",
                     "'continue' outside a loop");
  expect_parse_error("ok\n{{ 1 + }}", "unexpected '}}'");
  expect_parse_error("ok\n{{ x is divisibleby }}", "test 'divisibleby' takes 1 argument");
  expect_parse_error("ok\n{{ x $ y }}", "unexpected character '$'");
  expect_parse_error("ok\n{{ x[0](1) }}", "only functions, macros and methods can be called");
  expect_parse_error("ok\n{{ f(a=1, 2) }}", "positional argument after a keyword argument");
  expect_parse_error("ok\n{{ 99999999999999999999 }}", "too large");
}

TEST(ChatTemplateBadInput, ArgumentErrorsAtRenderTime) {
  EXPECT_NE(render_error("{{ 'x'|trim(1, 2) }}").find("trim takes at most 1 arguments"), std::string::npos);
  EXPECT_NE(render_error("{{ x|tojson(indnet=2) }}", R"({"x": 1})").find("tojson has no argument 'indnet'"),
            std::string::npos);
  EXPECT_NE(render_error("{{ [1]|map('frob')|list }}").find("no filter named 'frob'"), std::string::npos);
  EXPECT_NE(render_error("{% for a, b in [1] %}{% endfor %}").find("cannot unpack"), std::string::npos);
  EXPECT_NE(render_error("{% for x in 5 %}{% endfor %}").find("'int' object is not iterable"), std::string::npos);
  EXPECT_NE(render_error("{{ [1].strip() }}").find("'list' object has no method 'strip'"), std::string::npos);
  EXPECT_NE(render_error("{% set x = 1 %}{% set x.y = 2 %}").find("not a namespace"), std::string::npos);
  // A filter's argument not given (found by fuzz_chat_template: Undefined without a reason was dereferenced).
  EXPECT_NE(render_error("{{ [1]|map }}").find("map's attribute is missing"), std::string::npos);
  EXPECT_NE(render_error("{{ 'ab'.startswith() }}").find("startswith's prefix is missing"), std::string::npos);
  EXPECT_NE(render_error("{{ raise_exception() }}").find("line 1"), std::string::npos);
  // A test named at render time takes as many arguments as written (found by fuzz_chat_template: read past
  // the arguments given).
  EXPECT_NE(render_error("{{ [{'role': 'x'}]|rejectattr('role', 'in')|list }}").find("test 'in' takes 1 argument"),
            std::string::npos);
  EXPECT_NE(render_error("{{ [1]|select('odd', 2)|list }}").find("test 'odd' takes 0 argument"), std::string::npos);
}

// ---- Runaway templates: bounded errors, not hangs, crashes or exhausted memory ----

TEST(ChatTemplateBadInput, RunawayLoopsStop) {
  // Whichever budget runs out first: the steps, or the bytes of the lists each range() builds.
  for (const char* src : {"{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                          "{% for i in range(1000000) %}{% for j in range(10) %}{{ '' }}{% endfor %}{% endfor %}"}) {
    const std::string err = render_error(src);
    EXPECT_TRUE(err.find("steps") != std::string::npos || err.find("MiB") != std::string::npos) << err;
  }
  EXPECT_NE(render_error("{% set ns = namespace(n=0) %}{% for i in range(100000) %}{% for j in range(100) %}"
                         "{% set ns.n = ns.n + 1 %}{% endfor %}{% endfor %}")
                .find("steps"),
            std::string::npos);
  EXPECT_NE(render_error("{{ range(10 ** 18)|length }}").find("steps"), std::string::npos);
  EXPECT_NE(render_error("{{ ([1] * 1000000000)|length }}").find("MiB"), std::string::npos);
  // Repeating an empty sequence, or a slice's huge step, takes no time (and no overflow).
  EXPECT_EQ(render("{{ ('' * 10 ** 18)|length }} {{ [] * 10 ** 18 }}"), "0 []");
  EXPECT_EQ(render("{{ [1, 2, 3][1::9223372036854775807] }} {{ 'abc'[-1::-9223372036854775807] }}"), "[2] c");
}

TEST(ChatTemplateBadInput, HugeOutputStops) {
  std::string err = render_error("{% set s = 'x' * 1000000 %}{% for i in range(1000) %}{{ s }}{% endfor %}");
  EXPECT_NE(err.find("MiB"), std::string::npos) << err;
  err = render_error("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}");
  EXPECT_NE(err.find("MiB"), std::string::npos) << err;
  EXPECT_NE(render_error("{{ 'x' * 10 ** 15 }}").find("MiB"), std::string::npos);
}

TEST(ChatTemplateBadInput, DeepNestingIsAnError) {
  EXPECT_NE(parse_error("{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}").find("nested deeper"),
            std::string::npos);
  EXPECT_NE(parse_error("{{ " + std::string(5000, '[') + std::string(5000, ']') + " }}").find("nested deeper"),
            std::string::npos);
  EXPECT_NE(parse_error("{{ " + std::string(5000, '-') + "1 }}").find("nested deeper"), std::string::npos);
  std::string chain = "{{ a";
  for (int i = 0; i < 100000; ++i) chain += " + a";
  EXPECT_NE(parse_error(chain + " }}").find("expression nested deeper"), std::string::npos);
  std::string filters = "{{ a";
  for (int i = 0; i < 100000; ++i) filters += "|trim";
  EXPECT_NE(parse_error(filters + " }}").find("expression nested deeper"), std::string::npos);
  std::string blocks;
  for (int i = 0; i < 5000; ++i) blocks += "{% if x %}";
  EXPECT_NE(parse_error(blocks).find("nested deeper"), std::string::npos);
}

TEST(ChatTemplateBadInput, RunawayRecursionStops) {
  const std::string err = render_error("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}");
  EXPECT_NE(err.find("nests deeper"), std::string::npos) << err;
}

TEST(ChatTemplateBadInput, ValuesCannotNestWithoutBound) {
  EXPECT_NE(render_error("{% set ns = namespace(l=[]) %}{% for i in range(1000) %}{% set ns.l = [ns.l] %}{% endfor %}")
                .find("nest deeper"),
            std::string::npos);
  EXPECT_NE(render_error("{% set ns = namespace() %}{% set ns.self = ns %}").find("cannot hold a namespace"),
            std::string::npos);
  EXPECT_NE(render_error("{% set ns = namespace() %}{% set ns.l = [ns] %}").find("cannot hold a namespace"),
            std::string::npos);
}

// ---- Finding a model's template ----

void write_text(const std::string& path, const std::string& text) {
  test::write_bytes(path, std::vector<uint8_t>(text.begin(), text.end()));
}

TEST(ChatTemplateHfDir, ReadsTokenizerConfigAndTheJinjaFile) {
  {
    test::TempDir dir;
    EXPECT_FALSE(chat_template_from_hf_dir(dir.path("")).has_value());
    write_text(dir.path("tokenizer_config.json"), R"({"bos_token": "<s>"})");
    EXPECT_FALSE(chat_template_from_hf_dir(dir.path("")).has_value());
    write_text(dir.path("tokenizer_config.json"), R"({"chat_template": "{{ bos_token }}x"})");
    EXPECT_EQ(chat_template_from_hf_dir(dir.path("")), "{{ bos_token }}x");
    write_text(dir.path("chat_template.jinja"), "{{ messages }}\n");
    EXPECT_EQ(chat_template_from_hf_dir(dir.path("")), "{{ messages }}\n");
  }
  {
    test::TempDir dir;
    write_text(dir.path("tokenizer_config.json"),
               R"({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]})");
    EXPECT_EQ(chat_template_from_hf_dir(dir.path("")), "D");
    write_text(dir.path("tokenizer_config.json"), R"({"chat_template": [{"name": "tool_use", "template": "T"}]})");
    EXPECT_NE(test::error_of([&] { chat_template_from_hf_dir(dir.path("")); }).find("named 'default'"),
              std::string::npos);
    write_text(dir.path("tokenizer_config.json"), "{not json");
    EXPECT_NE(test::error_of([&] { chat_template_from_hf_dir(dir.path("")); }).find("not valid JSON"),
              std::string::npos);
  }
  {
    test::TempDir dir;
    write_text(dir.path("chat_template.json"), R"({"chat_template": "P"})");
    EXPECT_EQ(chat_template_from_hf_dir(dir.path("")), "P");
  }
}

}  // namespace
