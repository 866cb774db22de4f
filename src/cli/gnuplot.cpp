#include "cli/gnuplot.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <fmt/core.h>

#include "core/error.h"

namespace polar::cli {

std::string gnuplot_quoted(const std::string& s) {
  std::string q = "'";
  for (char ch : s) q += ch == '\'' ? std::string("''") : std::string(1, ch);
  return q + "'";
}

void run_gnuplot(const std::string& path, int width, int height, const std::string& script) {
  const std::string full = fmt::format(R"(if (strstrt(GPVAL_TERMINALS, "pngcairo") > 0) {{
  set terminal pngcairo size {},{} noenhanced
}} else {{
  set terminal png size {},{} noenhanced
}}
set output {}
)",
                                       width, height, width, height, gnuplot_quoted(path)) +
                           script;
  namespace fs = std::filesystem;
  const std::string script_path = (fs::temp_directory_path() / fmt::format("polar-plot-{}.gp", getpid())).string();
  {
    std::ofstream f(script_path);
    f << full;
    check(f.good(), "cannot write {}", script_path);
  }
  const int status = std::system(fmt::format("gnuplot {}", script_path).c_str());
  fs::remove(script_path);
  check(status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0,
        "gnuplot failed to write {} (is gnuplot installed? Debian: gnuplot-nox)", path);
}

}  // namespace polar::cli
