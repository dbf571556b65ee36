// Splitting a kernel's work over XLA's intra-op threads, from inside an FFI handler.
#ifndef GQA_T5X_CSRC_PARALLEL_FOR_H_
#define GQA_T5X_CSRC_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace gqa_t5x {

// Runs fn(part) for every part in [0, num_parts), on the calling thread and on up to
// num_parts - 1 tasks scheduled on the pool, and returns when all parts are done. Parts are
// claimed from a shared counter, so the caller finishes them alone if no pool thread is free:
// this never waits on a task that has not started. A task that starts late finds nothing left
// and only touches the shared state, which it keeps alive.
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t num_parts, Fn fn) {
  struct State {
    explicit State(int64_t n, Fn f) : num_parts(n), fn(std::move(f)) {}
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    const int64_t num_parts;
    Fn fn;
  };
  auto state = std::make_shared<State>(num_parts, std::move(fn));
  auto run = [state] {
    for (int64_t p; (p = state->next.fetch_add(1)) < state->num_parts;) {
      state->fn(p);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), num_parts) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(run)(run));  // a copy per task
  run();
  while (state->done.load(std::memory_order_acquire) < num_parts) std::this_thread::yield();
}

// Number of threads worth using for `work` units when each should get at least `min_work`.
inline int64_t NumParts(xla::ffi::ThreadPool& pool, int64_t work, int64_t min_work) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  return std::max<int64_t>(1, std::min(threads, work / std::max<int64_t>(1, min_work)));
}

}  // namespace gqa_t5x

#endif  // GQA_T5X_CSRC_PARALLEL_FOR_H_
