// PNG plots drawn by the gnuplot program (Debian: gnuplot-nox), shared by the commands that plot.
#pragma once
#include <string>

namespace polar::cli {

// s as a gnuplot string literal.
std::string gnuplot_quoted(const std::string& s);

// Runs `script` after the lines that select a width x height PNG terminal writing to `path` (pngcairo where
// gnuplot has it, else the libgd png terminal). A polar::Error names the path if gnuplot fails.
void run_gnuplot(const std::string& path, int width, int height, const std::string& script);

}  // namespace polar::cli
