#include "test_util.h"

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <iterator>
#include <random>
#include <stdexcept>

#include "core/error.h"
#include "runtime/engine.h"

namespace polar::test {

double scaled_diff(std::span<const float> got, std::span<const float> want) {
  if (got.size() != want.size()) return INFINITY;
  double diff = 0, scale = 1;
  for (size_t i = 0; i < got.size(); ++i) {
    diff = std::max(diff, std::fabs(double(got[i]) - double(want[i])));
    scale = std::max(scale, std::fabs(double(want[i])));
    if (std::isnan(got[i]) != std::isnan(want[i])) return INFINITY;
  }
  return diff / scale;
}

double scaled_tol(double rel, double want) { return rel * std::max(1.0, std::fabs(want)); }

std::vector<std::vector<double>> log_softmax_rows(Model& model, const std::vector<int32_t>& tokens) {
  Engine e(model, {.kv_tokens = static_cast<int64_t>(tokens.size()) + 16});
  const Tensor logits = e.step({{e.add_sequence(), tokens}}, /*all_logits=*/true);
  const int64_t V = logits.dim(1);
  std::vector<std::vector<double>> out;
  for (int64_t r = 0; r < logits.dim(0); ++r) {
    const float* row = logits.data<float>() + r * V;
    const double mx = *std::max_element(row, row + V);
    double sum = 0;
    for (int64_t v = 0; v < V; ++v) sum += std::exp(row[v] - mx);
    std::vector<double> lp(static_cast<size_t>(V));
    for (int64_t v = 0; v < V; ++v) lp[v] = row[v] - mx - std::log(sum);
    out.push_back(std::move(lp));
  }
  return out;
}

TempDir::TempDir() {
  std::random_device rd;
  dir_ = std::filesystem::temp_directory_path() / ("polar-test-" + std::to_string(getpid()) + "-" + std::to_string(rd()));
  std::filesystem::create_directories(dir_);
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
}

void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  if (!f) throw std::runtime_error("cannot write " + path);
}

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
}

namespace {
std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}
}  // namespace

RunResult run_polar(const std::vector<std::string>& args) {
  TempDir tmp;
  std::string out_path = tmp.path("stdout"), err_path = tmp.path("stderr");
  pid_t pid = fork();
  if (pid < 0) throw std::runtime_error("fork failed");
  if (pid == 0) {
    if (!freopen(out_path.c_str(), "w", stdout) || !freopen(err_path.c_str(), "w", stderr)) _exit(127);
    std::vector<char*> argv;
    std::string bin = POLAR_BINARY;
    argv.push_back(bin.data());
    std::vector<std::string> copy = args;
    for (auto& a : copy) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv(bin.c_str(), argv.data());
    _exit(127);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  RunResult r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = slurp(out_path);
  r.err = slurp(err_path);
  return r;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace polar::test
