#include "eval/stats.h"

#include <vector>

#include "core/error.h"

namespace polar {

Estimate mean_with_se(std::span<const double> x) {
  check(!x.empty(), "the mean of no values is undefined");
  Estimate e;
  e.n = static_cast<int64_t>(x.size());
  double sum = 0;
  for (double v : x) sum += v;
  e.mean = sum / e.n;
  if (e.n < 2) return e;
  double ss = 0;
  for (double v : x) ss += (v - e.mean) * (v - e.mean);
  e.se = std::sqrt(ss / (e.n - 1) / e.n);
  return e;
}

Estimate paired_difference(std::span<const double> a, std::span<const double> b) {
  check(a.size() == b.size(), "paired difference of {} and {} values: the runs must cover the same items", a.size(),
        b.size());
  std::vector<double> d(a.size());
  for (size_t i = 0; i < a.size(); ++i) d[i] = a[i] - b[i];
  return mean_with_se(d);
}

}  // namespace polar
