// The Jinja subset of chat templates (chat_template.h): a lexer applying Jinja's whitespace rules as
// transformers configures them, a recursive-descent parser into a tree, and a tree-walking renderer over
// Python-like values (what Jinja templates compute with: str, int, float, bool, None, list, tuple, dict).
//
// Not supported (each an error at parse time naming it): {% call %}, {% filter %}, {% include %} and other
// statements beyond for/if/set/macro/break/continue/generation; recursive loops; filters, tests, methods and
// functions outside the tables below; macro varargs/kwargs/caller. Case conversions (upper, lower, title,
// capitalize) change ASCII letters only, and Python's repr is approximated for non-ASCII control characters.
#include "io/chat_template.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "core/error.h"
#include "io/json.h"

namespace polar {
namespace {

using ojson = nlohmann::ordered_json;

// ---- Limits ----
// Rendering: a real template takes 20 to 60 steps per message (the fixtures' fit 33k to 95k messages) and
// copies each message's text a few times, so these allow conversations far beyond any context window,
// yet stop a template or input that would loop, grow or recurse without end: within a fraction of a second
// (a few seconds under the sanitizers), before it costs more than a few hundred MB or the stack.
constexpr int64_t kMaxSteps = int64_t{1} << 21;    // expressions evaluated, statements run, items touched
constexpr int64_t kMaxBytes = int64_t{128} << 20;  // bytes of strings and lists created, the output's included
constexpr int kMaxRenderDepth = 400;               // nesting of evaluation at once: expressions, blocks and macro calls
constexpr int kMaxValueDepth = 200;                // nesting of lists and dicts (parse_json's inputs nest up to 128)
// Parsing: far deeper than any real template, far shallower than the stack allows.
constexpr int kMaxParseDepth = 100;  // nesting of brackets, unary operators and blocks
constexpr int kMaxExprHeight = 200;  // height of an expression tree (a + b + ... grows it without recursion)

// ---- Values ----

struct ListData;
struct DictData;
struct LoopData;
struct Node;

enum class Kind { Undefined, None, Bool, Int, Float, String, List, Dict, Namespace, Loop, Macro };

struct Value {
  Kind kind = Kind::Undefined;
  int64_t integer = 0;                      // Int, and Bool as 0 or 1 (Python's bool is an int)
  double number = 0;                        // Float
  std::shared_ptr<const std::string> text;  // String; for Undefined, why it is (UndefinedError's message)
  std::shared_ptr<const ListData> list;     // List (and tuple)
  std::shared_ptr<DictData> dict;           // Dict (never changed once built), or Namespace (set ns.x does)
  std::shared_ptr<const LoopData> loop;
  const Node* macro = nullptr;
};

struct ListData {
  std::vector<Value> items;
  bool tuple = false;
  int depth = 1;               // nesting, bounded so that the recursive walks of values fit the stack
  bool has_namespace = false;  // a namespace may not hold one (no cycles)
};

// A dict keyed by strings (as JSON's are), in insertion order as Python's are.
struct DictData {
  std::vector<std::pair<std::string, Value>> items;
  std::unordered_map<std::string, size_t> index;
  int depth = 1;
  bool has_namespace = false;

  const Value* find(const std::string& key) const {
    auto it = index.find(key);
    return it == index.end() ? nullptr : &items[it->second].second;
  }
  void set(const std::string& key, Value v) {
    auto [it, added] = index.emplace(key, items.size());
    if (added)
      items.emplace_back(key, std::move(v));
    else
      items[it->second].second = std::move(v);
  }
};

struct LoopData {
  int64_t index0 = 0;
  std::shared_ptr<const ListData> items;  // what the loop goes over (after its `if`), for previtem/nextitem
};

int child_depth(const Value& v) {
  if (v.kind == Kind::List) return v.list->depth;
  if (v.kind == Kind::Dict) return v.dict->depth;
  if (v.kind == Kind::Loop) return v.loop->items->depth + 1;
  return v.kind == Kind::Namespace ? 1 : 0;
}
bool child_has_namespace(const Value& v) {
  if (v.kind == Kind::List) return v.list->has_namespace;
  if (v.kind == Kind::Dict) return v.dict->has_namespace;
  if (v.kind == Kind::Loop) return v.loop->items->has_namespace;
  return v.kind == Kind::Namespace;
}

Value undefined(std::string why) {
  Value v;
  v.text = std::make_shared<const std::string>(std::move(why));
  return v;
}
Value of_kind(Kind kind) {
  Value v;
  v.kind = kind;
  return v;
}
Value none_value() { return of_kind(Kind::None); }
Value bool_value(bool b) {
  Value v = of_kind(Kind::Bool);
  v.integer = b;
  return v;
}
Value int_value(int64_t i) {
  Value v = of_kind(Kind::Int);
  v.integer = i;
  return v;
}
Value float_value(double d) {
  Value v = of_kind(Kind::Float);
  v.number = d;
  return v;
}
// A string not counted against a render's budget: the template's own literals.
Value literal_string(std::string s) {
  Value v = of_kind(Kind::String);
  v.text = std::make_shared<const std::string>(std::move(s));
  return v;
}

bool is_number(const Value& v) { return v.kind == Kind::Bool || v.kind == Kind::Int || v.kind == Kind::Float; }
bool is_integral(const Value& v) { return v.kind == Kind::Bool || v.kind == Kind::Int; }
double as_double(const Value& v) { return v.kind == Kind::Float ? v.number : static_cast<double>(v.integer); }

// Python's type names, as its error messages show them.
const char* type_name(const Value& v) {
  switch (v.kind) {
    case Kind::Undefined:
      return "Undefined";
    case Kind::None:
      return "NoneType";
    case Kind::Bool:
      return "bool";
    case Kind::Int:
      return "int";
    case Kind::Float:
      return "float";
    case Kind::String:
      return "str";
    case Kind::List:
      return v.list->tuple ? "tuple" : "list";
    case Kind::Dict:
      return "dict";
    case Kind::Namespace:
      return "Namespace";
    case Kind::Loop:
      return "LoopContext";
    case Kind::Macro:
      return "Macro";
  }
  return "?";
}

bool truthy(const Value& v) {
  switch (v.kind) {
    case Kind::Undefined:
    case Kind::None:
      return false;
    case Kind::Bool:
    case Kind::Int:
      return v.integer != 0;
    case Kind::Float:
      return v.number != 0;
    case Kind::String:
      return !v.text->empty();
    case Kind::List:
      return !v.list->items.empty();
    case Kind::Dict:
      return !v.dict->items.empty();
    default:
      return true;
  }
}

// Jinja's Undefined fails on everything but printing, iterating, testing and comparing for equality. One
// without a reason is an argument not given.
[[noreturn]] void fail_undefined(const Value& v) { throw Error(v.text ? *v.text : "an argument is missing"); }

// Nesting and namespaces held, of a value inside a container (a loop value holds the list it goes over).
int child_depth(const Value& v);
bool child_has_namespace(const Value& v);

bool py_equal(const Value& a, const Value& b) {
  if (is_number(a) && is_number(b)) {
    if (is_integral(a) && is_integral(b)) return a.integer == b.integer;
    return as_double(a) == as_double(b);
  }
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Kind::Undefined:
    case Kind::None:
      return true;
    case Kind::String:
      return *a.text == *b.text;
    case Kind::List: {
      const auto &x = a.list->items, &y = b.list->items;
      if (a.list->tuple != b.list->tuple || x.size() != y.size()) return false;
      for (size_t i = 0; i < x.size(); ++i)
        if (!py_equal(x[i], y[i])) return false;
      return true;
    }
    case Kind::Dict: {
      if (a.dict->items.size() != b.dict->items.size()) return false;
      for (const auto& [k, v] : a.dict->items) {
        const Value* w = b.dict->find(k);
        if (!w || !py_equal(v, *w)) return false;
      }
      return true;
    }
    case Kind::Namespace:
      return a.dict == b.dict;
    case Kind::Loop:
      return a.loop == b.loop;
    case Kind::Macro:
      return a.macro == b.macro;
    default:
      return false;
  }
}

// Python's ordering (<): numbers, strings (UTF-8 bytes order as code points do), lists lexicographically.
// NaN sorts after every number, so that sorting is a strict weak order (std::sort needs one).
int py_compare(const Value& a, const Value& b, const char* op) {
  if (is_number(a) && is_number(b)) {
    if (is_integral(a) && is_integral(b)) return (a.integer > b.integer) - (a.integer < b.integer);
    double x = as_double(a), y = as_double(b);
    if (std::isnan(x) || std::isnan(y)) return std::isnan(x) - std::isnan(y);
    return (x > y) - (x < y);
  }
  if (a.kind == Kind::String && b.kind == Kind::String) {
    int c = a.text->compare(*b.text);
    return (c > 0) - (c < 0);
  }
  if (a.kind == Kind::List && b.kind == Kind::List) {
    const auto &x = a.list->items, &y = b.list->items;
    for (size_t i = 0; i < x.size() && i < y.size(); ++i)
      if (int c = py_compare(x[i], y[i], op)) return c;
    return (x.size() > y.size()) - (x.size() < y.size());
  }
  if (a.kind == Kind::Undefined) fail_undefined(a);
  if (b.kind == Kind::Undefined) fail_undefined(b);
  fail("'{}' not supported between instances of '{}' and '{}'", op, type_name(a), type_name(b));
}

// ---- UTF-8 (Python indexes, measures and strips strings by code point) ----

bool is_continuation(unsigned char c) { return (c & 0xC0) == 0x80; }

// The code point starting at s[i], advancing i past it; a byte starting no valid sequence stands for itself.
uint32_t next_code_point(std::string_view s, size_t& i) {
  const auto c = static_cast<unsigned char>(s[i]);
  const int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
  if (len == 0 || i + len > s.size()) return ++i, c;
  uint32_t cp = len == 1 ? c : c & (0x7F >> len);
  for (int k = 1; k < len; ++k) {
    const auto d = static_cast<unsigned char>(s[i + k]);
    if (!is_continuation(d)) return ++i, c;
    cp = cp << 6 | (d & 0x3F);
  }
  i += len;
  return cp;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | cp >> 6);
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | cp >> 12);
    out += static_cast<char>(0x80 | (cp >> 6 & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | cp >> 18);
    out += static_cast<char>(0x80 | (cp >> 12 & 0x3F));
    out += static_cast<char>(0x80 | (cp >> 6 & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// The byte offset of each code point of s (every byte but UTF-8 continuation bytes starts one), and s.size().
std::vector<size_t> char_starts(std::string_view s) {
  std::vector<size_t> starts;
  for (size_t i = 0; i < s.size(); ++i)
    if (i == 0 || !is_continuation(static_cast<unsigned char>(s[i]))) starts.push_back(i);
  starts.push_back(s.size());
  return starts;
}

size_t char_count(std::string_view s) { return char_starts(s).size() - 1; }

// str.isspace() of Python, whose strip() and split() use it.
bool py_space(uint32_t c) {
  return c == ' ' || (c >= 9 && c <= 13) || (c >= 0x1C && c <= 0x1F) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// Python's strip/lstrip/rstrip: code points at the ends that are whitespace, or (given chars) among chars.
std::string_view py_strip(std::string_view s, const std::string* chars, bool left, bool right) {
  auto stripped = [&](std::string_view ch) {
    if (chars) return chars->find(ch) != std::string::npos;
    size_t i = 0;
    return py_space(next_code_point(ch, i)) && i == ch.size();
  };
  size_t begin = 0, end = s.size();
  while (left && begin < end) {
    size_t next = begin;
    next_code_point(s, next);
    if (!stripped(s.substr(begin, next - begin))) break;
    begin = next;
  }
  while (right && end > begin) {
    size_t start = end - 1;
    while (start > begin && is_continuation(static_cast<unsigned char>(s[start]))) --start;
    if (!stripped(s.substr(start, end - start))) break;
    end = start;
  }
  return s.substr(begin, end - begin);
}

char ascii_upper(char c) { return c >= 'a' && c <= 'z' ? static_cast<char>(c - 32) : c; }
char ascii_lower(char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c + 32) : c; }
bool ascii_alpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

// Python's repr(float): the shortest digits that round-trip, in positional form for exponents -4..15.
std::string float_repr(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);
  const std::string_view sci(buf, res.ptr - buf);  // [-]D[.DDD]e(+|-)XX
  const size_t e = sci.find('e');
  std::string sign = sci[0] == '-' ? "-" : "";
  std::string digits;
  for (char c : sci.substr(sign.size(), e - sign.size()))
    if (c != '.') digits += c;
  const int exp = std::stoi(std::string(sci.substr(e + 1)));
  if (exp < -4 || exp >= 16) {
    std::string out = sign + digits[0];
    if (digits.size() > 1) out += "." + digits.substr(1);
    return out + (exp < 0 ? "e-" : "e+") + (std::abs(exp) < 10 ? "0" : "") + std::to_string(std::abs(exp));
  }
  if (exp < 0) return sign + "0." + std::string(-exp - 1, '0') + digits;
  if (digits.size() <= static_cast<size_t>(exp) + 1)
    return sign + digits + std::string(exp + 1 - digits.size(), '0') + ".0";
  return sign + digits.substr(0, exp + 1) + "." + digits.substr(exp + 1);
}

// ---- Lexer ----
// Jinja's, configured as transformers does: trim_blocks (the newline after a block or comment tag goes),
// lstrip_blocks (spaces and tabs from a line's start to a block or comment tag go), and the `-` / `+`
// markers inside the tag delimiters that strip all whitespace beside them or keep it.

enum class Tok { Text, VarBegin, VarEnd, BlockBegin, BlockEnd, Name, String, Int, Float, Op, End };

struct Token {
  Tok type;
  std::string text;  // Text, Name, String (unescaped), Op
  int line;
  int64_t integer = 0;
  double number = 0;
};

const char* describe(const Token& t) {
  switch (t.type) {
    case Tok::Text:
      return "text";
    case Tok::VarBegin:
      return "'{{'";
    case Tok::VarEnd:
      return "'}}'";
    case Tok::BlockBegin:
      return "'{%'";
    case Tok::BlockEnd:
      return "'%}'";
    case Tok::End:
      return "the end of the template";
    default:
      return nullptr;  // the token's own text says it
  }
}

bool ascii_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }
bool name_start(char c) { return ascii_alpha(c) || c == '_'; }
bool name_char(char c) { return name_start(c) || (c >= '0' && c <= '9'); }
bool is_digit(char c) { return c >= '0' && c <= '9'; }

class Lexer {
 public:
  explicit Lexer(std::string source) : src_(normalize(std::move(source))) {}

  std::vector<Token> run() {
    bool line_starting = true;  // whether the text that follows starts a line (lstrip_blocks strips only then)
    while (true) {
      const size_t start = next_tag();
      std::string_view text(src_.data() + pos_, (start == std::string::npos ? src_.size() : start) - pos_);
      if (start == std::string::npos) {
        add_text(text);
        break;
      }
      const char kind = src_[start + 1];
      const char sign =
          start + 2 < src_.size() && (src_[start + 2] == '-' || src_[start + 2] == '+') ? src_[start + 2] : 0;
      std::string_view kept = text;
      if (sign == '-') {
        kept = py_strip(text, nullptr, false, true);
      } else if (sign != '+' && kind != '{') {
        const size_t line_start = text.rfind('\n') + 1;  // 0 when there is no newline
        if ((line_start > 0 || line_starting) &&
            text.find_first_not_of(" \t\f\v", line_start) == std::string_view::npos)
          kept = text.substr(0, line_start);
      }
      add_text(kept);
      line_ += static_cast<int>(std::count(text.begin(), text.end(), '\n'));
      const int tag_line = line_;
      pos_ = start + 2 + (sign ? 1 : 0);
      char end_sign;
      if (kind == '#') {
        const size_t close = src_.find("#}", pos_);
        if (close == std::string::npos) fail("chat template line {}: comment '{{#' is never closed", tag_line);
        end_sign = close > pos_ && (src_[close - 1] == '-' || src_[close - 1] == '+') ? src_[close - 1] : 0;
        line_ += static_cast<int>(std::count(src_.begin() + pos_, src_.begin() + close, '\n'));
        pos_ = close + 2;
      } else {
        tokens_.push_back({kind == '{' ? Tok::VarBegin : Tok::BlockBegin, "", tag_line});
        end_sign = lex_tag(kind, tag_line);
      }
      // What the closing delimiter swallows: all whitespace after `-`, the one newline trim_blocks removes.
      const size_t after = pos_;
      if (end_sign == '-') {
        pos_ = src_.size() - py_strip(std::string_view(src_).substr(pos_), nullptr, true, false).size();
      } else if (end_sign != '+' && kind != '{' && pos_ < src_.size() && src_[pos_] == '\n') {
        ++pos_;
      }
      line_ += static_cast<int>(std::count(src_.begin() + after, src_.begin() + pos_, '\n'));
      line_starting = pos_ > after && src_[pos_ - 1] == '\n';
    }
    tokens_.push_back({Tok::End, "", line_});
    return std::move(tokens_);
  }

 private:
  // As Jinja reads a source: newlines normalised to \n, and one trailing newline dropped.
  static std::string normalize(std::string s) {
    std::string out;
    out.reserve(s.size());
    for (size_t i = 0; i < s.size(); ++i) {
      if (s[i] == '\r') {
        out += '\n';
        if (i + 1 < s.size() && s[i + 1] == '\n') ++i;
      } else {
        out += s[i];
      }
    }
    if (!out.empty() && out.back() == '\n') out.pop_back();
    return out;
  }

  size_t next_tag() const {
    for (size_t i = src_.find('{', pos_); i != std::string::npos; i = src_.find('{', i + 1))
      if (i + 1 < src_.size() && (src_[i + 1] == '{' || src_[i + 1] == '%' || src_[i + 1] == '#')) return i;
    return std::string::npos;
  }

  void add_text(std::string_view text) {
    if (!text.empty()) tokens_.push_back({Tok::Text, std::string(text), line_});
  }

  // The tokens of a {{ }} or {% %} tag up to its closing delimiter, which counts only outside brackets (as a
  // dict literal's `}}` is not one). Returns the closing delimiter's `-` or `+`, or 0.
  char lex_tag(char kind, int tag_line) {
    const std::string_view close = kind == '{' ? "}}" : "%}";
    int brackets = 0;
    while (true) {
      while (pos_ < src_.size() && ascii_space(src_[pos_])) line_ += src_[pos_++] == '\n';
      if (pos_ >= src_.size()) fail("chat template line {}: '{}{}' is never closed", tag_line, '{', kind);
      const std::string_view rest = std::string_view(src_).substr(pos_);
      if (brackets == 0) {
        for (char sign : {'-', '+', '\0'}) {
          if (sign == '+' && kind == '{') continue;
          const std::string delim = (sign ? std::string(1, sign) : "") + std::string(close);
          if (rest.starts_with(delim)) {
            tokens_.push_back({kind == '{' ? Tok::VarEnd : Tok::BlockEnd, "", line_});
            pos_ += delim.size();
            return sign;
          }
        }
      }
      const char c = src_[pos_];
      if (c == '"' || c == '\'') {
        lex_string();
      } else if (is_digit(c)) {
        lex_number();
      } else if (name_start(c)) {
        const size_t start = pos_;
        while (pos_ < src_.size() && name_char(src_[pos_])) ++pos_;
        tokens_.push_back({Tok::Name, src_.substr(start, pos_ - start), line_});
      } else {
        static constexpr std::string_view kOps[] = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "*",
                                                    "/",  "%",  "~",  "<",  ">",  "=",  ".", ",", ":",
                                                    "|",  "(",  ")",  "[",  "]",  "{",  "}"};
        auto op =
            std::find_if(std::begin(kOps), std::end(kOps), [&](std::string_view o) { return rest.starts_with(o); });
        if (op == std::end(kOps)) {
          size_t end = pos_;
          next_code_point(src_, end);
          fail("chat template line {}: unexpected character '{}'", line_, src_.substr(pos_, end - pos_));
        }
        if (*op == "(" || *op == "[" || *op == "{") ++brackets;
        if ((*op == ")" || *op == "]" || *op == "}") && brackets > 0) --brackets;
        tokens_.push_back({Tok::Op, std::string(*op), line_});
        pos_ += op->size();
      }
    }
  }

  // A string literal, unescaped as Python's unicode-escape codec does (Jinja decodes literals with it): an
  // unknown escape stays as written.
  void lex_string() {
    const char quote = src_[pos_++];
    const int start_line = line_;
    std::string out;
    auto hex = [&](int digits) {
      uint32_t cp = 0;
      for (int k = 0; k < digits; ++k) {
        const char h = pos_ < src_.size() ? src_[pos_] : 0;
        const int d = is_digit(h) ? h - '0' : (h | 32) >= 'a' && (h | 32) <= 'f' ? (h | 32) - 'a' + 10 : -1;
        if (d < 0) fail("chat template line {}: truncated \\x, \\u or \\U escape in a string", line_);
        cp = cp << 4 | d;
        ++pos_;
      }
      if (cp > 0x10FFFF) fail("chat template line {}: escape \\U{:08x} is beyond Unicode", line_, cp);
      append_utf8(out, cp);
    };
    while (true) {
      if (pos_ >= src_.size()) fail("chat template line {}: string literal is never closed", start_line);
      const char c = src_[pos_++];
      if (c == quote) break;
      if (c == '\n') ++line_;
      if (c != '\\' || pos_ >= src_.size()) {
        out += c;
        continue;
      }
      const char e = src_[pos_++];
      switch (e) {
        case '\n':
          ++line_;
          break;  // a line continuation
        case '\\':
        case '\'':
        case '"':
          out += e;
          break;
        case 'a':
          out += '\a';
          break;
        case 'b':
          out += '\b';
          break;
        case 'f':
          out += '\f';
          break;
        case 'n':
          out += '\n';
          break;
        case 'r':
          out += '\r';
          break;
        case 't':
          out += '\t';
          break;
        case 'v':
          out += '\v';
          break;
        case 'x':
          hex(2);
          break;
        case 'u':
          hex(4);
          break;
        case 'U':
          hex(8);
          break;
        case 'N':
          fail("chat template line {}: \\N{{...}} escapes are not supported", line_);
        default:
          if (e >= '0' && e <= '7') {
            uint32_t cp = e - '0';
            for (int k = 0; k < 2 && pos_ < src_.size() && src_[pos_] >= '0' && src_[pos_] <= '7'; ++k)
              cp = cp * 8 + (src_[pos_++] - '0');
            append_utf8(out, cp);
          } else {
            out += '\\';
            out += e;
          }
      }
    }
    tokens_.push_back({Tok::String, std::move(out), start_line});
  }

  // 42, 1_000, 4.5, 1e-3. Right after a `.` only an integer (x.0.1 is x[0][1]).
  void lex_number() {
    auto digits = [&] {
      std::string d;
      while (pos_ < src_.size() &&
             (is_digit(src_[pos_]) || (src_[pos_] == '_' && pos_ + 1 < src_.size() && is_digit(src_[pos_ + 1]))))
        if (src_[pos_++] != '_') d += src_[pos_ - 1];
      return d;
    };
    std::string text = digits();
    bool is_float = false;
    const bool after_dot = !tokens_.empty() && tokens_.back().type == Tok::Op && tokens_.back().text == ".";
    if (!after_dot && pos_ + 1 < src_.size() && src_[pos_] == '.' && is_digit(src_[pos_ + 1])) {
      ++pos_;
      text += "." + digits();
      is_float = true;
    }
    if (!after_dot && pos_ < src_.size() && (src_[pos_] | 32) == 'e') {
      size_t p = pos_ + 1;
      if (p < src_.size() && (src_[p] == '+' || src_[p] == '-')) ++p;
      if (p < src_.size() && is_digit(src_[p])) {
        text += src_.substr(pos_, p - pos_);
        pos_ = p;
        text += digits();
        is_float = true;
      }
    }
    Token t{is_float ? Tok::Float : Tok::Int, text, line_};
    if (is_float) {
      t.number = std::strtod(text.c_str(), nullptr);
    } else {
      const auto r = std::from_chars(text.data(), text.data() + text.size(), t.integer);
      if (r.ec != std::errc()) fail("chat template line {}: integer {} is too large", line_, text);
    }
    tokens_.push_back(std::move(t));
  }

  std::string src_;
  size_t pos_ = 0;
  int line_ = 1;
  std::vector<Token> tokens_;
};

