// The engine's threads. Two back ends with the same static schedule (task t on thread t % n):
//  - OpenMP (when built with it, and selected: sparsebp.torch selects it): the process's OpenMP runtime.
//    PyTorch's wheels load a libgomp.so.1, and ours then resolves to that same library, so torch's
//    ops and ours run on one team of threads. With two separate pools, torch's workers keep
//    spinning after each torch op while ours start, and on a machine with as many threads as cores
//    the two fight: measured on 2 cores, our kernels ran no faster with 2 threads than with 1
//    inside a torch training step.
//  - The engine's own pool (the default): nthreads - 1 workers plus the calling thread, no barriers
//    inside a job. Workers spin briefly (200 us) after each job and then sleep on a condition
//    variable; a waiter yields its core to a partner seen on the same core (kYieldAfter below).
//    Without torch this is the better neighbour: GNU OpenMP's workers spin far longer after
//    each region and fight NumPy's BLAS threads (measured on the demo MLP with per-example meProp,
//    batch 32, 2 cores: backward 0.58 s per 6,000 digits on the pool, 1.17 s on OpenMP). Also used
//    in a forked child (GNU OpenMP is not usable after fork there).
#include "sparsebp/threading.h"

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <pthread.h>
#include <sched.h>
#include <thread>
#include <vector>

#include "sparsebp/errors.h"

#ifdef SPARSEBP_OPENMP
#include <omp.h>
#endif

