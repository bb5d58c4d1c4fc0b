// The SIMT host runtime (see helix_simt/runtime.h): fibers, the CTA scheduler, barriers and
// warp collectives, shared memory, cp.async with poisoned destinations, and the PTX emulations.
#include "helix_simt/runtime.h"

#include <pthread.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "helix_simt/ptx.h"

#if defined(__SANITIZE_ADDRESS__)
#define HELIX_SIMT_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#else
#define HELIX_SIMT_ASAN 0
#endif

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

// ---- context switch (x86-64 System V): callee-saved registers, MXCSR and the x87 control word ----
extern "C" void helix_simt_switch(void** save_stack, void* next_stack);
extern "C" void helix_simt_trampoline();
asm(R"(
  .text
  .globl helix_simt_switch
  .type helix_simt_switch,@function
helix_simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size helix_simt_switch, .-helix_simt_switch

  .globl helix_simt_trampoline
  .type helix_simt_trampoline,@function
helix_simt_trampoline:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size helix_simt_trampoline, .-helix_simt_trampoline
)");

namespace helix {
namespace simt {
namespace {

constexpr size_t kStackBytes = size_t(512) << 10;  // per fiber (ASan's redzones need room)
constexpr size_t kGuardBytes = 4096;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr size_t kDefaultDynamicSmem = 48 << 10;    // without cudaFuncAttributeMaxDynamicSharedMemorySize
constexpr size_t kMaxDynamicSmemOptin = 232448;     // Hopper and Blackwell: 227 KB per block
constexpr size_t kSharedPerMultiprocessor = 233472;  // 228 KB
constexpr uint8_t kAsyncPoison = 0xFF;               // NaN in fp32, fp16, bf16 and e4m3

std::string where_text(const Location& where) {
  std::ostringstream text;
  const char* file = where.file_name();
  const char* slash = strrchr(file, '/');
  text << (slash ? slash + 1 : file) << ":" << where.line();
  return text.str();
}

// A list of thread ids, compressed into ranges for messages.
std::string thread_list(std::vector<int> ids) {
  std::sort(ids.begin(), ids.end());
  std::ostringstream text;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (i) text << ",";
    text << ids[i];
    if (j > i) text << "-" << ids[j];
    i = j + 1;
  }
  return text.str();
}

struct Stack {
  char* memory = nullptr;  // guard page at the low end
  size_t bytes = 0;
  char* bottom() const { return memory + kGuardBytes; }
  size_t usable() const { return bytes - kGuardBytes; }
};

struct AsyncCopy {
  unsigned char* destination;
  unsigned char data[16];
};

enum class FiberState { kReady, kRunning, kBlocked, kDone };

struct Fiber {
  int tid = 0;
  uint3 index{};
  void* stack_pointer = nullptr;
  Stack stack;
  FiberState state = FiberState::kReady;
  bool started = false;    // has run: its stack holds frames to unwind if the CTA is abandoned
  const char* waiting_for = nullptr;  // what a blocked thread waits in, and where (formatted only
  Location waiting_where;             // for a report: blocking happens at every collective)
  bool fenced = false;     // a fence.sys since this thread's last system-scope store
  std::vector<AsyncCopy> open_group;
  std::deque<std::vector<AsyncCopy>> committed_groups;
  void* fake_stack = nullptr;  // ASan's per-fiber fake stack
};

// One in-flight warp collective (shuffle, vote, __syncwarp, ldmatrix, mma).
struct Collective {
  int kind;  // see CollectiveKind
  unsigned mask;
  Location where;
  unsigned arrived = 0;  // lanes
  uint64_t value[32];
  int operand[32];
  int width = 32;
  // ldmatrix: row addresses; mma: operands and accumulators.
  uint32_t address[32];
  uint32_t a[32][4], b[32][2];
  float c[32][4];
  bool flag = false;  // ldmatrix: transposed; mma: bf16
  int mode = 0;       // shuffle: idx/up/down/xor; vote: ballot/all/any
  // results
  uint64_t result[32];
  uint32_t fragment[32][4];
  float d[32][4];
  bool done = false;
};

enum CollectiveKind { kShuffle = 1, kVote, kSyncWarp, kLdmatrix, kMma };

const char* collective_name(int kind) {
  switch (kind) {
    case kShuffle: return "__shfl_*_sync";
    case kVote: return "a vote (__ballot/__all/__any_sync)";
    case kSyncWarp: return "__syncwarp";
    case kLdmatrix: return "ldmatrix.sync";
    case kMma: return "mma.sync";
  }
  return "?";
}

struct StaticShared {
  const void* key;
  std::unique_ptr<unsigned char[]> memory;
};

// Ready threads, ordered by the schedule.
class ReadyQueue {
 public:
  void reset(Schedule schedule, uint64_t seed) {
    schedule_ = schedule;
    for (uint64_t& word : bits_) word = 0;
    count_ = 0;
    fifo_.clear();
    pool_.clear();
    random_.seed(seed);
  }
  void push(int tid) {
    switch (schedule_) {
      case Schedule::kInOrder:
      case Schedule::kReversed:
        bits_[tid / 64] |= uint64_t{1} << (tid % 64);
        ++count_;
        break;
      case Schedule::kRoundRobin: fifo_.push_back(tid); break;
      case Schedule::kShuffle: pool_.push_back(tid); break;
    }
  }
  bool pop(int* tid) {
    switch (schedule_) {
      case Schedule::kInOrder:
        if (count_ == 0) return false;
        for (int word = 0; word < kWords; ++word) {
          if (bits_[word]) {
            const int bit = __builtin_ctzll(bits_[word]);
            bits_[word] &= bits_[word] - 1;
            --count_;
            *tid = word * 64 + bit;
            return true;
          }
        }
        return false;
      case Schedule::kReversed:
        if (count_ == 0) return false;
        for (int word = kWords - 1; word >= 0; --word) {
          if (bits_[word]) {
            const int bit = 63 - __builtin_clzll(bits_[word]);
            bits_[word] &= ~(uint64_t{1} << bit);
            --count_;
            *tid = word * 64 + bit;
            return true;
          }
        }
        return false;
      case Schedule::kRoundRobin:
        if (fifo_.empty()) return false;
        *tid = fifo_.front();
        fifo_.pop_front();
        return true;
      case Schedule::kShuffle: {
        if (pool_.empty()) return false;
        const size_t pick = std::uniform_int_distribution<size_t>(0, pool_.size() - 1)(random_);
        *tid = pool_[pick];
        pool_[pick] = pool_.back();
        pool_.pop_back();
        return true;
      }
    }
    return false;
  }