// ---- Syntax tree ----

class Renderer;
struct Args;
using FilterFn = Value (*)(Renderer&, const Value&, const Args&);
using TestFn = bool (*)(Renderer&, const Value&, const std::vector<Value>&);
using FunctionFn = Value (*)(Renderer&, const Args&);
using MethodFn = Value (*)(Renderer&, const Value&, const Args&);

enum class Op {
  Add,
  Sub,
  Mul,
  Div,
  FloorDiv,
  Mod,
  Pow,
  Concat,
  Eq,
  Ne,
  Lt,
  Le,
  Gt,
  Ge,
  In,
  NotIn,
  And,
  Or,
  Not,
  Neg,
  Pos
};

struct Expr {
  enum class Kind { Literal, Name, List, Dict, Attr, Item, Slice, Call, Filter, Test, Unary, Binary, Compare, Cond };
  Kind kind;
  int line;
  int height = 1;
  Value value;           // Literal
  std::string name;      // Name, Attr, Filter, Test; for a Call of a method or function, its name
  Op op = Op::Add;       // Unary, Binary
  std::vector<Op> ops;   // Compare: between kids[i] and kids[i + 1]
  bool tuple = false;    // List
  bool negated = false;  // Test: `is not`
  // Literal: none. List: items. Dict: key, value, key, value... Attr: object. Item: object, key. Slice: object,
  // start, stop, step (each may be null). Call: the object of a method (null for a function) then arguments.
  // Filter, Test: the operand then arguments. Unary: operand. Binary: two. Compare: operands. Cond: value,
  // condition, else (may be null).
  std::vector<std::unique_ptr<Expr>> kids;
  std::vector<std::string> keywords;  // Call, Filter: per argument, its keyword or ""
  FilterFn filter = nullptr;
  TestFn test = nullptr;
};

using Body = std::vector<std::unique_ptr<Node>>;

struct Node {
  enum class Kind { Text, Output, If, For, Set, SetBlock, Macro, Break, Continue, Generation };
  Kind kind;
  int line;
  std::string text;                             // Text; the name of a Macro or of the namespace of `set ns.attr`
  std::unique_ptr<Expr> expr;                   // Output; For: the iterable; Set: the value
  std::unique_ptr<Expr> cond;                   // For: `if` filter
  std::vector<std::string> targets;             // For, Set, SetBlock: names bound (several unpack a sequence)
  std::string attr;                             // Set: the attribute of `set ns.attr = ...`
  std::vector<std::string> params;              // Macro
  std::vector<std::unique_ptr<Expr>> defaults;  // Macro: per parameter, or null
  std::vector<std::pair<std::unique_ptr<Expr>, Body>> branches;  // If: condition (null for else), body
  Body body, else_body;                                          // For (else: no items), SetBlock, Macro, Generation
};

}  // namespace

struct ChatTemplate::Program {
  Body body;
};

namespace {

// ---- Arguments ----

struct Args {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> named;

  // Binds to parameters as Python does (positionally, then by name); a missing one is Undefined.
  std::vector<Value> bind(std::string_view what, std::initializer_list<std::string_view> params) const {
    check(pos.size() <= params.size(), "{} takes at most {} arguments ({} given)", what, params.size(), pos.size());
    std::vector<Value> out(pos);
    out.resize(params.size());
    for (const auto& [name, v] : named) {
      auto it = std::find(params.begin(), params.end(), name);
      check(it != params.end(), "{} has no argument '{}'", what, name);
      const size_t i = it - params.begin();
      check(i >= pos.size(), "{} got argument '{}' twice", what, name);
      out[i] = v;
    }
    return out;
  }
};

bool given(const Value& v) { return v.kind != Kind::Undefined; }

int64_t int_arg(const Value& v, std::string_view what) {
  check(v.kind != Kind::Undefined || v.text, "{} is missing", what);
  check(is_integral(v), "{} must be an integer, not '{}'", what, type_name(v));
  return v.integer;
}

const std::string& str_arg(const Value& v, std::string_view what) {
  check(v.kind != Kind::Undefined || v.text, "{} is missing", what);
  if (v.kind == Kind::Undefined) fail_undefined(v);
  check(v.kind == Kind::String, "{} must be a string, not '{}'", what, type_name(v));
  return *v.text;
}

// ---- Renderer ----

struct JsonStyle {
  bool ascii = false;
  bool indented = false;
  std::string indent, item_sep = ", ", key_sep = ": ";
  bool sort_keys = false;
};

class Renderer {
 public:
  int line = 0;  // of the node being evaluated, for error messages

  // Accounting: every evaluation step and every byte created counts against the render's budget.
  void step(int64_t n = 1) {
    steps_ += n;
    if (steps_ > kMaxSteps) fail("rendering takes more than {} steps (a runaway loop?)", kMaxSteps);
  }
  // Fails before building what would take more bytes than are left (the building charges them).
  void check_room(int64_t n) const {
    if (bytes_ + n > kMaxBytes)
      fail("rendering creates more than {} MiB of strings and lists (runaway output?)", kMaxBytes >> 20);
  }
  void charge_bytes(int64_t n) {
    check_room(n);
    bytes_ += n;
  }
  void append(std::string& out, std::string_view piece) {
    charge_bytes(static_cast<int64_t>(piece.size()));
    out += piece;
  }
  // Charges the scan of an n-byte string (indexing one means finding its code points).
  void scan(size_t n) { step(1 + static_cast<int64_t>(n / 64)); }