namespace sparsebp {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

inline void relax() {
  for (int i = 0; i < 64; ++i) cpu_relax();
}

// Wait loops yield the core (sched_yield) when their partner is known to share it, and the caller
// also after kYieldAfter of waiting. The scheduler sometimes runs a woken worker on the core of the
// thread that woke it and leaves it there for a while; a waiter that only paused then held the core
// its partner needed until its time slice ran out. Measured on the 2-vCPU Zen 1 machine: top-k of
// 32 x 4096 on 2 threads took the work plus the whole spin (350 us with the default 200 us spin,
// 1.2 ms with 1 ms), with 3-4 ms stalls, for tens of calls in a row before the threads settled on
// two cores (70 us). Yielding always was worse beside another library's spinning threads (torch's
// OpenMP team): the yield hands the core to a thread that keeps it for a whole time slice.
constexpr auto kYieldAfter = std::chrono::microseconds(50);

int default_threads() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

// How long a pool worker spins after a job before it sleeps: SPARSEBP_SPIN_US (microseconds,
// 0 to 100000), read once; default 200.
int64_t spin_microseconds() {
  static const int64_t us = [] {
    const char* env = std::getenv("SPARSEBP_SPIN_US");
    if (!env) return int64_t{200};
    const long long v = std::atoll(env);
    return static_cast<int64_t>(std::min(100000LL, std::max(0LL, v)));
  }();
  return us;
}

class Pool {
 public:
  explicit Pool(int nthreads) : nthreads_(nthreads), worker_cpu_(new std::atomic<int>[nthreads]) {
    for (int i = 0; i < nthreads_; ++i) worker_cpu_[i].store(-1, std::memory_order_relaxed);
    for (int i = 1; i < nthreads_; ++i) workers_.emplace_back([this, i] { worker(i); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return nthreads_; }

  // Returns how many threads ran at least one task.
  int run(int64_t ntasks, const std::function<void(int64_t)>& fn) {
    job_ = &fn;
    ntasks_ = ntasks;
    error_ = nullptr;
    pending_.store(nthreads_ - 1, std::memory_order_relaxed);
    participants_.store(0, std::memory_order_relaxed);
    caller_cpu_.store(sched_getcpu(), std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lk(mu_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    run_share(0);
    const auto waited_from = std::chrono::steady_clock::now();
    while (pending_.load(std::memory_order_acquire) != 0) {
      if (shares_core_with_a_worker() || std::chrono::steady_clock::now() - waited_from > kYieldAfter)
        sched_yield();
      else
        relax();
    }
    job_ = nullptr;
    if (error_) std::rethrow_exception(error_);
    return participants_.load(std::memory_order_relaxed);
  }

 private:
  void run_share(int tid) {
    if (tid < ntasks_) participants_.fetch_add(1, std::memory_order_relaxed);
    for (int64_t t = tid; t < ntasks_; t += nthreads_) {
      try {
        (*job_)(t);
      } catch (...) {
        std::lock_guard<std::mutex> lk(err_mu_);
        if (!error_) error_ = std::current_exception();
      }
    }
  }

  bool shares_core_with_a_worker() const {
    const int cpu = sched_getcpu();
    for (int i = 1; i < nthreads_; ++i)
      if (worker_cpu_[i].load(std::memory_order_relaxed) == cpu) return true;
    return false;
  }

  void worker(int tid) {
    uint64_t seen = 0;
    for (;;) {
      // Spin for a while (cheap hand-off between consecutive kernels), then sleep.
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_microseconds());
      uint64_t gen;
      while ((gen = generation_.load(std::memory_order_acquire)) == seen &&
             std::chrono::steady_clock::now() < spin_until) {
        const int cpu = sched_getcpu();
        worker_cpu_[tid].store(cpu, std::memory_order_relaxed);
        if (cpu == caller_cpu_.load(std::memory_order_relaxed))
          sched_yield();  // the caller's core: let it run
        else
          relax();
      }
      if (gen == seen) {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        gen = generation_.load(std::memory_order_acquire);
      }
      seen = gen;
      if (stop_) return;
      worker_cpu_[tid].store(sched_getcpu(), std::memory_order_relaxed);
      run_share(tid);
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  const int nthreads_;
  // The core each worker was last seen running on, and the caller's when it posted the job (-1:
  // unknown); read by the wait loops, which yield to a partner on their own core.
  std::unique_ptr<std::atomic<int>[]> worker_cpu_;
  std::atomic<int> caller_cpu_{-1};
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<int> participants_{0};
  bool stop_ = false;
  const std::function<void(int64_t)>* job_ = nullptr;
  int64_t ntasks_ = 0;
  std::mutex err_mu_;
  std::exception_ptr error_;
};

std::mutex g_pool_mu;            // one job at a time; also guards g_pool / g_nthreads
std::unique_ptr<Pool> g_pool;
pid_t g_pool_pid = 0;
std::atomic<int> g_nthreads{0};  // 0: not set yet
std::atomic<int> g_max_job_threads{0};

void note_job_threads(int n) {
  int cur = g_max_job_threads.load(std::memory_order_relaxed);
  while (n > cur && !g_max_job_threads.compare_exchange_weak(cur, n, std::memory_order_relaxed)) {
  }
}

}  // namespace

int get_num_threads() {
  int n = g_nthreads.load(std::memory_order_relaxed);
  if (n == 0) {
    n = default_threads();
    int expected = 0;
    g_nthreads.compare_exchange_strong(expected, n);
    n = g_nthreads.load(std::memory_order_relaxed);
  }
  return n;
}

void set_num_threads(int n) {
  SPARSEBP_CHECK_VALUE(n >= 1, "num_threads must be an integer >= 1; got ", n);
  // A bound, so that a typo cannot ask for a million threads (the first parallel call would spend
  // minutes creating them): 1024, or the CPU count where that is larger.
  const int most = std::max(1024, default_threads());
  SPARSEBP_CHECK_VALUE(n <= most, "num_threads must be at most ", most, " on this machine; got ", n);
  g_nthreads.store(n, std::memory_order_relaxed);
}

#ifdef SPARSEBP_OPENMP
namespace {
std::atomic<bool> g_use_openmp{false};

// Set in every forked child: its OpenMP runtime may still believe in the parent's threads (ours or
// torch's), and GNU OpenMP can hang there, so a child uses the engine's own pool instead.
std::atomic<bool> g_forked{false};
const int g_atfork_registered = pthread_atfork(nullptr, nullptr, [] { g_forked.store(true); });

// Returns how many threads ran at least one task, or -1 when OpenMP must not be used here.
int run_openmp(int want, int64_t ntasks, const std::function<void(int64_t)>& fn) {
  (void)g_atfork_registered;
  if (!g_use_openmp.load(std::memory_order_relaxed) || g_forked.load(std::memory_order_relaxed)) return -1;
  if (omp_in_parallel()) return -1;  // called from inside someone's parallel region
  std::atomic<int> participants{0};
  std::mutex err_mu;
  std::exception_ptr error;
  const int team = static_cast<int>(std::min<int64_t>(want, ntasks));
#pragma omp parallel num_threads(team)
  {
    const int tid = omp_get_thread_num();
    const int n = omp_get_num_threads();
    if (tid < ntasks) participants.fetch_add(1, std::memory_order_relaxed);
    for (int64_t t = tid; t < ntasks; t += n) {
      try {
        fn(t);
      } catch (...) {
        std::lock_guard<std::mutex> lk(err_mu);
        if (!error) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
  return participants.load(std::memory_order_relaxed);
}
}  // namespace
#endif

void parallel_for(int64_t ntasks, const std::function<void(int64_t)>& fn) {
  if (ntasks <= 0) return;
  const int want = get_num_threads();
  std::unique_lock<std::mutex> lk(g_pool_mu, std::try_to_lock);
  if (want == 1 || ntasks == 1 || !lk.owns_lock()) {
    // Single thread, or another Python thread is using the pool: run here. The split into tasks
    // was made by the caller, so the results are the same either way.
    for (int64_t t = 0; t < ntasks; ++t) fn(t);
    note_job_threads(1);
    return;
  }
#ifdef SPARSEBP_OPENMP
  {
    const int ran = run_openmp(want, ntasks, fn);
    if (ran >= 0) {
      note_job_threads(ran);
      return;
    }
  }
#endif
  const pid_t pid = getpid();
  if (g_pool && g_pool_pid != pid) {
    // We are in a forked child: the parent's workers do not exist here. Abandon the object.
    (void)g_pool.release();
  }
  if (!g_pool || g_pool->size() != want) {
    g_pool.reset();
    g_pool = std::make_unique<Pool>(want);
    g_pool_pid = pid;
  }
  note_job_threads(g_pool->run(ntasks, fn));
}

bool openmp_available() {
#ifdef SPARSEBP_OPENMP
  return true;
#else
  return false;
#endif
}

void set_thread_backend(const std::string& name) {
  if (name == "pool") {
#ifdef SPARSEBP_OPENMP
    g_use_openmp.store(false);
#endif
    return;
  }
  SPARSEBP_CHECK_VALUE(name == "openmp", "thread backend must be 'pool' or 'openmp'; got '", name, "'");
  SPARSEBP_CHECK_VALUE(openmp_available(), "thread backend 'openmp': this build has no OpenMP (SPARSEBP_OPENMP=OFF or "
                                           "no OpenMP found at build time)");
#ifdef SPARSEBP_OPENMP
  g_use_openmp.store(true);
#endif
}

std::string thread_backend() {
#ifdef SPARSEBP_OPENMP
  if (g_use_openmp.load()) return "openmp";
#endif
  return "pool";
}

int max_job_threads(bool reset) {
  return reset ? g_max_job_threads.exchange(0, std::memory_order_relaxed)
               : g_max_job_threads.load(std::memory_order_relaxed);
}

}  // namespace sparsebp
