// Helpers shared by the tests: where the shared fixtures are, temporary files, running the polar binary.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <span>
#include <string>
#include <vector>

namespace polar {
class Model;
}

namespace polar::test {

// Path under the shared material (../shared beside the repo, or $POLAR_SHARED).
inline std::string shared_path(const std::string& rel) {
  const char* env = std::getenv("POLAR_SHARED");
  std::filesystem::path base = env && *env ? env : POLAR_DEFAULT_SHARED;
  return (base / rel).string();
}

// A fresh directory under the system temp dir, removed when the object dies.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

 private:
  std::filesystem::path dir_;
};

void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes);
std::vector<uint8_t> read_bytes(const std::string& path);

struct RunResult {
  int exit_code;
  std::string out;  // stdout
  std::string err;  // stderr
};
// Runs the built polar binary with the given arguments (no shell), capturing stdout and stderr.
RunResult run_polar(const std::vector<std::string>& args);

// Two fp32 results that differ only in summation order (batched against unbatched GEMMs, one BLAS kernel
// set against another: OpenBLAS picks its kernels by processor) differ by rounding that grows with the
// magnitude of the values, so tests compare them relative to it. scaled_diff is the largest |got - want|
// over max(1, the largest |want|): values near zero compare absolutely. scaled_tol is rel * max(1, |want|),
// the tolerance for one such scalar (a sum of log-probabilities, say).
double scaled_diff(std::span<const float> got, std::span<const float> want);
double scaled_tol(double rel, double want);

// The log-softmax (in double) of every row of the logits an Engine gives for `tokens` read in one pass: row
// p scores token p + 1. The reference for log-probabilities reported by the scheduler and the server.
std::vector<std::vector<double>> log_softmax_rows(Model& model, const std::vector<int32_t>& tokens);

// The message of the polar::Error that f throws, or "(no error)".
std::string error_of(const std::function<void()>& f);

}  // namespace polar::test