  Value str(std::string s) {
    charge_bytes(static_cast<int64_t>(s.size()));
    return literal_string(std::move(s));
  }
  Value list(std::vector<Value> items, bool tuple = false) {
    charge_bytes(static_cast<int64_t>(items.size() * sizeof(Value)));
    auto data = std::make_shared<ListData>();
    for (const Value& v : items) {
      data->depth = std::max(data->depth, child_depth(v) + 1);
      data->has_namespace |= child_has_namespace(v);
    }
    check(data->depth <= kMaxValueDepth, "lists and dicts nest deeper than {} levels", kMaxValueDepth);
    data->items = std::move(items);
    data->tuple = tuple;
    Value v = of_kind(Kind::List);
    v.list = std::move(data);
    return v;
  }
  Value dict(std::vector<std::pair<std::string, Value>> items, Kind kind = Kind::Dict) {
    charge_bytes(static_cast<int64_t>(items.size() * (sizeof(Value) + 64)));
    auto data = std::make_shared<DictData>();
    for (auto& [k, v] : items) {
      if (kind == Kind::Namespace) check_storable_in_namespace(v);
      data->depth = std::max(data->depth, child_depth(v) + 1);
      data->has_namespace |= child_has_namespace(v);
      data->set(k, std::move(v));
    }
    check(data->depth <= kMaxValueDepth, "lists and dicts nest deeper than {} levels", kMaxValueDepth);
    Value v = of_kind(kind);
    v.dict = std::move(data);
    return v;
  }
  // A namespace holding one (directly or in a list) could hold itself, and printing it would never end.
  static void check_storable_in_namespace(const Value& v) {
    check(!child_has_namespace(v), "a namespace cannot hold a namespace");
  }

  Value from_json(const ojson& j, int depth) {
    check(depth <= kMaxValueDepth, "the template's variables nest deeper than {} levels", kMaxValueDepth);
    switch (j.type()) {
      case ojson::value_t::null:
        return none_value();
      case ojson::value_t::boolean:
        return bool_value(j.get<bool>());
      case ojson::value_t::number_integer:
        return int_value(j.get<int64_t>());
      case ojson::value_t::number_unsigned: {
        const auto u = j.get<uint64_t>();
        return u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ? int_value(static_cast<int64_t>(u))
                                                                               : float_value(static_cast<double>(u));
      }
      case ojson::value_t::number_float:
        return float_value(j.get<double>());
      case ojson::value_t::string:
        return str(j.get<std::string>());
      case ojson::value_t::array: {
        std::vector<Value> items;
        for (const auto& e : j) items.push_back(from_json(e, depth + 1));
        return list(std::move(items));
      }
      case ojson::value_t::object: {
        std::vector<std::pair<std::string, Value>> items;
        for (const auto& [k, e] : j.items()) items.emplace_back(k, from_json(e, depth + 1));
        return dict(std::move(items));
      }
      default:
        fail("the template's variables hold a binary value");
    }
  }

  // ---- Strings of values ----

  // Python's str(v) (repr = false) or repr(v), appended to out.
  void write(std::string& out, const Value& v, bool repr) {
    step();
    switch (v.kind) {
      case Kind::Undefined:
        return append(out, repr ? "Undefined" : "");
      case Kind::None:
        return append(out, "None");
      case Kind::Bool:
        return append(out, v.integer ? "True" : "False");
      case Kind::Int:
        return append(out, std::to_string(v.integer));
      case Kind::Float:
        return append(out, float_repr(v.number));
      case Kind::String:
        return repr ? write_repr(out, *v.text) : append(out, *v.text);
      case Kind::List: {
        const auto& items = v.list->items;
        append(out, v.list->tuple ? "(" : "[");
        for (size_t i = 0; i < items.size(); ++i) {
          if (i) append(out, ", ");
          write(out, items[i], true);
        }
        return append(out, !v.list->tuple ? "]" : items.size() == 1 ? ",)" : ")");
      }
      case Kind::Dict:
      case Kind::Namespace: {
        append(out, v.kind == Kind::Namespace ? "<Namespace {" : "{");
        for (size_t i = 0; i < v.dict->items.size(); ++i) {
          if (i) append(out, ", ");
          write_repr(out, v.dict->items[i].first);
          append(out, ": ");
          write(out, v.dict->items[i].second, true);
        }
        return append(out, v.kind == Kind::Namespace ? "}>" : "}");
      }
      case Kind::Loop:
        return append(out, fmt::format("<LoopContext {}/{}>", v.loop->index0 + 1, v.loop->items->items.size()));
      case Kind::Macro:
        return append(out, "<Macro '" + v.macro->text + "'>");
    }
  }
  std::string to_str(const Value& v) {
    if (v.kind == Kind::String) return *v.text;
    std::string out;
    write(out, v, false);
    return out;
  }
  // A string argument's text, or any value's str() (as filters on strings apply to anything).
  Value as_string_value(const Value& v) { return v.kind == Kind::String ? v : str(to_str(v)); }

  // Python's repr of a string: single quotes unless it has one and no double quote.
  void write_repr(std::string& out, std::string_view s) {
    const char quote = s.find('\'') != std::string_view::npos && s.find('"') == std::string_view::npos ? '"' : '\'';
    std::string r(1, quote);
    for (char c : s) {
      if (c == quote || c == '\\') {
        r += '\\';
        r += c;
      } else if (c == '\n') {
        r += "\\n";
      } else if (c == '\r') {
        r += "\\r";
      } else if (c == '\t') {
        r += "\\t";
      } else if (static_cast<unsigned char>(c) < 0x20 || c == 0x7F) {
        r += fmt::format("\\x{:02x}", static_cast<unsigned char>(c));
      } else {
        r += c;
      }
    }
    r += quote;
    append(out, r);
  }

  // Python's json.dumps(v, ensure_ascii, indent, separators, sort_keys), as transformers' tojson calls it.
  void write_json(std::string& out, const Value& v, const JsonStyle& style, int level) {
    step();
    auto newline = [&](int lvl) {
      if (!style.indented) return;
      append(out, "\n");
      for (int i = 0; i < lvl; ++i) append(out, style.indent);
    };
    switch (v.kind) {
      case Kind::None:
        return append(out, "null");
      case Kind::Bool:
        return append(out, v.integer ? "true" : "false");
      case Kind::Int:
        return append(out, std::to_string(v.integer));
      case Kind::Float:
        if (std::isnan(v.number)) return append(out, "NaN");
        if (std::isinf(v.number)) return append(out, v.number > 0 ? "Infinity" : "-Infinity");
        return append(out, float_repr(v.number));
      case Kind::String:
        return write_json_string(out, *v.text, style.ascii);
      case Kind::List: {
        const auto& items = v.list->items;
        if (items.empty()) return append(out, "[]");
        append(out, "[");
        for (size_t i = 0; i < items.size(); ++i) {
          if (i) append(out, style.item_sep);
          newline(level + 1);
          write_json(out, items[i], style, level + 1);
        }
        newline(level);
        return append(out, "]");
      }
      case Kind::Dict: {
        std::vector<const std::pair<std::string, Value>*> items;
        for (const auto& kv : v.dict->items) items.push_back(&kv);
        if (style.sort_keys)
          std::sort(items.begin(), items.end(), [](auto* a, auto* b) { return a->first < b->first; });
        if (items.empty()) return append(out, "{}");
        append(out, "{");
        for (size_t i = 0; i < items.size(); ++i) {
          if (i) append(out, style.item_sep);
          newline(level + 1);
          write_json_string(out, items[i]->first, style.ascii);
          append(out, style.key_sep);
          write_json(out, items[i]->second, style, level + 1);
        }
        newline(level);
        return append(out, "}");
      }
      default:
        fail("Object of type {} is not JSON serializable", type_name(v));
    }
  }
  void write_json_string(std::string& out, std::string_view s, bool ascii) {
    std::string r = "\"";
    for (size_t i = 0; i < s.size();) {
      const char c = s[i];
      const auto u = static_cast<unsigned char>(c);
      if (c == '"' || c == '\\') {
        r += '\\';
        r += c;
      } else if (c == '\n') {
        r += "\\n";
      } else if (c == '\r') {
        r += "\\r";
      } else if (c == '\t') {
        r += "\\t";
      } else if (c == '\b') {
        r += "\\b";
      } else if (c == '\f') {
        r += "\\f";
      } else if (u < 0x20) {
        r += fmt::format("\\u{:04x}", u);
      } else if (u >= 0x80 && ascii) {
        uint32_t cp = next_code_point(s, i);
        if (cp >= 0x10000) {
          cp -= 0x10000;
          r += fmt::format("\\u{:04x}\\u{:04x}", 0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF));
        } else {
          r += fmt::format("\\u{:04x}", cp);
        }
        continue;
      } else {
        r += c;
      }
      ++i;
    }
    r += '"';
    append(out, r);
  }

  // ---- Containers ----

  // What `for` goes over: a list's items, a dict's keys, a string's characters; Undefined is empty.
  std::vector<Value> iterate(const Value& v) {
    switch (v.kind) {
      case Kind::Undefined:
        return {};
      case Kind::List:
        step(static_cast<int64_t>(v.list->items.size()));
        return v.list->items;
      case Kind::Dict: {
        std::vector<Value> keys;
        for (const auto& kv : v.dict->items) keys.push_back(str(kv.first));
        return keys;
      }
      case Kind::String: {
        const auto starts = char_starts(*v.text);
        std::vector<Value> chars;
        for (size_t i = 0; i + 1 < starts.size(); ++i)
          chars.push_back(str(v.text->substr(starts[i], starts[i + 1] - starts[i])));
        return chars;
      }
      default:
        fail("'{}' object is not iterable", type_name(v));
    }
  }

  int64_t length(const Value& v) {
    switch (v.kind) {
      case Kind::Undefined:
        return 0;
      case Kind::String:
        scan(v.text->size());
        return static_cast<int64_t>(char_count(*v.text));
      case Kind::List:
        return static_cast<int64_t>(v.list->items.size());
      case Kind::Dict:
        return static_cast<int64_t>(v.dict->items.size());
      default:
        fail("object of type '{}' has no len()", type_name(v));
    }
  }

  bool contains(const Value& container, const Value& item) {
    switch (container.kind) {
      case Kind::Undefined:
        return false;
      case Kind::String:
        check(item.kind == Kind::String, "'in <string>' requires string as left operand, not {}", type_name(item));
        scan(container.text->size());
        return container.text->find(*item.text) != std::string::npos;
      case Kind::List:
        for (const Value& v : container.list->items) {
          step();
          if (py_equal(v, item)) return true;
        }
        return false;
      case Kind::Dict:
        return item.kind == Kind::String && container.dict->find(*item.text);
      default:
        fail("argument of type '{}' is not iterable", type_name(container));
    }
  }

  // obj.name: a dict's key, a namespace's or loop's attribute; anything else has none (Undefined).
  Value attribute(const Value& obj, const std::string& name) {
    if (obj.kind == Kind::Undefined) fail_undefined(obj);
    if (obj.kind == Kind::Dict || obj.kind == Kind::Namespace) {
      if (const Value* v = obj.dict->find(name)) return *v;
    } else if (obj.kind == Kind::Loop) {
      return loop_attribute(*obj.loop, name);
    }
    return undefined(fmt::format("'{} object' has no attribute '{}'", type_name(obj), name));
  }

  Value loop_attribute(const LoopData& l, const std::string& name) {
    const auto& items = l.items->items;
    const auto n = static_cast<int64_t>(items.size());
    if (name == "index") return int_value(l.index0 + 1);
    if (name == "index0") return int_value(l.index0);
    if (name == "revindex") return int_value(n - l.index0);
    if (name == "revindex0") return int_value(n - l.index0 - 1);
    if (name == "first") return bool_value(l.index0 == 0);
    if (name == "last") return bool_value(l.index0 == n - 1);
    if (name == "length") return int_value(n);
    if (name == "depth") return int_value(1);
    if (name == "depth0") return int_value(0);
    if (name == "previtem") return l.index0 > 0 ? items[l.index0 - 1] : undefined("there is no previous item");
    if (name == "nextitem") return l.index0 + 1 < n ? items[l.index0 + 1] : undefined("there is no next item");
    return undefined(fmt::format("'LoopContext object' has no attribute '{}'", name));
  }

  // obj[key]: a list's or string's element (negative from the end), a dict's key; otherwise Undefined.
  Value item(const Value& obj, const Value& key) {
    if (obj.kind == Kind::Undefined) fail_undefined(obj);
    if (key.kind == Kind::String && obj.kind != Kind::List && obj.kind != Kind::String)
      return attribute(obj, *key.text);
    if (is_integral(key) && (obj.kind == Kind::List || obj.kind == Kind::String)) {
      const int64_t n = length(obj);
      const int64_t i = key.integer < 0 ? key.integer + n : key.integer;
      if (i >= 0 && i < n) {
        if (obj.kind == Kind::List) return obj.list->items[i];
        const auto starts = char_starts(*obj.text);
        return str(obj.text->substr(starts[i], starts[i + 1] - starts[i]));
      }
    }
    return undefined(fmt::format("'{} object' has no element {}", type_name(obj), to_str(key)));
  }

  // obj[start:stop:step] of a list or string, as Python computes a slice's indices.
  Value slice(const Value& obj, const Value& start_v, const Value& stop_v, const Value& step_v) {
    if (obj.kind == Kind::Undefined) fail_undefined(obj);
    check(obj.kind == Kind::List || obj.kind == Kind::String, "'{}' object is not subscriptable", type_name(obj));
    auto bound = [](const Value& v) { return v.kind == Kind::Undefined || v.kind == Kind::None; };
    const int64_t stride = bound(step_v) ? 1 : int_arg(step_v, "a slice's step");
    check(stride != 0, "slice step cannot be zero");
    const int64_t n = length(obj);
    auto index = [&](const Value& v, int64_t fallback) {
      if (bound(v)) return fallback;
      int64_t i = int_arg(v, "a slice index");
      if (i < 0) return i < -n ? (stride < 0 ? -1 : 0) : i + n;
      return i >= n ? (stride < 0 ? n - 1 : n) : i;
    };
    const int64_t first = index(start_v, stride < 0 ? n - 1 : 0);
    const int64_t last = index(stop_v, stride < 0 ? -1 : n);
    std::vector<int64_t> picked;
    for (int64_t i = first; stride > 0 ? i < last : i > last;) {
      step();
      picked.push_back(i);
      if (__builtin_add_overflow(i, stride, &i)) break;
    }
    if (obj.kind == Kind::List) {
      std::vector<Value> items;
      for (int64_t i : picked) items.push_back(obj.list->items[i]);
      return list(std::move(items), obj.list->tuple);
    }
    const auto starts = char_starts(*obj.text);
    std::string out;
    for (int64_t i : picked) out.append(*obj.text, starts[i], starts[i + 1] - starts[i]);
    return str(std::move(out));
  }

  // ---- Operators ----

  Value arithmetic(Op op, const Value& a, const Value& b) {
    if (a.kind == Kind::Undefined) fail_undefined(a);
    if (b.kind == Kind::Undefined) fail_undefined(b);
    if (op == Op::Concat) return str(to_str(a) + to_str(b));
    if (is_number(a) && is_number(b)) return number_op(op, a, b);
    if (op == Op::Add && a.kind == b.kind && (a.kind == Kind::String || a.kind == Kind::List)) {
      if (a.kind == Kind::String) {
        check_room(static_cast<int64_t>(a.text->size() + b.text->size()));
        return str(*a.text + *b.text);
      }
      step(static_cast<int64_t>(a.list->items.size() + b.list->items.size()));
      std::vector<Value> items = a.list->items;
      items.insert(items.end(), b.list->items.begin(), b.list->items.end());
      return list(std::move(items), a.list->tuple);
    }
    if (op == Op::Mul && (is_integral(a) || is_integral(b))) {
      const Value& seq = is_integral(a) ? b : a;
      // (Repeating nothing any number of times is nothing, and takes no time.)
      int64_t times = std::max<int64_t>(0, is_integral(a) ? a.integer : b.integer);
      if (seq.kind == Kind::String) {
        if (seq.text->empty()) times = 0;
        check_room(static_cast<int64_t>(seq.text->size()) * std::min<int64_t>(times, kMaxBytes));
        std::string out;
        for (int64_t i = 0; i < times; ++i) out += *seq.text;
        return str(std::move(out));
      }
      if (seq.kind == Kind::List) {
        if (seq.list->items.empty()) times = 0;
        check_room(static_cast<int64_t>(seq.list->items.size() * sizeof(Value)) * std::min<int64_t>(times, kMaxBytes));
        step(static_cast<int64_t>(seq.list->items.size()) * std::min<int64_t>(times, kMaxSteps));
        std::vector<Value> items;
        for (int64_t i = 0; i < times; ++i) items.insert(items.end(), seq.list->items.begin(), seq.list->items.end());
        return list(std::move(items), seq.list->tuple);
      }
    }
    static constexpr const char* kSymbols[] = {"+", "-", "*", "/", "//", "%", "**"};
    fail("unsupported operand type(s) for {}: '{}' and '{}'", kSymbols[static_cast<int>(op)], type_name(a),
         type_name(b));
  }

