// The engine's own thread pool. set_num_threads(n) really changes how many threads the kernels use.
// Work is split into tasks by the caller (ops.cpp); tasks never wait on each other (no barriers).
#pragma once
#include <cstdint>
#include <functional>
#include <string>

namespace sparsebp {

// Threads the kernels use (>= 1). Default: the number of CPUs this process may run on.
int get_num_threads();
// n >= 1. Throws ValueError otherwise.
void set_num_threads(int n);

// Runs fn(task) for task in [0, ntasks) on up to get_num_threads() threads, the caller included,
// and returns when all are done. Task t always runs on thread t % nthreads (static schedule).
// An exception thrown by any task is rethrown here after all tasks have finished.
void parallel_for(int64_t ntasks, const std::function<void(int64_t)>& fn);

// Where the threads come from: "pool" (the engine's own) or "openmp" (the process's OpenMP
// runtime; only in builds with OpenMP, else ValueError). Default "pool". sparsebp.torch switches to
// "openmp", which shares PyTorch's libgomp threads. Thread counts and results do not change.
void set_thread_backend(const std::string& name);
std::string thread_backend();
bool openmp_available();

// The most threads that ran tasks of one parallel_for since the last reset (observed: a thread
// counts once it has run a task). For tests of set_num_threads. reset: return it and start over.
int max_job_threads(bool reset);

}  // namespace sparsebp