 private:
  static constexpr int kWords = kMaxThreadsPerBlock / 64;
  Schedule schedule_ = Schedule::kInOrder;
  uint64_t bits_[kWords] = {};
  int count_ = 0;
  std::deque<int> fifo_;
  std::vector<int> pool_;
  std::mt19937_64 random_;
};

struct AbortFiber {};  // unwinds a blocked fiber's stack when its CTA is abandoned

struct Cta {
  const KernelBody* body = nullptr;
  int num_threads = 0;
  std::vector<Fiber>* fibers = nullptr;
  ReadyQueue ready;
  int done = 0;
  bool aborting = false;
  std::string error;  // the first fault found
  void* scheduler_stack_pointer = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
  void* scheduler_fake_stack = nullptr;
  unsigned char* dynamic_smem = nullptr;
  size_t dynamic_bytes = 0;
  std::vector<StaticShared> statics;
  // __syncthreads
  std::vector<int> barrier_waiting;
  Location barrier_where;
  bool barrier_has_where = false;
  // warp collectives in flight, per warp
  std::vector<std::vector<std::unique_ptr<Collective>>> collectives;
  std::vector<std::unique_ptr<Collective>> spare_collectives;  // reused: a collective is ~3 KB
};

thread_local Settings g_settings;
thread_local Cta* g_cta = nullptr;
thread_local Fiber* g_fiber = nullptr;
thread_local cudaError_t g_last_error = cudaSuccess;
thread_local std::vector<Stack> g_stack_pool;
std::mutex g_attribute_mutex;
std::map<const void*, int> g_max_dynamic_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize

Stack take_stack() {
  if (!g_stack_pool.empty()) {
    Stack stack = g_stack_pool.back();
    g_stack_pool.pop_back();
    return stack;
  }
  void* memory = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (memory == MAP_FAILED) throw std::runtime_error("SIMT runtime: cannot map a fiber stack");
  mprotect(memory, kGuardBytes, PROT_NONE);  // a stack overflow faults instead of corrupting
  return {static_cast<char*>(memory), kStackBytes};
}

void give_back_stacks(std::vector<Fiber>& fibers) {
  for (Fiber& fiber : fibers) {
    if (fiber.stack.memory) g_stack_pool.push_back(fiber.stack);
    fiber.stack = {};
  }
}

void fail(const std::string& message) {
  if (g_cta->error.empty()) {
    g_cta->error = message;
  }
  g_cta->aborting = true;
}

Fiber& current_fiber(const char* what) {
  if (g_fiber == nullptr) {
    throw KernelError(std::string("SIMT runtime: ") + what + " called outside a kernel launched by the SIMT runtime");
  }
  return *g_fiber;
}

// ---- fiber switching ----

void switch_to_fiber(Fiber& fiber) {
  g_fiber = &fiber;
  fiber.started = true;
  threadIdx = fiber.index;
  fiber.state = FiberState::kRunning;
#if HELIX_SIMT_ASAN
  __sanitizer_start_switch_fiber(&g_cta->scheduler_fake_stack, fiber.stack.bottom(), fiber.stack.usable());
#endif
  helix_simt_switch(&g_cta->scheduler_stack_pointer, fiber.stack_pointer);
#if HELIX_SIMT_ASAN
  __sanitizer_finish_switch_fiber(g_cta->scheduler_fake_stack, nullptr, nullptr);
#endif
  g_fiber = nullptr;
}

// Called on a fiber: gives control back to the scheduler; returns when resumed.
void yield_to_scheduler(Fiber& fiber, bool exiting) {
#if HELIX_SIMT_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &fiber.fake_stack, g_cta->scheduler_stack_bottom,
                                 g_cta->scheduler_stack_size);
#else
  (void)exiting;
#endif
  helix_simt_switch(&fiber.stack_pointer, g_cta->scheduler_stack_pointer);
#if HELIX_SIMT_ASAN
  __sanitizer_finish_switch_fiber(fiber.fake_stack, nullptr, nullptr);
#endif
  if (g_cta->aborting) throw AbortFiber{};
}

void block_here(Fiber& fiber, const char* what, const Location& where) {
  fiber.state = FiberState::kBlocked;
  fiber.waiting_for = what;
  fiber.waiting_where = where;
  yield_to_scheduler(fiber, false);
}

void make_ready(int tid) {
  Fiber& fiber = (*g_cta->fibers)[tid];
  fiber.state = FiberState::kReady;
  fiber.waiting_for = nullptr;
  g_cta->ready.push(tid);
}

void land_group(std::vector<AsyncCopy>& group) {
  for (const AsyncCopy& copy : group) memcpy(copy.destination, copy.data, 16);
  group.clear();
}

void check_barrier_complete();
void check_collectives_after_exit(int tid);

extern "C" void fiber_main(Fiber* fiber) {
#if HELIX_SIMT_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_cta->scheduler_stack_bottom, &g_cta->scheduler_stack_size);
#endif
  try {
    if (!g_cta->aborting) (*g_cta->body)();
  } catch (const AbortFiber&) {
  } catch (const std::exception& error) {
    fail(std::string("thread ") + std::to_string(fiber->tid) + ": " + error.what());
  } catch (...) {
    fail("thread " + std::to_string(fiber->tid) + ": unknown exception");
  }
  // Copies still in flight land when the thread exits (the hardware completes them).
  if (!fiber->open_group.empty()) fiber->committed_groups.push_back(std::move(fiber->open_group));
  for (auto& group : fiber->committed_groups) land_group(group);
  fiber->committed_groups.clear();
  fiber->state = FiberState::kDone;
  ++g_cta->done;
  if (!g_cta->aborting) {
    check_barrier_complete();
    check_collectives_after_exit(fiber->tid);
  }
  yield_to_scheduler(*fiber, true);
  __builtin_trap();  // a finished fiber is never resumed
}

void prepare_fiber(Fiber& fiber) {
  if (!fiber.stack.memory) fiber.stack = take_stack();
  char* top = fiber.stack.memory + fiber.stack.bytes;
  uintptr_t sp = (reinterpret_cast<uintptr_t>(top) - 128) & ~uintptr_t{15};
  uint64_t* slots = reinterpret_cast<uint64_t*>(sp);
  // What helix_simt_switch pops: [mxcsr | x87 cw], r15, r14, r13, r12, rbx, rbp, return address.
  uint32_t mxcsr;
  uint16_t control_word;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(control_word));
  slots[0] = uint64_t{mxcsr} | (uint64_t{control_word} << 32);
  slots[1] = 0;                                              // r15
  slots[2] = 0;                                              // r14
  slots[3] = reinterpret_cast<uint64_t>(&fiber_main);        // r13: entry
  slots[4] = reinterpret_cast<uint64_t>(&fiber);             // r12: argument
  slots[5] = 0;                                              // rbx
  slots[6] = 0;                                              // rbp
  slots[7] = reinterpret_cast<uint64_t>(&helix_simt_trampoline);
  fiber.stack_pointer = slots;
  fiber.started = false;
  fiber.state = FiberState::kReady;
  fiber.waiting_for = nullptr;
  fiber.open_group.clear();
  fiber.committed_groups.clear();
  fiber.fake_stack = nullptr;
  fiber.fenced = false;
}