  // Python's arithmetic: ints stay ints (overflow beyond 64 bits is an error rather than a bignum), / is
  // true division, // and % floor toward negative infinity.
  static Value number_op(Op op, const Value& a, const Value& b) {
    if (is_integral(a) && is_integral(b) && op != Op::Div) {
      const int64_t x = a.integer, y = b.integer;
      int64_t r = 0;
      bool overflow = false;
      switch (op) {
        case Op::Add:
          overflow = __builtin_add_overflow(x, y, &r);
          break;
        case Op::Sub:
          overflow = __builtin_sub_overflow(x, y, &r);
          break;
        case Op::Mul:
          overflow = __builtin_mul_overflow(x, y, &r);
          break;
        case Op::FloorDiv:
        case Op::Mod: {
          check(y != 0, "integer division or modulo by zero");
          if (x == std::numeric_limits<int64_t>::min() && y == -1) {
            overflow = op == Op::FloorDiv;
            break;
          }
          int64_t q = x / y, m = x % y;
          if (m != 0 && (m < 0) != (y < 0)) --q, m += y;
          r = op == Op::FloorDiv ? q : m;
          break;
        }
        case Op::Pow: {
          if (y < 0) return float_value(std::pow(static_cast<double>(x), static_cast<double>(y)));
          r = 1;
          for (int64_t i = 0; i < y && !overflow; ++i) {
            overflow = __builtin_mul_overflow(r, x, &r);
            if (r == 0 || r == 1) break;  // stays there (and x = -1 alternates only with y's parity)
          }
          if (x == -1) r = y % 2 ? -1 : 1;
          break;
        }
        default:
          break;
      }
      check(!overflow, "integer overflow (beyond 64 bits)");
      return int_value(r);
    }
    const double x = as_double(a), y = as_double(b);
    switch (op) {
      case Op::Add:
        return float_value(x + y);
      case Op::Sub:
        return float_value(x - y);
      case Op::Mul:
        return float_value(x * y);
      case Op::Div:
        check(y != 0, "division by zero");
        return float_value(x / y);
      case Op::FloorDiv:
        check(y != 0, "float floor division by zero");
        return float_value(std::floor(x / y));
      case Op::Mod: {
        check(y != 0, "float modulo");
        double m = std::fmod(x, y);
        if (m != 0 && (m < 0) != (y < 0)) m += y;
        return float_value(m);
      }
      case Op::Pow:
        return float_value(std::pow(x, y));
      default:
        return float_value(0);
    }
  }

  bool compare(Op op, const Value& a, const Value& b) {
    switch (op) {
      case Op::Eq:
        return py_equal(a, b);
      case Op::Ne:
        return !py_equal(a, b);
      case Op::Lt:
        return py_compare(a, b, "<") < 0;
      case Op::Le:
        return py_compare(a, b, "<=") <= 0;
      case Op::Gt:
        return py_compare(a, b, ">") > 0;
      case Op::Ge:
        return py_compare(a, b, ">=") >= 0;
      case Op::In:
        return contains(b, a);
      case Op::NotIn:
        return !contains(b, a);
      default:
        return false;
    }
  }

  // ---- Running the tree ----

  std::string run(const Body& body, std::vector<std::pair<std::string, Value>> globals) {
    frames_.push_back({std::move(globals), -1});
    std::string out;
    exec_body(body, out);
    return out;
  }

  // The nesting of the evaluation now running, bounded (macros can recurse).
  class Nested {
   public:
    explicit Nested(Renderer& r) : r_(r) {
      if (++r_.depth_ > kMaxRenderDepth)
        fail("rendering nests deeper than {} levels (runaway recursion?)", kMaxRenderDepth);
    }
    ~Nested() { --r_.depth_; }
    Nested(const Nested&) = delete;
    Nested& operator=(const Nested&) = delete;

   private:
    Renderer& r_;
  };

  enum class Flow { Normal, Break, Continue };

  Flow exec_body(const Body& body, std::string& out) {
    for (const auto& node : body)
      if (Flow f = exec(*node, out); f != Flow::Normal) return f;
    return Flow::Normal;
  }

  Flow exec(const Node& n, std::string& out) {
    Nested nested(*this);
    step();
    line = n.line;
    switch (n.kind) {
      case Node::Kind::Text:
        append(out, n.text);
        break;
      case Node::Kind::Output:
        write(out, eval(*n.expr), false);
        break;
      case Node::Kind::If:
        for (const auto& [cond, body] : n.branches)
          if (!cond || truthy(eval(*cond))) return exec_body(body, out);
        break;
      case Node::Kind::For:
        exec_for(n, out);
        break;
      case Node::Kind::Set: {
        Value v = eval(*n.expr);
        line = n.line;
        if (n.attr.empty()) {
          bind(n.targets, std::move(v));
        } else {
          const Value* ns = lookup(n.text);
          check(ns && ns->kind == Kind::Namespace, "cannot assign attribute '{}' of '{}': not a namespace", n.attr,
                n.text);
          check_storable_in_namespace(v);
          ns->dict->set(n.attr, std::move(v));
        }
        break;
      }
      case Node::Kind::SetBlock: {
        std::string captured;
        exec_body(n.body, captured);
        bind(n.targets, str(std::move(captured)));
        break;
      }
      case Node::Kind::Macro: {
        Value macro = of_kind(Kind::Macro);
        macro.macro = &n;
        assign(n.text, std::move(macro));
        break;
      }
      case Node::Kind::Break:
        return Flow::Break;
      case Node::Kind::Continue:
        return Flow::Continue;
      case Node::Kind::Generation:
        return exec_body(n.body, out);
    }
    return Flow::Normal;
  }

  // Each iteration runs in a scope of its own (what it sets is gone at the next), as in Jinja.
  void exec_for(const Node& n, std::string& out) {
    Value all = eval(*n.expr);
    if (all.kind != Kind::List || n.cond) {  // (a list without a filter is gone over as it is)
      std::vector<Value> items = iterate(all);
      if (n.cond) {
        std::vector<Value> kept;
        for (Value& v : items) {
          push_frame(top_);
          bind(n.targets, v);
          const bool keep = truthy(eval(*n.cond));
          pop_frame();
          if (keep) kept.push_back(std::move(v));
        }
        items = std::move(kept);
      }
      all = list(std::move(items));
    }
    const auto& seq = all.list->items;
    for (size_t i = 0; i < seq.size(); ++i) {
      step();
      push_frame(top_);
      bind(n.targets, seq[i]);
      Value loop = of_kind(Kind::Loop);
      loop.loop = std::make_shared<const LoopData>(LoopData{static_cast<int64_t>(i), all.list});
      assign("loop", std::move(loop));
      const Flow f = exec_body(n.body, out);
      pop_frame();
      if (f == Flow::Break) break;
    }
    if (seq.empty()) exec_body(n.else_body, out);
  }

  void bind(const std::vector<std::string>& targets, Value v) {
    if (targets.size() == 1) return assign(targets[0], std::move(v));
    check(v.kind == Kind::List && v.list->items.size() == targets.size(), "cannot unpack '{}' into {} names",
          type_name(v), targets.size());
    for (size_t i = 0; i < targets.size(); ++i) assign(targets[i], v.list->items[i]);
  }

  Value eval(const Expr& e) {
    Nested nested(*this);
    step();
    line = e.line;
    switch (e.kind) {
      case Expr::Kind::Literal:
        return e.value;
      case Expr::Kind::Name: {
        const Value* v = lookup(e.name);
        return v ? *v : undefined(fmt::format("'{}' is undefined", e.name));
      }
      case Expr::Kind::List: {
        std::vector<Value> items;
        for (const auto& k : e.kids) items.push_back(eval(*k));
        return list(std::move(items), e.tuple);
      }
      case Expr::Kind::Dict: {
        std::vector<std::pair<std::string, Value>> items;
        for (size_t i = 0; i < e.kids.size(); i += 2) {
          const Value key = eval(*e.kids[i]);
          check(key.kind == Kind::String, "dict keys must be strings, not '{}'", type_name(key));
          items.emplace_back(*key.text, eval(*e.kids[i + 1]));
        }
        return dict(std::move(items));
      }
      case Expr::Kind::Attr:
        return attribute(eval(*e.kids[0]), e.name);
      case Expr::Kind::Item: {
        const Value obj = eval(*e.kids[0]);
        return item(obj, eval(*e.kids[1]));
      }
      case Expr::Kind::Slice: {
        const Value obj = eval(*e.kids[0]);
        auto part = [&](int i) { return e.kids[i] ? eval(*e.kids[i]) : Value{}; };
        const Value a = part(1), b = part(2), c = part(3);
        return slice(obj, a, b, c);
      }
      case Expr::Kind::Call:
        return call(e);
      case Expr::Kind::Filter: {
        const Value input = eval(*e.kids[0]);
        const Args args = eval_args(e, 1);
        line = e.line;
        return e.filter(*this, input, args);
      }
      case Expr::Kind::Test: {
        const Value input = eval(*e.kids[0]);
        std::vector<Value> args;
        for (size_t i = 1; i < e.kids.size(); ++i) args.push_back(eval(*e.kids[i]));
        line = e.line;
        return bool_value(e.test(*this, input, args) != e.negated);
      }
      case Expr::Kind::Unary: {
        const Value v = eval(*e.kids[0]);
        if (e.op == Op::Not) return bool_value(!truthy(v));
        if (v.kind == Kind::Undefined) fail_undefined(v);
        check(is_number(v), "bad operand type for unary {}: '{}'", e.op == Op::Neg ? '-' : '+', type_name(v));
        if (e.op == Op::Pos) return v.kind == Kind::Float ? v : int_value(v.integer);
        if (v.kind == Kind::Float) return float_value(-v.number);
        check(v.integer != std::numeric_limits<int64_t>::min(), "integer overflow (beyond 64 bits)");
        return int_value(-v.integer);
      }
      case Expr::Kind::Binary: {
        Value a = eval(*e.kids[0]);
        if (e.op == Op::And) return truthy(a) ? eval(*e.kids[1]) : a;
        if (e.op == Op::Or) return truthy(a) ? a : eval(*e.kids[1]);
        const Value b = eval(*e.kids[1]);
        line = e.line;
        return arithmetic(e.op, a, b);
      }
      case Expr::Kind::Compare: {
        Value left = eval(*e.kids[0]);
        for (size_t i = 0; i < e.ops.size(); ++i) {
          Value right = eval(*e.kids[i + 1]);
          line = e.line;
          if (!compare(e.ops[i], left, right)) return bool_value(false);
          left = std::move(right);
        }
        return bool_value(true);
      }
      case Expr::Kind::Cond:
        if (truthy(eval(*e.kids[1]))) return eval(*e.kids[0]);
        return e.kids[2] ? eval(*e.kids[2]) : undefined("the inline if had no else");
    }
    return Value{};
  }

  Args eval_args(const Expr& e, size_t first) {
    Args args;
    for (size_t i = first; i < e.kids.size(); ++i) {
      const std::string& kw = e.keywords[i - first];
      if (kw.empty())
        args.pos.push_back(eval(*e.kids[i]));
      else
        args.named.emplace_back(kw, eval(*e.kids[i]));
    }
    return args;
  }

  Value call(const Expr& e);
  Value call_macro(const Node& m, const Args& args);

  // ---- Scopes ----
  // A stack of frames, each looking up its variables, then its parent's: a loop iteration's parent is the
  // scope of the loop, a macro call's the template's (frame 0), as Jinja's closures are.

  const Value* lookup(const std::string& name) const {
    for (int f = top_; f >= 0; f = frames_[f].parent)
      for (const auto& [k, v] : frames_[f].vars)
        if (k == name) return &v;
    return nullptr;
  }
  void assign(const std::string& name, Value v) {
    for (auto& [k, old] : frames_[top_].vars)
      if (k == name) return void(old = std::move(v));
    frames_[top_].vars.emplace_back(name, std::move(v));
  }
  void push_frame(int parent) {
    frames_.push_back({{}, parent});
    top_ = static_cast<int>(frames_.size()) - 1;
  }
  void pop_frame() {
    frames_.pop_back();
    top_ = static_cast<int>(frames_.size()) - 1;
  }

 private:
  struct Frame {
    std::vector<std::pair<std::string, Value>> vars;
    int parent;
  };
  std::vector<Frame> frames_;
  int top_ = 0;
  int depth_ = 0;
  int64_t steps_ = 0;
  int64_t bytes_ = 0;
};

// A macro runs in a frame of its own under the template's; its output is its value.
Value Renderer::call_macro(const Node& m, const Args& args) {
  check(args.pos.size() <= m.params.size(), "macro '{}' takes {} arguments ({} given)", m.text, m.params.size(),
        args.pos.size());
  for (const auto& [name, v] : args.named)
    check(std::find(m.params.begin(), m.params.end(), name) != m.params.end(), "macro '{}' has no argument '{}'",
          m.text, name);
  push_frame(0);
  for (size_t i = 0; i < m.params.size(); ++i) {
    const Value* v = i < args.pos.size() ? &args.pos[i] : nullptr;
    for (const auto& [name, nv] : args.named)
      if (name == m.params[i]) {
        check(!v, "macro '{}' got argument '{}' twice", m.text, name);
        v = &nv;
      }
    assign(m.params[i], v               ? *v
                        : m.defaults[i] ? eval(*m.defaults[i])
                                        : undefined(fmt::format("'{}' is undefined", m.params[i])));
  }
  std::string out;
  exec_body(m.body, out);
  pop_frame();  // (a failure abandons the whole render, so frames need no unwinding then)
  return str(std::move(out));
}

// ---- Filters ----

Value filter_trim(Renderer& r, const Value& v, const Args& a) {
  const auto p = a.bind("trim", {"chars"});
  const Value s = r.as_string_value(v);
  const std::string* chars = given(p[0]) && p[0].kind != Kind::None ? &str_arg(p[0], "trim's chars") : nullptr;
  r.scan(s.text->size());
  return r.str(std::string(py_strip(*s.text, chars, true, true)));
}

// Jinja's default(value, boolean=false): the value, or the default when it is undefined (or falsy).
Value filter_default(Renderer&, const Value& v, const Args& a) {
  const auto p = a.bind("default", {"default_value", "boolean"});
  const bool replace = v.kind == Kind::Undefined || (truthy(p[1]) && !truthy(v));
  if (!replace) return v;
  return given(p[0]) ? p[0] : literal_string("");
}

