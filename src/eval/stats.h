// Statistics over per-item results: a mean with its standard error, and the paired difference of two runs
// over the same items (one task at two densities, say).
#pragma once
#include <cmath>
#include <cstdint>
#include <span>

namespace polar {

struct Estimate {
  double mean = NAN;
  double se = NAN;  // standard error of the mean; NaN for fewer than 2 values
  int64_t n = 0;
};

// Mean of x and its standard error: the sample standard deviation (n - 1 in the denominator) over sqrt(n),
// as lm-evaluation-harness reports it. Empty x is an error.
Estimate mean_with_se(std::span<const double> x);

// The mean of a[i] - b[i] and its standard error. Pairing cancels the variance between items that both runs
// share (an easy item is easy at every density), so it resolves much smaller differences than comparing
// two independent means would. The spans must have the same, non-zero length.
Estimate paired_difference(std::span<const double> a, std::span<const double> b);

}  // namespace polar