// ---- __syncthreads ----

void check_barrier_complete() {
  Cta& cta = *g_cta;
  if (cta.barrier_waiting.empty()) return;
  if (static_cast<int>(cta.barrier_waiting.size()) == cta.num_threads) {
    std::vector<int> released;
    released.swap(cta.barrier_waiting);
    cta.barrier_has_where = false;
    for (int tid : released) make_ready(tid);
    return;
  }
  if (static_cast<int>(cta.barrier_waiting.size()) + cta.done == cta.num_threads) {
    std::vector<int> exited;
    for (const Fiber& fiber : *cta.fibers) {
      if (fiber.state == FiberState::kDone) exited.push_back(fiber.tid);
    }
    fail("__syncthreads at " + where_text(cta.barrier_where) + " waits for threads " + thread_list(exited) +
         ", which exited without reaching it (a barrier in divergent code)");
  }
}

// ---- warp collectives ----

int warp_of(int tid) { return tid / 32; }

unsigned live_lanes_of_warp(int warp) {
  unsigned lanes = 0;
  for (int lane = 0; lane < 32; ++lane) {
    const int tid = warp * 32 + lane;
    if (tid < g_cta->num_threads) lanes |= 1u << lane;
  }
  return lanes;
}

void complete_collective(Collective& collective, int warp);

void check_collectives_after_exit(int tid) {
  Cta& cta = *g_cta;
  const int warp = warp_of(tid), lane = tid % 32;
  for (auto& collective : cta.collectives[warp]) {
    if (!collective->done && (collective->mask >> lane & 1u)) {
      fail(std::string(collective_name(collective->kind)) + " at " + where_text(collective->where) + " in warp " +
           std::to_string(warp) + " (mask 0x" + [&] {
             std::ostringstream hex;
             hex << std::hex << collective->mask;
             return hex.str();
           }() + ") waits for lane " + std::to_string(lane) + ", which exited without reaching it");
      return;
    }
  }
}