Value filter_length(Renderer& r, const Value& v, const Args& a) {
  a.bind("length", {});
  return int_value(r.length(v));
}

Value filter_string(Renderer& r, const Value& v, const Args& a) {
  a.bind("string", {});
  return r.as_string_value(v);
}

Value filter_safe(Renderer&, const Value& v, const Args& a) {
  a.bind("safe", {});
  return v;
}

Value map_chars(Renderer& r, const Value& v, char (*f)(char)) {
  std::string s = r.to_str(v);
  r.scan(s.size());
  std::transform(s.begin(), s.end(), s.begin(), f);
  return r.str(std::move(s));
}
Value filter_upper(Renderer& r, const Value& v, const Args& a) {
  a.bind("upper", {});
  return map_chars(r, v, ascii_upper);
}
Value filter_lower(Renderer& r, const Value& v, const Args& a) {
  a.bind("lower", {});
  return map_chars(r, v, ascii_lower);
}

// Upper-cases the first letter of each word and lower-cases the rest; a word starts where starts_word says.
Value capitalize_words(Renderer& r, const Value& v, bool (*starts_word)(char prev)) {
  std::string s = r.to_str(v);
  r.scan(s.size());
  for (size_t i = 0; i < s.size(); ++i) s[i] = i == 0 || starts_word(s[i - 1]) ? ascii_upper(s[i]) : ascii_lower(s[i]);
  return r.str(std::move(s));
}
// Jinja's title filter: words begin after whitespace, '-', and opening brackets.
bool after_title_break(char prev) {
  return ascii_space(prev) || prev == '-' || prev == '(' || prev == '{' || prev == '[' || prev == '<';
}
// Python's str.title(): words begin after anything that is not a letter (non-ASCII counted as letters).
bool after_non_letter(char prev) { return !ascii_alpha(prev) && static_cast<unsigned char>(prev) < 0x80; }
bool never(char) { return false; }

Value filter_title(Renderer& r, const Value& v, const Args& a) {
  a.bind("title", {});
  return capitalize_words(r, v, after_title_break);
}
Value filter_capitalize(Renderer& r, const Value& v, const Args& a) {
  a.bind("capitalize", {});
  return capitalize_words(r, v, never);
}

Value filter_tojson(Renderer& r, const Value& v, const Args& a) {
  const auto p = a.bind("tojson", {"ensure_ascii", "indent", "separators", "sort_keys"});
  JsonStyle style;
  style.ascii = truthy(p[0]);
  if (given(p[1]) && p[1].kind != Kind::None) {
    style.indented = true;
    style.item_sep = ",";
    style.indent = p[1].kind == Kind::String
                       ? *p[1].text
                       : std::string(std::clamp<int64_t>(int_arg(p[1], "tojson's indent"), 0, 1 << 10), ' ');
  }
  if (given(p[2]) && p[2].kind != Kind::None) {
    check(p[2].kind == Kind::List && p[2].list->items.size() == 2, "tojson's separators must be a pair of strings");
    style.item_sep = str_arg(p[2].list->items[0], "a separator");
    style.key_sep = str_arg(p[2].list->items[1], "a separator");
  }
  style.sort_keys = truthy(p[3]);
  std::string out;
  r.write_json(out, v, style, 0);
  return r.str(std::move(out));
}

// Python's int(): whitespace around, an optional sign, digits with single underscores between them.
std::optional<int64_t> parse_int(std::string_view s, int base) {
  s = py_strip(s, nullptr, true, true);
  std::string digits;
  for (size_t i = 0; i < s.size(); ++i)
    if (s[i] != '_' || (i > 0 && i + 1 < s.size() && s[i - 1] != '_' && s[i + 1] != '_')) digits += s[i];
  bool negative = false;
  std::string_view rest = digits;
  if (!rest.empty() && (rest[0] == '+' || rest[0] == '-')) {
    negative = rest[0] == '-';
    rest.remove_prefix(1);
  }
  // int('0x1A', 16) as Python reads it: the prefix of the base is allowed.
  const char prefix = base == 16 ? 'x' : base == 8 ? 'o' : base == 2 ? 'b' : 0;
  if (prefix && rest.size() > 2 && rest[0] == '0' && (rest[1] | 32) == prefix) rest.remove_prefix(2);
  uint64_t magnitude = 0;
  auto r = std::from_chars(rest.data(), rest.data() + rest.size(), magnitude, base);
  if (rest.empty() || r.ec != std::errc() || r.ptr != rest.data() + rest.size()) return std::nullopt;
  const uint64_t limit = static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) + (negative ? 1 : 0);
  if (magnitude > limit) return std::nullopt;
  return negative ? static_cast<int64_t>(0 - magnitude) : static_cast<int64_t>(magnitude);
}

std::optional<double> parse_float(std::string_view s) {
  const std::string t(py_strip(s, nullptr, true, true));
  if (t.empty()) return std::nullopt;
  char* end = nullptr;
  const double d = std::strtod(t.c_str(), &end);
  if (end != t.c_str() + t.size()) return std::nullopt;
  return d;
}

// attribute='a.b.0': the item reached by each step (a dict key, or a list index where it is a number).
Value lookup_path(Renderer& r, const Value& v, const std::string& path) {
  Value cur = v;
  size_t start = 0;
  while (true) {
    const size_t dot = path.find('.', start);
    const std::string part = path.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    const auto index = parse_int(part, 10);
    cur = index && cur.kind == Kind::List ? r.item(cur, int_value(*index)) : r.attribute(cur, part);
    if (dot == std::string::npos) return cur;
    start = dot + 1;
  }
}

Value filter_join(Renderer& r, const Value& v, const Args& a) {
  const auto p = a.bind("join", {"d", "attribute"});
  const std::string sep = given(p[0]) ? r.to_str(p[0]) : "";
  std::string out;
  bool first = true;
  for (const Value& item : r.iterate(v)) {
    if (!first) r.append(out, sep);
    first = false;
    r.write(out, given(p[1]) ? lookup_path(r, item, r.to_str(p[1])) : item, false);
  }
  return r.str(std::move(out));
}

Value filter_first(Renderer& r, const Value& v, const Args& a) {
  a.bind("first", {});
  auto items = r.iterate(v);
  return items.empty() ? undefined("first of an empty sequence") : items.front();
}

Value filter_last(Renderer& r, const Value& v, const Args& a) {
  a.bind("last", {});
  auto items = r.iterate(v);
  return items.empty() ? undefined("last of an empty sequence") : items.back();
}

Value filter_list(Renderer& r, const Value& v, const Args& a) {
  a.bind("list", {});
  return r.list(r.iterate(v));
}

Value filter_reverse(Renderer& r, const Value& v, const Args& a) {
  a.bind("reverse", {});
  auto items = r.iterate(v);
  std::reverse(items.begin(), items.end());
  if (v.kind != Kind::String) return r.list(std::move(items));
  std::string out;
  for (const Value& c : items) out += *c.text;
  return r.str(std::move(out));
}

// Jinja's int(default=0, base=10): the number, or the default when the value is not one.
Value filter_int(Renderer&, const Value& v, const Args& a) {
  const auto p = a.bind("int", {"default", "base"});
  const Value fallback = given(p[0]) ? p[0] : int_value(0);
  if (is_integral(v)) return int_value(v.integer);
  if (v.kind == Kind::Float) {
    if (!std::isfinite(v.number) || std::fabs(v.number) >= 9.2e18) return fallback;
    return int_value(static_cast<int64_t>(v.number));
  }
  if (v.kind != Kind::String) return fallback;
  const int64_t base = given(p[1]) ? int_arg(p[1], "int's base") : 10;
  check(base >= 2 && base <= 36, "int() base must be between 2 and 36");
  if (auto i = parse_int(*v.text, static_cast<int>(base))) return int_value(*i);
  if (auto d = parse_float(*v.text); d && std::isfinite(*d) && std::fabs(*d) < 9.2e18)
    return int_value(static_cast<int64_t>(*d));
  return fallback;
}

Value filter_float(Renderer&, const Value& v, const Args& a) {
  const auto p = a.bind("float", {"default"});
  if (is_number(v)) return float_value(as_double(v));
  if (v.kind == Kind::String)
    if (auto d = parse_float(*v.text)) return float_value(*d);
  return given(p[0]) ? p[0] : float_value(0);
}

Value filter_abs(Renderer&, const Value& v, const Args& a) {
  a.bind("abs", {});
  check(is_number(v), "bad operand type for abs(): '{}'", type_name(v));
  if (v.kind == Kind::Float) return float_value(std::fabs(v.number));
  check(v.integer != std::numeric_limits<int64_t>::min(), "integer overflow (beyond 64 bits)");
  return int_value(std::abs(v.integer));
}

// Jinja's round(precision=0, method='common'): a float; common rounds as Python's round (half to even).
Value filter_round(Renderer& r, const Value& v, const Args& a) {
  const auto p = a.bind("round", {"precision", "method"});
  check(is_number(v), "round needs a number, not '{}'", type_name(v));
  const int64_t precision = given(p[0]) ? std::clamp<int64_t>(int_arg(p[0], "round's precision"), -308, 308) : 0;
  const std::string method = given(p[1]) ? r.to_str(p[1]) : "common";
  double (*f)(double) = method == "common"  ? static_cast<double (*)(double)>(std::nearbyint)
                        : method == "ceil"  ? static_cast<double (*)(double)>(std::ceil)
                        : method == "floor" ? static_cast<double (*)(double)>(std::floor)
                                            : nullptr;
  check(f != nullptr, "round's method must be common, ceil or floor");
  const double scale = std::pow(10.0, static_cast<double>(precision));
  const double rounded = f(as_double(v) * scale) / scale;
  // Python's round() of an int is an int; math.ceil and floor, as Jinja divides them back, give floats.
  if (is_integral(v) && method == "common")
    return int_value(precision >= 0 ? v.integer : static_cast<int64_t>(rounded));
  return float_value(rounded);
}

Value filter_items(Renderer& r, const Value& v, const Args& a) {
  a.bind("items", {});
  if (v.kind == Kind::Undefined) return r.list({});
  check(v.kind == Kind::Dict, "items needs a dict, not '{}'", type_name(v));
  std::vector<Value> pairs;
  for (const auto& [k, val] : v.dict->items) pairs.push_back(r.list({r.str(k), val}, true));
  return r.list(std::move(pairs));
}

// The sort key of unique, sort and dictsort: case_sensitive=false compares strings lower-cased.
Value sort_key(Renderer& r, const Value& v, bool case_sensitive) {
  if (case_sensitive || v.kind != Kind::String) return v;
  return map_chars(r, v, ascii_lower);
}

Value filter_unique(Renderer& r, const Value& v, const Args& a) {
  const auto p = a.bind("unique", {"case_sensitive", "attribute"});
  std::vector<Value> out, seen;
  for (const Value& item : r.iterate(v)) {
    const Value key = sort_key(r, given(p[1]) ? lookup_path(r, item, r.to_str(p[1])) : item, truthy(p[0]));
    bool dup = false;
    for (const Value& s : seen) {
      r.step();
      if ((dup = py_equal(s, key))) break;
    }
    if (!dup) {
      seen.push_back(key);
      out.push_back(item);
    }
  }
  return r.list(std::move(out));
}

// The items of (key, item) pairs in the order of their keys, stably (as Python's sorted).
Value sorted_items(Renderer& r, std::vector<std::pair<Value, Value>> keyed, bool reverse) {
  std::stable_sort(keyed.begin(), keyed.end(), [&](const auto& x, const auto& y) {
    r.step();
    return reverse ? py_compare(y.first, x.first, "<") < 0 : py_compare(x.first, y.first, "<") < 0;
  });
  std::vector<Value> out;
  for (auto& kv : keyed) out.push_back(std::move(kv.second));
  return r.list(std::move(out));
}

Value filter_sort(Renderer& r, const Value& v, const Args& a) {
  const auto p = a.bind("sort", {"reverse", "case_sensitive", "attribute"});
  std::vector<std::pair<Value, Value>> keyed;
  for (const Value& item : r.iterate(v))
    keyed.emplace_back(sort_key(r, given(p[2]) ? lookup_path(r, item, r.to_str(p[2])) : item, truthy(p[1])), item);
  return sorted_items(r, std::move(keyed), truthy(p[0]));
}

Value filter_dictsort(Renderer& r, const Value& v, const Args& a) {
  const auto p = a.bind("dictsort", {"case_sensitive", "by", "reverse"});
  check(v.kind == Kind::Dict, "dictsort needs a dict, not '{}'", type_name(v));
  const std::string by = given(p[1]) ? r.to_str(p[1]) : "key";
  check(by == "key" || by == "value", "dictsort's by must be 'key' or 'value'");
  std::vector<std::pair<Value, Value>> keyed;
  for (const auto& [k, val] : v.dict->items)
    keyed.emplace_back(sort_key(r, by == "key" ? r.str(k) : val, truthy(p[0])), r.list({r.str(k), val}, true));
  return sorted_items(r, std::move(keyed), truthy(p[2]));
}

const std::unordered_map<std::string_view, FilterFn>& filters();
const std::unordered_map<std::string_view, std::pair<TestFn, int>>& tests();

// select/reject(test, args...), selectattr/rejectattr(attribute, test, args...): the items passing (or
// failing) the test; without a test, the item's truth.
Value select_items(Renderer& r, const Value& v, const Args& a, bool by_attribute, bool keep, const char* what) {
  check(a.named.empty(), "{} takes no keyword arguments", what);
  size_t next = 0;
  std::string attr;
  if (by_attribute) {
    check(!a.pos.empty(), "{} needs an attribute", what);
    attr = str_arg(a.pos[next++], "the attribute");
  }
  TestFn test = nullptr;
  if (next < a.pos.size()) {
    const std::string& name = str_arg(a.pos[next++], "the test");
    auto it = tests().find(name);
    check(it != tests().end(), "no test named '{}'", name);
    test = it->second.first;
    check(a.pos.size() - next == static_cast<size_t>(it->second.second), "test '{}' takes {} argument(s)", name,
          it->second.second);
  }
  const std::vector<Value> test_args(a.pos.begin() + static_cast<std::ptrdiff_t>(next), a.pos.end());
  std::vector<Value> out;
  for (const Value& item : r.iterate(v)) {
    const Value subject = by_attribute ? lookup_path(r, item, attr) : item;
    if ((test ? test(r, subject, test_args) : truthy(subject)) == keep) out.push_back(item);
  }
  return r.list(std::move(out));
}
Value filter_select(Renderer& r, const Value& v, const Args& a) { return select_items(r, v, a, false, true, "select"); }
Value filter_reject(Renderer& r, const Value& v, const Args& a) {
  return select_items(r, v, a, false, false, "reject");
}
Value filter_selectattr(Renderer& r, const Value& v, const Args& a) {
  return select_items(r, v, a, true, true, "selectattr");
}
Value filter_rejectattr(Renderer& r, const Value& v, const Args& a) {
  return select_items(r, v, a, true, false, "rejectattr");
}

