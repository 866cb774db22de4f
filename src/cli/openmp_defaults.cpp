#include "cli/openmp_defaults.h"

#include <unistd.h>

#include <cstdlib>
#include <cstring>

namespace polar::cli {

void choose_openmp_wait_policy(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") != nullptr || std::getenv("GOMP_SPINCOUNT") != nullptr) return;
  const char* preload = std::getenv("LD_PRELOAD");
  if (preload != nullptr && std::strstr(preload, "vgpreload") != nullptr) return;  // under valgrind
  if (setenv("OMP_WAIT_POLICY", "passive", /*overwrite=*/1) != 0) return;
  execv("/proc/self/exe", argv);  // returns only on failure: then libgomp's default stays
}

}  // namespace polar::cli