// Joins (or opens) the collective of this lane's warp with the same mask; blocks until every
// lane of the mask has arrived; returns the completed collective (owned by the CTA until all
// its lanes have read their results, see leave()).

template <typename Deposit>
Collective& arrive(Fiber& fiber, int kind, unsigned mask, const Location& where, const Deposit& deposit) {
  Cta& cta = *g_cta;
  const int warp = warp_of(fiber.tid), lane = fiber.tid % 32;
  if (!(mask >> lane & 1u)) {
    throw KernelError(std::string(collective_name(kind)) + " at " + where_text(where) + ": lane " +
                      std::to_string(lane) + " is not in its own member mask (undefined in PTX)");
  }
  const unsigned live = live_lanes_of_warp(warp);
  if ((mask & ~live) != 0) {
    throw KernelError(std::string(collective_name(kind)) + " at " + where_text(where) +
                      ": the member mask names lanes past the end of the block");
  }
  Collective* joined = nullptr;
  for (auto& open : cta.collectives[warp]) {
    if (!open->done && open->mask == mask && !(open->arrived >> lane & 1u)) {
      joined = open.get();
      break;
    }
    if (!open->done && (open->mask & mask) && open->mask != mask && !(open->arrived >> lane & 1u)) {
      throw KernelError(std::string(collective_name(kind)) + " at " + where_text(where) + ": lane " +
                        std::to_string(lane) + " uses a member mask that overlaps a different one in flight at " +
                        where_text(open->where));
    }
  }
  if (joined == nullptr) {
    if (cta.spare_collectives.empty()) {
      cta.collectives[warp].push_back(std::make_unique<Collective>());
    } else {
      cta.collectives[warp].push_back(std::move(cta.spare_collectives.back()));
      cta.spare_collectives.pop_back();
    }
    joined = cta.collectives[warp].back().get();
    joined->kind = kind;
    joined->mask = mask;
    joined->where = where;
    joined->arrived = 0;
    joined->width = 32;
    joined->flag = false;
    joined->mode = 0;
    joined->done = false;
  } else if (joined->kind != kind || joined->where.line() != where.line() ||
             strcmp(joined->where.file_name(), where.file_name()) != 0) {
    throw KernelError(std::string("warp ") + std::to_string(warp) + ": lanes of one member mask reached different "
                      "collectives: " + collective_name(joined->kind) + " at " + where_text(joined->where) + " and " +
                      collective_name(kind) + " at " + where_text(where));
  }
  deposit(*joined, lane);
  joined->arrived |= 1u << lane;
  if (joined->arrived == mask) {
    complete_collective(*joined, warp);
    joined->done = true;
    for (int other = 0; other < 32; ++other) {
      if ((mask >> other & 1u) && other != lane) make_ready(warp * 32 + other);
    }
    return *joined;  // the last lane to arrive goes on without yielding
  }
  block_here(fiber, collective_name(kind), where);
  return *joined;
}

// Drops completed collectives once every member lane has read its result.
void leave(Fiber& fiber, Collective& collective) {
  const int warp = warp_of(fiber.tid), lane = fiber.tid % 32;
  collective.arrived &= ~(1u << lane);
  if (collective.arrived == 0) {
    auto& list = g_cta->collectives[warp];
    for (size_t i = 0; i < list.size(); ++i) {
      if (list[i].get() == &collective) {
        g_cta->spare_collectives.push_back(std::move(list[i]));
        list.erase(list.begin() + static_cast<std::ptrdiff_t>(i));
        break;
      }
    }
  }
}

float bits_to_float(uint32_t bits) {
  float value;
  memcpy(&value, &bits, 4);
  return value;
}

// The two 16-bit halves of a register as floats (bf16 or fp16 operand types).
void unpack(uint32_t word, bool bf16, double* low, double* high) {
  const uint16_t halves[2] = {static_cast<uint16_t>(word & 0xFFFFu), static_cast<uint16_t>(word >> 16)};
  double values[2];
  for (int i = 0; i < 2; ++i) {
    if (bf16) {
      values[i] = bits_to_float(uint32_t{halves[i]} << 16);
    } else {
      __half_raw raw;
      raw.x = halves[i];
      values[i] = __half2float(__half(raw));
    }
  }
  *low = values[0];
  *high = values[1];
}