// map(attribute='x', default=...) or map('filter', args...).
Value filter_map(Renderer& r, const Value& v, const Args& a) {
  std::vector<Value> out;
  if (a.pos.empty()) {
    const auto p = a.bind("map", {"attribute", "default"});
    const std::string path = str_arg(p[0], "map's attribute");
    for (const Value& item : r.iterate(v)) {
      Value got = lookup_path(r, item, path);
      out.push_back(got.kind == Kind::Undefined && given(p[1]) ? p[1] : got);
    }
    return r.list(std::move(out));
  }
  const std::string& name = str_arg(a.pos[0], "map's filter");
  auto it = filters().find(name);
  check(it != filters().end(), "no filter named '{}'", name);
  Args rest{std::vector<Value>(a.pos.begin() + 1, a.pos.end()), a.named};
  for (const Value& item : r.iterate(v)) out.push_back(it->second(r, item, rest));
  return r.list(std::move(out));
}

// Python's str.replace(old, new, count): an empty old inserts new between code points.
std::string replace_text(Renderer& r, const std::string& s, const std::string& old, const std::string& with,
                         int64_t count) {
  r.scan(s.size());
  std::string out;
  if (old.empty()) {
    const auto starts = char_starts(s);
    for (size_t i = 0; i + 1 < starts.size(); ++i) {
      if (count < 0 || static_cast<int64_t>(i) < count) r.append(out, with);
      r.append(out, std::string_view(s).substr(starts[i], starts[i + 1] - starts[i]));
    }
    if (count < 0 || static_cast<int64_t>(starts.size() - 1) < count) r.append(out, with);
    return out;
  }
  size_t pos = 0;
  for (int64_t done = 0; count < 0 || done < count; ++done) {
    const size_t hit = s.find(old, pos);
    if (hit == std::string::npos) break;
    r.append(out, std::string_view(s).substr(pos, hit - pos));
    r.append(out, with);
    pos = hit + old.size();
  }
  r.append(out, std::string_view(s).substr(pos));
  return out;
}

Value filter_replace(Renderer& r, const Value& v, const Args& a) {
  const auto p = a.bind("replace", {"old", "new", "count"});
  const int64_t count = given(p[2]) && p[2].kind != Kind::None ? int_arg(p[2], "replace's count") : -1;
  return r.str(replace_text(r, r.to_str(v), r.to_str(p[0]), r.to_str(p[1]), count));
}

// Jinja's indent(width=4, first=false, blank=false): indents every line but the first (and blank lines).
Value filter_indent(Renderer& r, const Value& v, const Args& a) {
  const auto p = a.bind("indent", {"width", "first", "blank"});
  const std::string pad = !given(p[0]) ? "    "
                          : p[0].kind == Kind::String
                              ? *p[0].text
                              : std::string(std::clamp<int64_t>(int_arg(p[0], "indent's width"), 0, 1 << 10), ' ');
  const std::string s = r.to_str(v);
  r.scan(s.size());
  std::vector<std::string_view> lines;
  for (size_t start = 0; start < s.size();) {
    const size_t nl = s.find('\n', start);
    lines.push_back(std::string_view(s).substr(start, (nl == std::string::npos ? s.size() : nl) - start));
    start = nl == std::string::npos ? s.size() : nl + 1;
  }
  if (!s.empty() && s.back() == '\n') lines.emplace_back();  // the empty line after a final newline
  std::string out;
  for (size_t i = 0; i < lines.size(); ++i) {
    if (i) r.append(out, "\n");
    if ((i > 0 || truthy(p[1])) && (truthy(p[2]) || !lines[i].empty())) r.append(out, pad);
    r.append(out, lines[i]);
  }
  return r.str(std::move(out));
}

const std::unordered_map<std::string_view, FilterFn>& filters() {
  static const std::unordered_map<std::string_view, FilterFn> table = {
      {"abs", filter_abs},
      {"capitalize", filter_capitalize},
      {"count", filter_length},
      {"d", filter_default},
      {"default", filter_default},
      {"dictsort", filter_dictsort},
      {"first", filter_first},
      {"float", filter_float},
      {"indent", filter_indent},
      {"int", filter_int},
      {"items", filter_items},
      {"join", filter_join},
      {"last", filter_last},
      {"length", filter_length},
      {"list", filter_list},
      {"lower", filter_lower},
      {"map", filter_map},
      {"reject", filter_reject},
      {"rejectattr", filter_rejectattr},
      {"replace", filter_replace},
      {"reverse", filter_reverse},
      {"round", filter_round},
      {"safe", filter_safe},
      {"select", filter_select},
      {"selectattr", filter_selectattr},
      {"sort", filter_sort},
      {"string", filter_string},
      {"title", filter_title},
      {"tojson", filter_tojson},
      {"trim", filter_trim},
      {"unique", filter_unique},
      {"upper", filter_upper},
  };
  return table;
}

// ---- Tests ----

bool test_defined(Renderer&, const Value& v, const std::vector<Value>&) { return v.kind != Kind::Undefined; }
bool test_undefined(Renderer&, const Value& v, const std::vector<Value>&) { return v.kind == Kind::Undefined; }
bool test_none(Renderer&, const Value& v, const std::vector<Value>&) { return v.kind == Kind::None; }
bool test_boolean(Renderer&, const Value& v, const std::vector<Value>&) { return v.kind == Kind::Bool; }
bool test_true(Renderer&, const Value& v, const std::vector<Value>&) { return v.kind == Kind::Bool && v.integer; }
bool test_false(Renderer&, const Value& v, const std::vector<Value>&) { return v.kind == Kind::Bool && !v.integer; }
bool test_integer(Renderer&, const Value& v, const std::vector<Value>&) { return v.kind == Kind::Int; }
bool test_float(Renderer&, const Value& v, const std::vector<Value>&) { return v.kind == Kind::Float; }
bool test_number(Renderer&, const Value& v, const std::vector<Value>&) { return is_number(v); }
bool test_string(Renderer&, const Value& v, const std::vector<Value>&) { return v.kind == Kind::String; }
bool test_mapping(Renderer&, const Value& v, const std::vector<Value>&) { return v.kind == Kind::Dict; }
// As Python's iter() and len()/[] find them: Jinja's Undefined has both.
bool test_iterable(Renderer&, const Value& v, const std::vector<Value>&) {
  return v.kind == Kind::Undefined || v.kind == Kind::String || v.kind == Kind::List || v.kind == Kind::Dict;
}
bool test_callable(Renderer&, const Value& v, const std::vector<Value>&) { return v.kind == Kind::Macro; }
bool test_odd(Renderer&, const Value& v, const std::vector<Value>&) { return int_arg(v, "odd's value") % 2 != 0; }
bool test_even(Renderer&, const Value& v, const std::vector<Value>&) { return int_arg(v, "even's value") % 2 == 0; }
bool test_divisibleby(Renderer&, const Value& v, const std::vector<Value>& a) {
  const int64_t d = int_arg(a[0], "divisibleby's argument");
  check(d != 0, "integer division or modulo by zero");
  return d == -1 || int_arg(v, "divisibleby's value") % d == 0;
}
bool test_eq(Renderer&, const Value& v, const std::vector<Value>& a) { return py_equal(v, a[0]); }
bool test_ne(Renderer&, const Value& v, const std::vector<Value>& a) { return !py_equal(v, a[0]); }
bool test_lt(Renderer&, const Value& v, const std::vector<Value>& a) { return py_compare(v, a[0], "<") < 0; }
bool test_le(Renderer&, const Value& v, const std::vector<Value>& a) { return py_compare(v, a[0], "<=") <= 0; }
bool test_gt(Renderer&, const Value& v, const std::vector<Value>& a) { return py_compare(v, a[0], ">") > 0; }
bool test_ge(Renderer&, const Value& v, const std::vector<Value>& a) { return py_compare(v, a[0], ">=") >= 0; }
bool test_in(Renderer& r, const Value& v, const std::vector<Value>& a) { return r.contains(a[0], v); }
// `is sameas`: Python's identity, which for the values a template compares (none, booleans) is equality.
bool test_sameas(Renderer&, const Value& v, const std::vector<Value>& a) {
  return v.kind == a[0].kind && py_equal(v, a[0]);
}
bool cased_all(const Value& v, bool upper) {
  if (v.kind != Kind::String) return false;
  bool cased = false;
  for (char c : *v.text) {
    if (!ascii_alpha(c)) continue;
    if ((c >= 'A' && c <= 'Z') != upper) return false;
    cased = true;
  }
  return cased;
}
bool test_lower(Renderer&, const Value& v, const std::vector<Value>&) { return cased_all(v, false); }
bool test_upper(Renderer&, const Value& v, const std::vector<Value>&) { return cased_all(v, true); }

// Each test with the number of arguments it takes.
const std::unordered_map<std::string_view, std::pair<TestFn, int>>& tests() {
  static const std::unordered_map<std::string_view, std::pair<TestFn, int>> table = {
      {"defined", {test_defined, 0}},
      {"undefined", {test_undefined, 0}},
      {"none", {test_none, 0}},
      {"boolean", {test_boolean, 0}},
      {"true", {test_true, 0}},
      {"false", {test_false, 0}},
      {"integer", {test_integer, 0}},
      {"float", {test_float, 0}},
      {"number", {test_number, 0}},
      {"string", {test_string, 0}},
      {"mapping", {test_mapping, 0}},
      {"iterable", {test_iterable, 0}},
      {"sequence", {test_iterable, 0}},
      {"callable", {test_callable, 0}},
      {"odd", {test_odd, 0}},
      {"even", {test_even, 0}},
      {"divisibleby", {test_divisibleby, 1}},
      {"eq", {test_eq, 1}},
      {"equalto", {test_eq, 1}},
      {"==", {test_eq, 1}},
      {"ne", {test_ne, 1}},
      {"!=", {test_ne, 1}},
      {"lt", {test_lt, 1}},
      {"lessthan", {test_lt, 1}},
      {"<", {test_lt, 1}},
      {"le", {test_le, 1}},
      {"<=", {test_le, 1}},
      {"gt", {test_gt, 1}},
      {"greaterthan", {test_gt, 1}},
      {">", {test_gt, 1}},
      {"ge", {test_ge, 1}},
      {">=", {test_ge, 1}},
      {"in", {test_in, 1}},
      {"sameas", {test_sameas, 1}},
      {"lower", {test_lower, 0}},
      {"upper", {test_upper, 0}},
  };
  return table;
}

// ---- Methods (of strings, dicts and the loop) ----

Value method_strip_any(Renderer& r, const Value& s, const Args& a, bool left, bool right) {
  const auto p = a.bind("strip", {"chars"});
  const std::string* chars = given(p[0]) && p[0].kind != Kind::None ? &str_arg(p[0], "strip's chars") : nullptr;
  r.scan(s.text->size());
  return r.str(std::string(py_strip(*s.text, chars, left, right)));
}
Value method_strip(Renderer& r, const Value& s, const Args& a) { return method_strip_any(r, s, a, true, true); }
Value method_lstrip(Renderer& r, const Value& s, const Args& a) { return method_strip_any(r, s, a, true, false); }
Value method_rstrip(Renderer& r, const Value& s, const Args& a) { return method_strip_any(r, s, a, false, true); }

// startswith/endswith(prefix): a string, or a tuple of them any of which matches.
Value method_affix(Renderer& r, const Value& s, const Args& a, bool prefix) {
  const auto p = a.bind(prefix ? "startswith" : "endswith", {"affix"});
  std::vector<Value> options = p[0].kind == Kind::List ? p[0].list->items : std::vector<Value>{p[0]};
  for (const Value& o : options) {
    r.step();
    const std::string& t = str_arg(o, prefix ? "startswith's prefix" : "endswith's suffix");
    if (prefix ? s.text->starts_with(t) : s.text->ends_with(t)) return bool_value(true);
  }
  return bool_value(false);
}
Value method_startswith(Renderer& r, const Value& s, const Args& a) { return method_affix(r, s, a, true); }
Value method_endswith(Renderer& r, const Value& s, const Args& a) { return method_affix(r, s, a, false); }

// Python's str.split(sep=None, maxsplit=-1): by sep, or by runs of whitespace ignoring those at the ends.
Value method_split(Renderer& r, const Value& s, const Args& a) {
  const auto p = a.bind("split", {"sep", "maxsplit"});
  const int64_t maxsplit = given(p[1]) ? int_arg(p[1], "split's maxsplit") : -1;
  const std::string_view text = *s.text;
  r.scan(text.size());
  std::vector<Value> parts;
  if (given(p[0]) && p[0].kind != Kind::None) {
    const std::string& sep = str_arg(p[0], "split's separator");
    check(!sep.empty(), "empty separator");
    size_t pos = 0;
    for (size_t hit; (maxsplit < 0 || static_cast<int64_t>(parts.size()) < maxsplit) &&
                     (hit = text.find(sep, pos)) != std::string_view::npos;
         pos = hit + sep.size())
      parts.push_back(r.str(std::string(text.substr(pos, hit - pos))));
    parts.push_back(r.str(std::string(text.substr(pos))));
    return r.list(std::move(parts));
  }
  std::string_view rest = py_strip(text, nullptr, true, false);
  while (!rest.empty()) {
    if (maxsplit >= 0 && static_cast<int64_t>(parts.size()) == maxsplit) {
      parts.push_back(r.str(std::string(py_strip(rest, nullptr, false, true))));
      break;
    }
    size_t end = 0;
    while (end < rest.size()) {
      size_t next = end;
      if (py_space(next_code_point(rest, next))) break;
      end = next;
    }
    parts.push_back(r.str(std::string(rest.substr(0, end))));
    rest = py_strip(rest.substr(end), nullptr, true, false);
  }
  return r.list(std::move(parts));
}

Value method_upper(Renderer& r, const Value& s, const Args& a) { return filter_upper(r, s, a); }
Value method_lower(Renderer& r, const Value& s, const Args& a) { return filter_lower(r, s, a); }
Value method_title(Renderer& r, const Value& s, const Args& a) {
  a.bind("title", {});
  return capitalize_words(r, s, after_non_letter);
}
Value method_capitalize(Renderer& r, const Value& s, const Args& a) { return filter_capitalize(r, s, a); }
Value method_replace(Renderer& r, const Value& s, const Args& a) {
  const auto p = a.bind("replace", {"old", "new", "count"});
  const int64_t count = given(p[2]) ? int_arg(p[2], "replace's count") : -1;
  return r.str(replace_text(r, *s.text, str_arg(p[0], "replace's old"), str_arg(p[1], "replace's new"), count));
}
// sep.join(items), every item a string.
Value method_join(Renderer& r, const Value& s, const Args& a) {
  const auto p = a.bind("join", {"iterable"});
  std::string out;
  bool first = true;
  for (const Value& item : r.iterate(p[0])) {
    if (!first) r.append(out, *s.text);
    first = false;
    r.append(out, str_arg(item, "an item joined"));
  }
  return r.str(std::move(out));
}

Value method_items(Renderer& r, const Value& d, const Args& a) { return filter_items(r, d, a); }
Value method_keys(Renderer& r, const Value& d, const Args& a) {
  a.bind("keys", {});
  return r.list(r.iterate(d));
}
Value method_values(Renderer& r, const Value& d, const Args& a) {
  a.bind("values", {});
  std::vector<Value> out;
  for (const auto& kv : d.dict->items) out.push_back(kv.second);
  return r.list(std::move(out));
}
Value method_get(Renderer&, const Value& d, const Args& a) {
  const auto p = a.bind("get", {"key", "default"});
  const Value* v = p[0].kind == Kind::String ? d.dict->find(*p[0].text) : nullptr;
  return v ? *v : given(p[1]) ? p[1] : none_value();
}

