// Whether OpenMP workers spin or sleep while they wait: chosen for polar's programs before OpenMP starts work.
#pragma once

namespace polar::cli {

// libgomp (GCC's OpenMP runtime, which OpenBLAS's OpenMP build shares) reads OMP_WAIT_POLICY and
// GOMP_SPINCOUNT once, when it is loaded. Left unset, a worker waiting at a barrier spins 300000 times
// before it sleeps; when another process keeps the cores busy the workers spin through their time slices
// waiting for each other: `polar generate` on the default model ran at 1.3 tokens/s beside a two-thread
// busy loop, against 25.6 idle (2-core EPYC, scripts/cpu-contention.sh; README.md, "CPU threads").
// Waiting passively (sleeping at once) gave 14.4 busy and 23.7 idle; a spin of 10000 kept the idle speed
// but gave 2.6-9.8 busy; one thread 10.8 busy, 16.8 idle.
//
// So unless the user set either variable, this sets OMP_WAIT_POLICY=passive and executes the program again
// (/proc/self/exe, the same arguments): the runtime was initialised before main, and glibc resets the
// environment after a .preinit_array function runs, so an exec is the one way to reach libgomp's reader.
// Not under valgrind (which would run the new image natively), and nothing happens if the exec fails.
void choose_openmp_wait_policy(char** argv);

}  // namespace polar::cli