void complete_collective(Collective& c, int warp) {
  const unsigned mask = c.mask;
  switch (c.kind) {
    case kShuffle: {
      // shfl.sync (PTX ISA, "shfl.sync"): lanes are split into segments of `width`;
      // an out-of-segment or non-member source gives the lane its own value.
      for (int lane = 0; lane < 32; ++lane) {
        if (!(mask >> lane & 1u)) continue;
        const int width = c.width, base = lane & ~(width - 1), operand = c.operand[lane];
        int source = lane;
        bool inside = true;
        const int mode = c.mode;
        if (mode == 0) {
          source = base + (operand & (width - 1));
        } else if (mode == 1) {
          source = lane - operand;
          inside = source >= base;
        } else if (mode == 2) {
          source = lane + operand;
          inside = source < base + width;
        } else {
          source = lane ^ operand;
          inside = source >= base && source < base + width;
        }
        if (!inside || source < 0 || source > 31) source = lane;
        if (!(mask >> source & 1u)) {
          throw KernelError("shuffle at " + where_text(c.where) + ": lane " + std::to_string(lane) +
                            " reads lane " + std::to_string(source) + ", which is not in the member mask (undefined)");
        }
        c.result[lane] = c.value[source];
      }
      break;
    }
    case kVote: {
      unsigned ballot = 0;
      for (int lane = 0; lane < 32; ++lane) {
        if ((mask >> lane & 1u) && c.value[lane]) ballot |= 1u << lane;
      }
      for (int lane = 0; lane < 32; ++lane) {
        const int mode = c.mode;
        c.result[lane] = mode == 0 ? ballot : mode == 1 ? (ballot == mask) : (ballot != 0);
      }
      break;
    }
    case kSyncWarp: break;
    case kLdmatrix: {
      // ldmatrix .x4 (PTX ISA 9.7.14.5.15): lanes 8m .. 8m+7 give the addresses of rows 0..7
      // of matrix m, each 8 b16 elements (16 bytes, 16-byte aligned).
      for (int lane = 0; lane < 32; ++lane) {
        for (int matrix = 0; matrix < 4; ++matrix) {
          uint16_t halves[2];
          for (int half = 0; half < 2; ++half) {
            const Coordinate at = ldmatrix_element(lane, matrix, half, c.flag);
            const uint32_t row_address = c.address[8 * matrix + at.row];
            const unsigned char* row = g_cta->dynamic_smem + row_address;
            memcpy(&halves[half], row + 2 * at.column, 2);
          }
          c.fragment[lane][matrix] = uint32_t{halves[0]} | (uint32_t{halves[1]} << 16);
        }
      }
      break;
    }
    case kMma: {
      // mma.m16n8k16 (PTX ISA 9.7.14.5.8): gather A (16x16), B (16x8) and C (16x8) from the
      // lanes' fragments, D = A B + C, scatter D. Products of 16-bit values are exact in double;
      // the sum is rounded once to fp32 (the tensor core's internal rounding is not modeled).
      double a[16][16], b[16][8], acc[16][8];
      for (int lane = 0; lane < 32; ++lane) {
        for (int reg = 0; reg < 4; ++reg) {
          double low, high;
          unpack(c.a[lane][reg], c.flag, &low, &high);
          const Coordinate first = mma_a_element(lane, 2 * reg), second = mma_a_element(lane, 2 * reg + 1);
          a[first.row][first.column] = low;
          a[second.row][second.column] = high;
        }
        for (int reg = 0; reg < 2; ++reg) {
          double low, high;
          unpack(c.b[lane][reg], c.flag, &low, &high);
          const Coordinate first = mma_b_element(lane, 2 * reg), second = mma_b_element(lane, 2 * reg + 1);
          b[first.row][first.column] = low;
          b[second.row][second.column] = high;
        }
        for (int i = 0; i < 4; ++i) {
          const Coordinate at = mma_c_element(lane, i);
          acc[at.row][at.column] = c.c[lane][i];
        }
      }
      double d[16][8];
      for (int m = 0; m < 16; ++m) {
        for (int n = 0; n < 8; ++n) {
          double sum = 0.0;
          for (int k = 0; k < 16; ++k) sum += a[m][k] * b[k][n];
          d[m][n] = sum + acc[m][n];
        }
      }
      for (int lane = 0; lane < 32; ++lane) {
        for (int i = 0; i < 4; ++i) {
          const Coordinate at = mma_c_element(lane, i);
          c.d[lane][i] = static_cast<float>(d[at.row][at.column]);
        }
      }
      break;
    }
  }
  (void)warp;
}

unsigned char* checked_shared(uint32_t address, size_t bytes, size_t alignment, const char* what,
                              const Location& where) {
  Cta& cta = *g_cta;
  if (address % alignment != 0) {
    throw KernelError(std::string(what) + " at " + where_text(where) + ": shared address " + std::to_string(address) +
                      " is not " + std::to_string(alignment) + "-byte aligned");
  }
  if (uint64_t{address} + bytes > cta.dynamic_bytes) {
    throw KernelError(std::string(what) + " at " + where_text(where) + ": shared bytes [" + std::to_string(address) +
                      ", " + std::to_string(uint64_t{address} + bytes) + ") lie outside the block's " +
                      std::to_string(cta.dynamic_bytes) + " bytes of dynamic shared memory");
  }
  return cta.dynamic_smem + address;
}

void run_cta(std::vector<Fiber>& fibers) {
  Cta& cta = *g_cta;
  cta.ready.reset(g_settings.schedule, g_settings.seed * 1000003u + blockIdx.x * 7919u + blockIdx.y * 104729u +
                                           blockIdx.z * 1299709u);
  for (Fiber& fiber : fibers) {
    prepare_fiber(fiber);
    cta.ready.push(fiber.tid);
  }
  int tid;
  while (true) {
    if (cta.aborting) break;
    if (!cta.ready.pop(&tid)) break;
    switch_to_fiber(fibers[tid]);
  }
  if (!cta.aborting && cta.done != cta.num_threads) {
    // Nothing is ready but some threads wait: a deadlock. Name every wait.
    std::map<std::string, std::vector<int>> waits;
    for (const Fiber& fiber : fibers) {
      if (fiber.state == FiberState::kBlocked) {
        waits[std::string(fiber.waiting_for) + " at " + where_text(fiber.waiting_where)].push_back(fiber.tid);
      }
    }
    std::ostringstream text;
    text << "deadlock: no thread can progress;";
    for (const auto& [what, tids] : waits) text << " threads " << thread_list(tids) << " wait in " << what << ";";
    fail(text.str());
  }
  if (cta.aborting) {
    // Unwind every blocked fiber so that its destructors run and its stack can be reused.
    for (Fiber& fiber : fibers) {
      if (fiber.started && fiber.state != FiberState::kDone) switch_to_fiber(fiber);
    }
  }
}

}  // namespace