// loop.cycle(a, b, ...): the argument at the iteration's index, round robin.
Value method_cycle(Renderer&, const Value& l, const Args& a) {
  check(a.named.empty() && !a.pos.empty(), "loop.cycle takes one or more positional arguments");
  return a.pos[static_cast<size_t>(l.loop->index0) % a.pos.size()];
}

const std::unordered_map<std::string_view, MethodFn>& methods(Kind kind) {
  static const std::unordered_map<std::string_view, MethodFn> strings = {
      {"strip", method_strip},           {"lstrip", method_lstrip},     {"rstrip", method_rstrip},
      {"startswith", method_startswith}, {"endswith", method_endswith}, {"split", method_split},
      {"upper", method_upper},           {"lower", method_lower},       {"title", method_title},
      {"capitalize", method_capitalize}, {"replace", method_replace},   {"join", method_join},
  };
  static const std::unordered_map<std::string_view, MethodFn> dicts = {
      {"items", method_items}, {"keys", method_keys}, {"values", method_values}, {"get", method_get}};
  static const std::unordered_map<std::string_view, MethodFn> loops = {{"cycle", method_cycle}};
  static const std::unordered_map<std::string_view, MethodFn> none;
  return kind == Kind::String ? strings : kind == Kind::Dict ? dicts : kind == Kind::Loop ? loops : none;
}

bool is_method_name(std::string_view name) {
  for (Kind k : {Kind::String, Kind::Dict, Kind::Loop})
    if (methods(k).contains(name)) return true;
  return false;
}

// ---- Global functions ----

// transformers' raise_exception(message): the template refuses its input.
Value fn_raise_exception(Renderer& r, const Args& a) {
  const auto p = a.bind("raise_exception", {"message"});
  throw Error(r.to_str(p[0]));
}

Value fn_range(Renderer& r, const Args& a) {
  check(a.named.empty() && !a.pos.empty() && a.pos.size() <= 3, "range takes 1 to 3 integer arguments");
  int64_t start = 0, stop, stride = 1;
  if (a.pos.size() == 1) {
    stop = int_arg(a.pos[0], "range's argument");
  } else {
    start = int_arg(a.pos[0], "range's start");
    stop = int_arg(a.pos[1], "range's stop");
    if (a.pos.size() == 3) stride = int_arg(a.pos[2], "range's step");
  }
  check(stride != 0, "range() arg 3 must not be zero");
  const __int128 span = stride > 0 ? __int128{stop} - start : __int128{start} - stop;
  const __int128 count = span <= 0 ? 0 : (span - 1) / (stride > 0 ? __int128{stride} : -__int128{stride}) + 1;
  r.step(static_cast<int64_t>(std::min<__int128>(count, kMaxSteps + 1)));
  r.check_room(static_cast<int64_t>(count) * static_cast<int64_t>(sizeof(Value)));
  std::vector<Value> items;
  for (int64_t k = 0; k < static_cast<int64_t>(count); ++k)
    items.push_back(int_value(static_cast<int64_t>(start + __int128{k} * stride)));
  return r.list(std::move(items));
}

// The items of namespace(...) and dict(...): those of a dict given, then the name=value arguments.
std::vector<std::pair<std::string, Value>> keyword_items(const Args& a, const char* what) {
  check(a.pos.empty() || (a.pos.size() == 1 && a.pos[0].kind == Kind::Dict),
        "{} takes at most one positional argument, a dict", what);
  std::vector<std::pair<std::string, Value>> items;
  if (!a.pos.empty()) items = a.pos[0].dict->items;
  items.insert(items.end(), a.named.begin(), a.named.end());
  return items;
}

// namespace(...): the one mutable object (set ns.name = ...), which carries values out of loops.
Value fn_namespace(Renderer& r, const Args& a) { return r.dict(keyword_items(a, "namespace"), Kind::Namespace); }
Value fn_dict(Renderer& r, const Args& a) { return r.dict(keyword_items(a, "dict")); }

// transformers' strftime_now(format): the local time now, formatted.
Value fn_strftime_now(Renderer& r, const Args& a) {
  const auto p = a.bind("strftime_now", {"format"});
  const std::string& format = str_arg(p[0], "strftime_now's format");
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  localtime_r(&now, &tm);
  // A conversion spec expands to at most a few dozen bytes; strftime returns 0 only for an empty result then.
  std::string out(64 + 32 * format.size(), '\0');
  r.charge_bytes(static_cast<int64_t>(out.size()));
  out.resize(std::strftime(out.data(), out.size(), format.c_str(), &tm));
  return r.str(std::move(out));
}

const std::unordered_map<std::string_view, FunctionFn>& functions() {
  static const std::unordered_map<std::string_view, FunctionFn> table = {
      {"raise_exception", fn_raise_exception}, {"range", fn_range}, {"namespace", fn_namespace}, {"dict", fn_dict},
      {"strftime_now", fn_strftime_now},
  };
  return table;
}

// A call: a method (obj.name(...)), a macro, or a global function, in that order of lookup.
Value Renderer::call(const Expr& e) {
  if (e.kids[0]) {
    const Value obj = eval(*e.kids[0]);
    const Args args = eval_args(e, 1);
    line = e.line;
    if (obj.kind == Kind::Undefined) fail_undefined(obj);
    auto it = methods(obj.kind).find(e.name);
    check(it != methods(obj.kind).end(), "'{}' object has no method '{}'", type_name(obj), e.name);
    return it->second(*this, obj, args);
  }
  const Args args = eval_args(e, 1);
  line = e.line;
  if (const Value* v = lookup(e.name)) {
    check(v->kind == Kind::Macro, "'{}' is not callable (it is a '{}')", e.name, type_name(*v));
    return call_macro(*v->macro, args);
  }
  auto it = functions().find(e.name);
  check(it != functions().end(), "'{}' is undefined", e.name);
  return it->second(*this, args);
}

// ---- Parser ----
// Jinja's grammar and precedence: or < and < not < comparisons < + - < ~ < * / // % < ** < unary - + <
// filters and tests (x|f, x is t) < postfix (.attr, [key], [a:b], calls) < atoms.

class Parser {
 public:
  explicit Parser(std::vector<Token> tokens) : t_(std::move(tokens)) {}

  Body parse_template() {
    Body body = parse_body({}, nullptr, 0);
    for (const auto& [name, line] : calls_)
      if (!functions().contains(name) && !macros_.contains(name))
        fail("chat template line {}: unknown function '{}'", line, name);
    return body;
  }

 private:
  [[noreturn]] void error(std::string_view what) const { fail("chat template line {}: {}", peek().line, what); }

  const Token& peek(size_t ahead = 0) const { return t_[std::min(i_ + ahead, t_.size() - 1)]; }
  Token next() {
    Token t = peek();
    if (i_ < t_.size() - 1) ++i_;
    return t;
  }
  bool at_op(std::string_view op, size_t ahead = 0) const {
    return peek(ahead).type == Tok::Op && peek(ahead).text == op;
  }
  bool at_name(std::string_view name, size_t ahead = 0) const {
    return peek(ahead).type == Tok::Name && peek(ahead).text == name;
  }
  std::string shown(const Token& t) const {
    const char* d = describe(t);
    return d ? d : "'" + t.text + "'";
  }
  void expect_op(std::string_view op) {
    if (!at_op(op)) error(fmt::format("expected '{}', found {}", op, shown(peek())));
    next();
  }
  void expect(Tok type, const char* what) {
    if (peek().type != type) error(fmt::format("expected {}, found {}", what, shown(peek())));
    next();
  }
  std::string expect_name(const char* what) {
    if (peek().type != Tok::Name) error(fmt::format("expected {}, found {}", what, shown(peek())));
    return next().text;
  }

  class Deeper {
   public:
    explicit Deeper(Parser& p) : p_(p) {
      if (++p_.depth_ > kMaxParseDepth) p_.error(fmt::format("nested deeper than {} levels", kMaxParseDepth));
    }
    ~Deeper() { --p_.depth_; }
    Deeper(const Deeper&) = delete;
    Deeper& operator=(const Deeper&) = delete;

   private:
    Parser& p_;
  };

  // ---- Statements ----

  // Nodes up to a {% tag %} named in `ends` (left unread), or the end of the template when ends is empty.
  Body parse_body(std::initializer_list<std::string_view> ends, const char* opener, int opener_line) {
    Body body;
    while (true) {
      const Token& t = peek();
      if (t.type == Tok::End) {
        if (ends.size() == 0) return body;
        fail("chat template line {}: '{}' is never closed (expected '{}')", opener_line, opener, *(ends.end() - 1));
      }
      if (t.type == Tok::Text) {
        auto n = node(Node::Kind::Text);
        n->text = next().text;
        body.push_back(std::move(n));
      } else if (t.type == Tok::VarBegin) {
        next();
        auto n = node(Node::Kind::Output);
        n->expr = parse_tuple();
        expect(Tok::VarEnd, "'}}'");
        body.push_back(std::move(n));
      } else {
        next();  // {%
        if (peek().type == Tok::Name && std::find(ends.begin(), ends.end(), peek().text) != ends.end()) {
          --i_;  // the caller reads the closing tag
          return body;
        }
        body.push_back(parse_statement());
      }
    }
  }

  // The closing tag's name (after parse_body stopped at it), with its %}.
  std::string end_tag() {
    next();  // {%
    std::string name = next().text;
    expect(Tok::BlockEnd, "'%}'");
    return name;
  }

  std::unique_ptr<Node> node(Node::Kind kind) {
    auto n = std::make_unique<Node>();
    n->kind = kind;
    n->line = peek().line;
    return n;
  }

  std::unique_ptr<Node> parse_statement() {
    Deeper deeper(*this);
    if (peek().type != Tok::Name) error(fmt::format("expected a statement name, found {}", shown(peek())));
    const std::string name = peek().text;
    if (name == "if") return parse_if();
    if (name == "for") return parse_for();
    if (name == "set") return parse_set();
    if (name == "macro") return parse_macro();
    if (name == "generation") {
      auto n = node(Node::Kind::Generation);
      next();
      expect(Tok::BlockEnd, "'%}'");
      n->body = parse_body({"endgeneration"}, "generation", n->line);
      end_tag();
      return n;
    }
    if (name == "break" || name == "continue") {
      auto n = node(name == "break" ? Node::Kind::Break : Node::Kind::Continue);
      if (loops_ == 0) error(fmt::format("'{}' outside a loop", name));
      next();
      expect(Tok::BlockEnd, "'%}'");
      return n;
    }
    static const std::unordered_set<std::string_view> kJinja = {
        "call", "filter", "include", "import", "from", "extends", "block", "raw", "with", "autoescape", "do", "trans"};
    if (kJinja.contains(name)) error(fmt::format("unsupported statement '{}'", name));
    if (name.starts_with("end") || name == "elif" || name == "else")
      error(fmt::format("unexpected '{}' (no open block it belongs to)", name));
    error(fmt::format("unknown statement '{}'", name));
  }

  std::unique_ptr<Node> parse_if() {
    auto n = node(Node::Kind::If);
    next();
    std::unique_ptr<Expr> cond = parse_expression(false);
    while (true) {
      expect(Tok::BlockEnd, "'%}'");
      Body body = parse_body({"elif", "else", "endif"}, "if", n->line);
      n->branches.emplace_back(std::move(cond), std::move(body));
      next();  // {%
      const std::string tag = next().text;
      if (tag == "endif") break;
      if (tag == "else") {
        expect(Tok::BlockEnd, "'%}'");
        n->branches.emplace_back(nullptr, parse_body({"endif"}, "if", n->line));
        next();  // {%
        next();  // endif
        break;
      }
      cond = parse_expression(false);  // elif
    }
    expect(Tok::BlockEnd, "'%}'");
    return n;
  }

  // for a[, b...] in iterable [if condition] %} ... [{% else %} ...] {% endfor %}
  std::unique_ptr<Node> parse_for() {
    auto n = node(Node::Kind::For);
    next();
    n->targets = parse_targets();
    if (!at_name("in")) error(fmt::format("expected 'in', found {}", shown(peek())));
    next();
    n->expr = parse_expression(false);
    if (at_name("if")) {
      next();
      n->cond = parse_expression(true);
    }
    if (at_name("recursive")) error("recursive loops are not supported");
    expect(Tok::BlockEnd, "'%}'");
    ++loops_;
    n->body = parse_body({"else", "endfor"}, "for", n->line);
    --loops_;
    if (end_tag() == "else") {
      n->else_body = parse_body({"endfor"}, "for", n->line);
      end_tag();
    }
    return n;
  }

  // name, or a, b (or (a, b)) to unpack
  std::vector<std::string> parse_targets() {
    const bool paren = at_op("(");
    if (paren) next();
    std::vector<std::string> names{expect_name("a variable name")};
    while (at_op(",")) {
      next();
      if (peek().type != Tok::Name) break;  // a trailing comma
      names.push_back(next().text);
    }
    if (paren) expect_op(")");
    return names;
  }

  // set x = v | set a, b = v | set ns.attr = v | set x %}...{% endset %}
  std::unique_ptr<Node> parse_set() {
    auto n = node(Node::Kind::Set);
    next();
    if (peek().type == Tok::Name && at_op(".", 1)) {
      n->text = next().text;
      next();
      n->attr = expect_name("an attribute name");
    } else {
      n->targets = parse_targets();
    }
    if (at_op("=")) {
      next();
      n->expr = parse_tuple();
      expect(Tok::BlockEnd, "'%}'");
      return n;
    }
    if (peek().type != Tok::BlockEnd || !n->attr.empty() || n->targets.size() != 1)
      error(fmt::format("expected '=', found {}", shown(peek())));
    next();
    n->kind = Node::Kind::SetBlock;
    n->body = parse_body({"endset"}, "set", n->line);
    end_tag();
    return n;
  }

  // macro name(param, param=default...) %} ... {% endmacro %}
  std::unique_ptr<Node> parse_macro() {
    auto n = node(Node::Kind::Macro);
    next();
    n->text = expect_name("a macro name");
    macros_.insert(n->text);
    expect_op("(");
    while (!at_op(")")) {
      n->params.push_back(expect_name("a parameter name"));
      std::unique_ptr<Expr> def;
      if (at_op("=")) {
        next();
        def = parse_expression(true);
      }
      n->defaults.push_back(std::move(def));
      if (!at_op(")")) expect_op(",");
    }
    next();
    expect(Tok::BlockEnd, "'%}'");
    const int outer_loops = std::exchange(loops_, 0);  // break cannot leave a macro
    n->body = parse_body({"endmacro"}, "macro", n->line);
    loops_ = outer_loops;
    end_tag();
    return n;
  }

  // ---- Expressions ----

  std::unique_ptr<Expr> expr(Expr::Kind kind, int line) {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->line = line;
    return e;
  }
  // Completes a node over its kids: its height, bounded, so that evaluating (and freeing) it fits the stack.
  std::unique_ptr<Expr> done(std::unique_ptr<Expr> e) {
    for (const auto& k : e->kids)
      if (k) e->height = std::max(e->height, k->height + 1);
    if (e->height > kMaxExprHeight) error(fmt::format("expression nested deeper than {} levels", kMaxExprHeight));
    return e;
  }
  std::unique_ptr<Expr> binary(Op op, std::unique_ptr<Expr> a, std::unique_ptr<Expr> b, int line) {
    auto e = expr(op == Op::Not || op == Op::Neg || op == Op::Pos ? Expr::Kind::Unary : Expr::Kind::Binary, line);
    e->op = op;
    e->kids.push_back(std::move(a));
    if (b) e->kids.push_back(std::move(b));
    return done(std::move(e));
  }