Settings& settings() { return g_settings; }

bool planted(int id) { return g_settings.planted_defect == id; }

void sync_threads(Location where) {
  Fiber& fiber = current_fiber("__syncthreads");
  Cta& cta = *g_cta;
  if (cta.barrier_has_where && (cta.barrier_where.line() != where.line() ||
                                strcmp(cta.barrier_where.file_name(), where.file_name()) != 0)) {
    throw KernelError("threads reached different barriers: __syncthreads at " + where_text(cta.barrier_where) +
                      " and at " + where_text(where) + " (divergent __syncthreads)");
  }
  cta.barrier_where = where;
  cta.barrier_has_where = true;
  cta.barrier_waiting.push_back(fiber.tid);
  if (static_cast<int>(cta.barrier_waiting.size()) == cta.num_threads) {
    std::vector<int> released;
    released.swap(cta.barrier_waiting);
    cta.barrier_has_where = false;
    for (int tid : released) {
      if (tid != fiber.tid) make_ready(tid);
    }
    // The last thread to arrive yields too, so that the schedule decides who runs first.
    fiber.state = FiberState::kReady;
    cta.ready.push(fiber.tid);
    yield_to_scheduler(fiber, false);
    return;
  }
  check_barrier_complete();
  block_here(fiber, "__syncthreads", where);
}

void sync_warp(unsigned mask, Location where) {
  Fiber& fiber = current_fiber("__syncwarp");
  Collective& c = arrive(fiber, kSyncWarp, mask, where, [](Collective&, int) {});
  leave(fiber, c);
}

uint64_t shuffle(uint64_t value, int kind, unsigned mask, int operand, int width, Location where) {
  Fiber& fiber = current_fiber("__shfl_sync");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    throw KernelError("shuffle at " + where_text(where) + ": width " + std::to_string(width) +
                      " is not a power of two in [1, 32]");
  }
  Collective& c = arrive(fiber, kShuffle, mask, where, [&](Collective& c, int lane) {
    c.value[lane] = value;
    c.operand[lane] = operand;
    c.mode = kind;
    c.width = width;
  });
  const uint64_t result = c.result[fiber.tid % 32];
  leave(fiber, c);
  return result;
}

unsigned vote(int kind, unsigned mask, bool predicate, Location where) {
  Fiber& fiber = current_fiber("vote");
  Collective& c = arrive(fiber, kVote, mask, where, [&](Collective& c, int lane) {
    c.value[lane] = predicate;
    c.mode = kind;
  });
  const unsigned result = static_cast<unsigned>(c.result[fiber.tid % 32]);
  leave(fiber, c);
  return result;
}

void* dynamic_shared_memory() {
  current_fiber("dynamic shared memory");
  return g_cta->dynamic_smem;
}

size_t dynamic_shared_bytes() { return g_cta ? g_cta->dynamic_bytes : 0; }

void* static_shared(const void* key, size_t bytes, size_t alignment) {
  current_fiber("a __shared__ variable");
  for (auto& entry : g_cta->statics) {
    if (entry.key == key) return entry.memory.get();
  }
  // new[] of unsigned char is aligned for any fundamental type (16 bytes).
  if (alignment > 16) throw KernelError("a __shared__ variable needs more than 16-byte alignment");
  StaticShared entry{key, std::unique_ptr<unsigned char[]>(new unsigned char[bytes])};
  memset(entry.memory.get(), g_settings.poison, bytes);
  g_cta->statics.push_back(std::move(entry));
  return g_cta->statics.back().memory.get();
}

uint64_t global_timer_ns() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
}

void nanosleep_ns(unsigned nanoseconds) {
  // Other host threads may be the ones to make progress (a HOP-B peer): really sleep.
  const timespec pause{0, static_cast<long>(std::min<unsigned>(nanoseconds, 1000000u))};
  ::nanosleep(&pause, nullptr);
}

int lane_id() { return current_fiber("%laneid").tid % 32; }

// ---- PTX emulations ----

uint32_t shared_address(const void* pointer, Location where) {
  current_fiber("cvta.to.shared");
  const auto* byte = static_cast<const unsigned char*>(pointer);
  if (byte < g_cta->dynamic_smem || byte > g_cta->dynamic_smem + g_cta->dynamic_bytes) {
    throw KernelError("cvta.to.shared at " + where_text(where) +
                      ": the pointer is not inside the block's dynamic shared memory");
  }
  return static_cast<uint32_t>(byte - g_cta->dynamic_smem);
}

void cp_async_16(uint32_t destination, const void* source, int source_bytes, Location where) {
  Fiber& fiber = current_fiber("cp.async");
  unsigned char* target = checked_shared(destination, 16, 16, "cp.async", where);
  if (source_bytes < 0 || source_bytes > 16) {
    throw KernelError("cp.async at " + where_text(where) + ": src-size " + std::to_string(source_bytes) +
                      " is larger than the cp-size 16 (undefined)");
  }
  AsyncCopy copy{};
  copy.destination = target;
  if (source_bytes > 0) {
    if (reinterpret_cast<uintptr_t>(source) % 16 != 0) {
      throw KernelError("cp.async.cg at " + where_text(where) + ": the global source is not 16-byte aligned");
    }
    memcpy(copy.data, source, source_bytes);  // ASan checks this read against the source buffer
  }
  memset(target, kAsyncPoison, 16);
  fiber.open_group.push_back(copy);
}

void cp_async_commit(Location) {
  Fiber& fiber = current_fiber("cp.async.commit_group");
  fiber.committed_groups.push_back(std::move(fiber.open_group));
  fiber.open_group.clear();
}

void cp_async_wait(int pending, Location) {
  Fiber& fiber = current_fiber("cp.async.wait_group");
  while (static_cast<int>(fiber.committed_groups.size()) > pending) {
    land_group(fiber.committed_groups.front());
    fiber.committed_groups.pop_front();
  }
}

void ldmatrix_x4(uint32_t (&fragment)[4], uint32_t address, bool transposed, Location where) {
  Fiber& fiber = current_fiber("ldmatrix");
  checked_shared(address, 16, 16, "ldmatrix", where);
  Collective& c = arrive(fiber, kLdmatrix, 0xffffffffu, where, [&](Collective& c, int lane) {
    c.address[lane] = address;
    c.flag = transposed;
  });
  for (int i = 0; i < 4; ++i) fragment[i] = c.fragment[fiber.tid % 32][i];
  leave(fiber, c);
}

void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16, Location where) {
  Fiber& fiber = current_fiber("mma.sync");
  Collective& c = arrive(fiber, kMma, 0xffffffffu, where, [&](Collective& c, int lane) {
    for (int i = 0; i < 4; ++i) c.a[lane][i] = a[i];
    c.b[lane][0] = b0;
    c.b[lane][1] = b1;
    for (int i = 0; i < 4; ++i) c.c[lane][i] = d[i];
    c.flag = bf16;
  });
  for (int i = 0; i < 4; ++i) d[i] = c.d[fiber.tid % 32][i];
  leave(fiber, c);
}

// PTX ISA 9.7.14.5.8, m16n8k16 with .f16/.bf16 A and B, f32 C/D; groupID = lane / 4,
// threadID_in_group = lane % 4.
Coordinate mma_a_element(int lane, int index) {
  const int group = lane / 4, thread_in_group = lane % 4;
  const int row = (index < 2 || (index >= 4 && index < 6)) ? group : group + 8;
  const int column = thread_in_group * 2 + (index & 1) + (index >= 4 ? 8 : 0);
  return {row, column};
}

Coordinate mma_b_element(int lane, int index) {
  const int group = lane / 4, thread_in_group = lane % 4;
  return {thread_in_group * 2 + (index & 1) + (index >= 2 ? 8 : 0), group};  // (k, n)
}

Coordinate mma_c_element(int lane, int index) {
  const int group = lane / 4, thread_in_group = lane % 4;
  return {index < 2 ? group : group + 8, thread_in_group * 2 + (index & 1)};
}

// PTX ISA 9.7.14.5.15: a group of four consecutive lanes holds one row; lane T gets row T/4,
// elements 2(T%4) and 2(T%4)+1. With .trans the matrix is read column-major: lane T gets
// column T/4 of stored rows 2(T%4) and 2(T%4)+1.
Coordinate ldmatrix_element(int lane, int matrix, int half, bool transposed) {
  (void)matrix;
  if (transposed) return {2 * (lane % 4) + half, lane / 4};
  return {lane / 4, 2 * (lane % 4) + half};
}

// What each system-scope flag store published: whether a release pattern ordered it.
struct Publication {
  int32_t value;
  bool ordered;
};
std::mutex g_publication_mutex;
std::map<const void*, Publication> g_publications;

void record_store(int32_t* address, int32_t value, bool ordered) {
  const std::lock_guard<std::mutex> lock(g_publication_mutex);
  g_publications[address] = {value, ordered};
}

int32_t load_acquire_system(const int32_t* address, Location where) {
  const int32_t value = __atomic_load_n(address, __ATOMIC_ACQUIRE);
  const std::lock_guard<std::mutex> lock(g_publication_mutex);
  const auto found = g_publications.find(address);
  if (found != g_publications.end() && found->second.value == value && !found->second.ordered) {
    throw KernelError("ld.acquire.sys at " + where_text(where) + " read " + std::to_string(value) +
                      ", which a st.relaxed.sys stored with no fence.sys before it: no release pattern "
                      "(PTX ISA 8.8) makes the writes it guards visible (missing release fence)");
  }
  return value;
}

void store_release_system(int32_t* address, int32_t value) {
  if (g_fiber) g_fiber->fenced = false;
  record_store(address, value, true);
  __atomic_store_n(address, value, __ATOMIC_RELEASE);
}

void store_relaxed_system(int32_t* address, int32_t value) {
  const bool ordered = g_fiber != nullptr && g_fiber->fenced;
  if (g_fiber) g_fiber->fenced = false;
  record_store(address, value, ordered);
  __atomic_store_n(address, value, __ATOMIC_RELAXED);
}