  // a, b, ... (a tuple) or one expression.
  std::unique_ptr<Expr> parse_tuple() {
    const int line = peek().line;
    auto first = parse_expression(true);
    if (!at_op(",")) return first;
    auto t = expr(Expr::Kind::List, line);
    t->tuple = true;
    t->kids.push_back(std::move(first));
    while (at_op(",")) {
      next();
      if (peek().type == Tok::VarEnd || peek().type == Tok::BlockEnd || at_op(")")) break;
      t->kids.push_back(parse_expression(true));
    }
    return done(std::move(t));
  }

  // `a if cond else b` is only allowed where with_condexpr (not in `for x in y if z`, nor `if` statements).
  std::unique_ptr<Expr> parse_expression(bool with_condexpr) {
    Deeper deeper(*this);
    auto e = parse_or();
    while (with_condexpr && at_name("if")) {
      const int line = next().line;
      auto c = expr(Expr::Kind::Cond, line);
      c->kids.push_back(std::move(e));
      c->kids.push_back(parse_or());
      std::unique_ptr<Expr> otherwise;
      if (at_name("else")) {
        next();
        otherwise = parse_expression(true);
      }
      c->kids.push_back(std::move(otherwise));
      e = done(std::move(c));
    }
    return e;
  }

  std::unique_ptr<Expr> parse_or() {
    auto e = parse_and();
    while (at_name("or")) {
      const int line = next().line;
      e = binary(Op::Or, std::move(e), parse_and(), line);
    }
    return e;
  }
  std::unique_ptr<Expr> parse_and() {
    auto e = parse_not();
    while (at_name("and")) {
      const int line = next().line;
      e = binary(Op::And, std::move(e), parse_not(), line);
    }
    return e;
  }
  std::unique_ptr<Expr> parse_not() {
    if (!at_name("not")) return parse_compare();
    Deeper deeper(*this);
    const int line = next().line;
    return binary(Op::Not, parse_not(), nullptr, line);
  }

  std::unique_ptr<Expr> parse_compare() {
    const int line = peek().line;
    auto first = parse_binary(0);
    std::unique_ptr<Expr> c;
    while (true) {
      Op op;
      static const std::pair<std::string_view, Op> kOps[] = {{"==", Op::Eq}, {"!=", Op::Ne}, {"<", Op::Lt},
                                                             {"<=", Op::Le}, {">", Op::Gt},  {">=", Op::Ge}};
      auto it = std::find_if(std::begin(kOps), std::end(kOps), [&](const auto& o) { return at_op(o.first); });
      if (it != std::end(kOps)) {
        op = it->second;
        next();
      } else if (at_name("in")) {
        op = Op::In;
        next();
      } else if (at_name("not") && at_name("in", 1)) {
        op = Op::NotIn;
        next();
        next();
      } else {
        break;
      }
      if (!c) {
        c = expr(Expr::Kind::Compare, line);
        c->kids.push_back(std::move(first));
      }
      c->ops.push_back(op);
      c->kids.push_back(parse_binary(0));
    }
    return c ? done(std::move(c)) : std::move(first);
  }

  // The binary operators between comparisons and unary ones, loosest first; each level left-associative.
  std::unique_ptr<Expr> parse_binary(int level) {
    static const std::vector<std::vector<std::pair<std::string_view, Op>>> kLevels = {
        {{"+", Op::Add}, {"-", Op::Sub}},
        {{"~", Op::Concat}},
        {{"*", Op::Mul}, {"/", Op::Div}, {"//", Op::FloorDiv}, {"%", Op::Mod}},
        {{"**", Op::Pow}},
    };
    if (level == static_cast<int>(kLevels.size())) return parse_unary(true);
    auto e = parse_binary(level + 1);
    while (true) {
      const auto& ops = kLevels[level];
      auto it = std::find_if(ops.begin(), ops.end(), [&](const auto& o) { return at_op(o.first); });
      if (it == ops.end()) return e;
      const int line = next().line;
      e = binary(it->second, std::move(e), parse_binary(level + 1), line);
    }
  }

  std::unique_ptr<Expr> parse_unary(bool with_filters) {
    std::unique_ptr<Expr> e;
    if (at_op("-") || at_op("+")) {
      Deeper deeper(*this);
      const Token t = next();
      e = binary(t.text == "-" ? Op::Neg : Op::Pos, parse_unary(false), nullptr, t.line);
    } else {
      e = parse_postfix(parse_primary());
    }
    return with_filters ? parse_filters(std::move(e)) : std::move(e);
  }

  std::unique_ptr<Expr> parse_primary() {
    const Token& t = peek();
    const int line = t.line;
    if (t.type == Tok::Name) {
      auto e = expr(Expr::Kind::Literal, line);
      const std::string name = next().text;
      if (name == "true" || name == "True") {
        e->value = bool_value(true);
      } else if (name == "false" || name == "False") {
        e->value = bool_value(false);
      } else if (name == "none" || name == "None") {
        e->value = none_value();
      } else {
        e->kind = Expr::Kind::Name;
        e->name = name;
      }
      return e;
    }
    if (t.type == Tok::String) {
      std::string s;
      while (peek().type == Tok::String) s += next().text;  // adjacent literals concatenate
      auto e = expr(Expr::Kind::Literal, line);
      e->value = literal_string(std::move(s));
      return e;
    }
    if (t.type == Tok::Int || t.type == Tok::Float) {
      auto e = expr(Expr::Kind::Literal, line);
      e->value = t.type == Tok::Int ? int_value(t.integer) : float_value(t.number);
      next();
      return e;
    }
    if (at_op("(")) {
      next();
      if (at_op(")")) {  // ()
        next();
        auto e = expr(Expr::Kind::List, line);
        e->tuple = true;
        return e;
      }
      auto e = parse_expression(true);
      if (at_op(",")) {
        auto t = expr(Expr::Kind::List, line);
        t->tuple = true;
        t->kids.push_back(std::move(e));
        while (at_op(",")) {
          next();
          if (at_op(")")) break;
          t->kids.push_back(parse_expression(true));
        }
        e = done(std::move(t));
      }
      expect_op(")");
      return e;
    }
    if (at_op("[") || at_op("{")) {
      const bool is_dict = at_op("{");
      const char* close = is_dict ? "}" : "]";
      next();
      auto e = expr(is_dict ? Expr::Kind::Dict : Expr::Kind::List, line);
      while (!at_op(close)) {
        e->kids.push_back(parse_expression(true));
        if (is_dict) {
          expect_op(":");
          e->kids.push_back(parse_expression(true));
        }
        if (!at_op(close)) expect_op(",");
      }
      next();
      return done(std::move(e));
    }
    error(fmt::format("unexpected {}", shown(t)));
  }

  std::unique_ptr<Expr> parse_postfix(std::unique_ptr<Expr> e) {
    while (true) {
      const int line = peek().line;
      if (at_op(".")) {
        next();
        if (peek().type == Tok::Int) {
          auto item = expr(Expr::Kind::Item, line);
          item->kids.push_back(std::move(e));
          auto key = expr(Expr::Kind::Literal, line);
          key->value = int_value(next().integer);
          item->kids.push_back(std::move(key));
          e = done(std::move(item));
        } else {
          auto attr = expr(Expr::Kind::Attr, line);
          attr->name = expect_name("an attribute name");
          attr->kids.push_back(std::move(e));
          e = done(std::move(attr));
        }
      } else if (at_op("[")) {
        next();
        e = parse_subscript(std::move(e), line);
      } else if (at_op("(")) {
        e = parse_call(std::move(e), line);
      } else {
        return e;
      }
    }
  }

  // [key] or [start:stop:step], each part optional.
  std::unique_ptr<Expr> parse_subscript(std::unique_ptr<Expr> obj, int line) {
    std::unique_ptr<Expr> parts[3];
    if (!at_op(":")) parts[0] = parse_expression(true);
    if (!at_op(":")) {
      expect_op("]");
      auto e = expr(Expr::Kind::Item, line);
      e->kids.push_back(std::move(obj));
      e->kids.push_back(std::move(parts[0]));
      return done(std::move(e));
    }
    next();
    if (!at_op(":") && !at_op("]")) parts[1] = parse_expression(true);
    if (at_op(":")) {
      next();
      if (!at_op("]")) parts[2] = parse_expression(true);
    }
    expect_op("]");
    auto e = expr(Expr::Kind::Slice, line);
    e->kids.push_back(std::move(obj));
    for (auto& p : parts) e->kids.push_back(std::move(p));
    return done(std::move(e));
  }

  // (args): positional ones, then name=value ones.
  void parse_args(Expr& e) {
    expect_op("(");
    while (!at_op(")")) {
      std::string keyword;
      if (peek().type == Tok::Name && at_op("=", 1)) {
        keyword = next().text;
        next();
      } else if (!e.keywords.empty() && !e.keywords.back().empty()) {
        error("positional argument after a keyword argument");
      }
      e.kids.push_back(parse_expression(true));
      e.keywords.push_back(std::move(keyword));
      if (!at_op(")")) expect_op(",");
    }
    next();
  }

  // name(...) calls a function or macro, obj.name(...) a method; what can be called is known now, so that a
  // template calling anything else fails when it is loaded.
  std::unique_ptr<Expr> parse_call(std::unique_ptr<Expr> callee, int line) {
    auto call = expr(Expr::Kind::Call, line);
    if (callee->kind == Expr::Kind::Name) {
      call->name = callee->name;
      calls_.emplace_back(callee->name, line);
      call->kids.push_back(nullptr);
    } else if (callee->kind == Expr::Kind::Attr) {
      call->name = callee->name;
      if (!is_method_name(call->name)) error(fmt::format("unknown method '{}'", call->name));
      call->kids.push_back(std::move(callee->kids[0]));
    } else {
      error("only functions, macros and methods can be called");
    }
    parse_args(*call);
    return done(std::move(call));
  }

  // x|filter(args), x is [not] test(args) / x is test arg
  std::unique_ptr<Expr> parse_filters(std::unique_ptr<Expr> e) {
    while (true) {
      const int line = peek().line;
      if (at_op("|")) {
        next();
        auto f = expr(Expr::Kind::Filter, line);
        f->name = expect_name("a filter name");
        auto it = filters().find(f->name);
        if (it == filters().end()) error(fmt::format("unknown filter '{}'", f->name));
        f->filter = it->second;
        f->kids.push_back(std::move(e));
        if (at_op("(")) parse_args(*f);
        e = done(std::move(f));
      } else if (at_name("is")) {
        next();
        auto t = expr(Expr::Kind::Test, line);
        if (at_name("not")) {
          next();
          t->negated = true;
        }
        t->name = peek().type == Tok::Name ? next().text : "";
        auto it = tests().find(t->name);
        if (it == tests().end()) error(fmt::format("unknown test '{}'", t->name));
        t->test = it->second.first;
        t->kids.push_back(std::move(e));
        if (at_op("(")) {
          parse_args(*t);
          for (const auto& k : t->keywords)
            if (!k.empty()) error(fmt::format("test '{}' takes no keyword arguments", t->name));
        } else if (takes_test_argument()) {
          t->kids.push_back(parse_postfix(parse_primary()));
        }
        if (static_cast<int>(t->kids.size()) - 1 != it->second.second)
          error(fmt::format("test '{}' takes {} argument(s)", t->name, it->second.second));
        e = done(std::move(t));
      } else {
        return e;
      }
    }
  }

  // `x is divisibleby 3`: a test's one argument may follow without parentheses, as Jinja allows.
  bool takes_test_argument() const {
    const Token& t = peek();
    if (t.type == Tok::Name)
      return t.text != "else" && t.text != "or" && t.text != "and" && t.text != "is" && t.text != "if";
    return t.type == Tok::String || t.type == Tok::Int || t.type == Tok::Float || at_op("[") || at_op("{");
  }

  std::vector<Token> t_;
  size_t i_ = 0;
  int depth_ = 0;
  int loops_ = 0;  // loops around the statement parsed (break and continue need one)
  std::unordered_set<std::string> macros_;
  std::vector<std::pair<std::string, int>> calls_;  // functions called by name, checked when all macros are known
};

}  // namespace

ChatTemplate::ChatTemplate(std::string source) {
  auto program = std::make_unique<Program>();
  program->body = Parser(Lexer(std::move(source)).run()).parse_template();
  program_ = std::move(program);
}

ChatTemplate::~ChatTemplate() = default;
ChatTemplate::ChatTemplate(ChatTemplate&&) noexcept = default;
ChatTemplate& ChatTemplate::operator=(ChatTemplate&&) noexcept = default;

std::string ChatTemplate::render(const ojson& messages, bool add_generation_prompt, const std::string& bos_token,
                                 const std::string& eos_token, const ojson& extra) const {
  check(extra.is_object(), "chat template: the extra variables must be a JSON object");
  Renderer r;
  try {
    std::vector<std::pair<std::string, Value>> globals = {{"tools", none_value()},
                                                          {"documents", none_value()},
                                                          {"bos_token", r.str(bos_token)},
                                                          {"eos_token", r.str(eos_token)}};
    auto set = [&](const std::string& name, Value v) {
      for (auto& [k, old] : globals)
        if (k == name) return void(old = std::move(v));
      globals.emplace_back(name, std::move(v));
    };
    for (const auto& [k, v] : extra.items()) set(k, r.from_json(v, 1));
    set("messages", r.from_json(messages, 1));
    set("add_generation_prompt", bool_value(add_generation_prompt));
    return r.run(program_->body, std::move(globals));
  } catch (const Error& e) {
    fail("chat template line {}: {}", r.line, e.what());
  }
}

std::optional<std::string> chat_template_from_hf_dir(const std::string& dir) {
  namespace fs = std::filesystem;
  auto read_text = [](const fs::path& path) {
    std::ifstream f(path, std::ios::binary);
    check(f.good(), "{}: cannot open", path.string());
    return std::string(std::istreambuf_iterator<char>(f), {});
  };
  auto field = [&](const fs::path& path) -> std::optional<std::string> {
    if (!fs::exists(path)) return std::nullopt;
    nlohmann::json j;
    try {
      j = parse_json(read_text(path));
    } catch (const nlohmann::json::exception& e) {
      fail("{}: not valid JSON: {}", path.string(), e.what());
    }
    if (!j.is_object() || !j.contains("chat_template") || j["chat_template"].is_null()) return std::nullopt;
    const auto& t = j["chat_template"];
    if (t.is_string()) return t.get<std::string>();
    check(t.is_array(), "{}: chat_template is neither a string nor a list of {{name, template}}", path.string());
    for (const auto& named : t)
      if (named.is_object() && named.value("name", "") == "default" && named.contains("template") &&
          named["template"].is_string())
        return named["template"].get<std::string>();
    fail("{}: none of the chat templates is named 'default'", path.string());
  };
  const fs::path base(dir);
  if (fs::exists(base / "chat_template.jinja")) return read_text(base / "chat_template.jinja");
  if (auto t = field(base / "tokenizer_config.json")) return t;
  return field(base / "chat_template.json");
}

}  // namespace polar