void reset_publications() {
  const std::lock_guard<std::mutex> lock(g_publication_mutex);
  g_publications.clear();
}

void fence_system() {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  if (g_fiber) g_fiber->fenced = true;
}

// ---- launch ----

cudaError_t launch(const void* kernel, const char* name, dim3 grid, dim3 block, size_t dynamic_smem,
                   const KernelBody& body, Location where) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u ||
      threads == 0 || threads > kMaxThreadsPerBlock || block.z > 64) {
    g_last_error = cudaErrorInvalidConfiguration;
    return g_last_error;
  }
  size_t limit = kDefaultDynamicSmem;
  {
    const std::lock_guard<std::mutex> lock(g_attribute_mutex);
    const auto found = g_max_dynamic_smem.find(kernel);
    if (found != g_max_dynamic_smem.end()) limit = static_cast<size_t>(found->second);
  }
  if (dynamic_smem > limit) {
    g_last_error = cudaErrorInvalidValue;  // what the CUDA runtime reports for too much dynamic smem
    return g_last_error;
  }
  if (g_cta != nullptr) throw KernelError("SIMT runtime: a kernel launched another kernel");

  // CTA order: the grid order, reversed, or shuffled.
  std::vector<uint3> blocks;
  blocks.reserve(size_t{grid.x} * grid.y * grid.z);
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) blocks.push_back({x, y, z});
    }
  }
  if (g_settings.schedule == Schedule::kReversed) std::reverse(blocks.begin(), blocks.end());
  if (g_settings.schedule == Schedule::kShuffle) {
    std::mt19937_64 random(g_settings.seed ^ 0x9E3779B97F4A7C15ull);
    std::shuffle(blocks.begin(), blocks.end(), random);
  }

  std::vector<Fiber> fibers(threads);
  for (unsigned t = 0; t < threads; ++t) {
    fibers[t].tid = static_cast<int>(t);
    fibers[t].index = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
  }
  blockDim = block;
  gridDim = grid;
  std::string error;
  for (const uint3& index : blocks) {
    Cta cta;
    cta.body = &body;
    cta.num_threads = static_cast<int>(threads);
    cta.fibers = &fibers;
    cta.collectives.resize((threads + 31) / 32);
    // Exact-size shared memory, poisoned: ASan sees any access past its end, and a read of a
    // byte nobody wrote gives the poison (NaN for floats) instead of a plausible value.
    std::unique_ptr<unsigned char[]> smem(new unsigned char[dynamic_smem > 0 ? dynamic_smem : 1]);
    memset(smem.get(), g_settings.poison, dynamic_smem > 0 ? dynamic_smem : 1);
    cta.dynamic_smem = smem.get();
    cta.dynamic_bytes = dynamic_smem;
    blockIdx = index;
    g_cta = &cta;
    try {
      run_cta(fibers);
    } catch (...) {
      g_cta = nullptr;
      give_back_stacks(fibers);
      throw;
    }
    g_cta = nullptr;
    if (!cta.error.empty()) {
      std::ostringstream text;
      text << name << " (launched at " << where_text(where) << " in " << where.function_name() << "), block (" << index.x << ", " << index.y << ", "
           << index.z << "): " << cta.error;
      error = text.str();
      break;
    }
  }
  give_back_stacks(fibers);
  if (!error.empty()) throw KernelError(error);
  return cudaSuccess;
}

}  // namespace simt
}  // namespace helix

// ---- the CUDA runtime calls the launchers make, answered for the emulated device ----
// (The library links with -Wl,-Bsymbolic, so these bind here and not to torch's libcudart.)

extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t error = helix::simt::g_last_error;
  helix::simt::g_last_error = cudaSuccess;
  return error;
}

cudaError_t cudaPeekAtLastError(void) { return helix::simt::g_last_error; }

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attribute, int device) {
  (void)device;
  switch (attribute) {
    case cudaDevAttrMultiProcessorCount: *value = helix::simt::g_settings.multiprocessor_count; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(helix::simt::kMaxDynamicSmemOptin); return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = static_cast<int>(helix::simt::kSharedPerMultiprocessor); return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = helix::simt::kMaxThreadsPerBlock; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t cudaFuncSetAttribute(const void* function, enum cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || static_cast<size_t>(value) > helix::simt::kMaxDynamicSmemOptin) return cudaErrorInvalidValue;
  const std::lock_guard<std::mutex> lock(helix::simt::g_attribute_mutex);
  helix::simt::g_max_dynamic_smem[function] = value;
  return cudaSuccess;
}

// Occupancy of the emulated device: limited by shared memory (1 KB reserved per block, as on
// sm_80 and later), 2048 threads and 32 blocks per multiprocessor. Registers are not modeled.
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* blocks, const void* function, int block_size,
                                                                   size_t dynamic_smem, unsigned int flags) {
  (void)function;
  (void)flags;
  if (block_size <= 0 || block_size > helix::simt::kMaxThreadsPerBlock) return cudaErrorInvalidValue;
  const size_t per_block = dynamic_smem + 1024;
  const int by_smem = static_cast<int>(helix::simt::kSharedPerMultiprocessor / per_block);
  const int by_threads = 2048 / block_size;
  *blocks = std::max(0, std::min({by_smem, by_threads, 32}));
  return cudaSuccess;
}

}  // extern "C"
