// Online-softmax / log-sum-exp merge math, shared by the CPU and CUDA kernels.
//
// A softmax state over a set of scores x_j is (max, sum) with sum = sum_j exp(x_j - max);
// its log-sum-exp is max + log(sum). An empty set is (-inf, 0) and its LSE is -inf.
// Partial attention results (O_i, LSE_i) merge exactly as
//   LSE = log(sum_i exp(LSE_i)),  O = sum_i exp(LSE_i - LSE) * O_i,
// with -inf parts contributing nothing (not even their O_i, which may be garbage).
#pragma once

#include <math.h>

#include "helix/common.h"

namespace helix {

struct SoftmaxState {
  float max;  // running maximum, -inf while empty
  float sum;  // sum of exp(x - max), 0 while empty
};

HELIX_HOST_DEVICE SoftmaxState softmax_state_empty() { return {neg_inf(), 0.0f}; }

// Adds one score (or one partial LSE, which is the same thing for a merge).
// A -inf input is absent; comparing with max first keeps exp()'s argument <= 0, so
// LSE values of any magnitude (+-1000 and beyond) never overflow.
HELIX_HOST_DEVICE void softmax_state_add(SoftmaxState& state, float x) {
  if (x == neg_inf()) return;
  if (x > state.max) {
    // exp(-inf - x) = 0 when the state is still empty, so no special case is needed.
    state.sum = state.sum * expf(state.max - x) + 1.0f;
    state.max = x;
  } else {
    state.sum += expf(x - state.max);
  }
}

// Associative combine of two states (parallel reductions: warp shuffles, split-KV merges).
HELIX_HOST_DEVICE SoftmaxState softmax_state_combine(SoftmaxState a, SoftmaxState b) {
  if (a.max == neg_inf()) return b;
  if (b.max == neg_inf()) return a;
  if (a.max >= b.max) return {a.max, a.sum + b.sum * expf(b.max - a.max)};
  return {b.max, b.sum + a.sum * expf(a.max - b.max)};
}

// Natural-log LSE of a state: -inf for an empty one.
HELIX_HOST_DEVICE float softmax_state_lse(SoftmaxState state) {
  if (state.max == neg_inf()) return neg_inf();
  return state.max + logf(state.sum);
}

// LSE over P partial LSEs; load_lse(p) returns part p's LSE.
template <typename LoadLse>
HELIX_HOST_DEVICE float merged_lse(int num_parts, LoadLse load_lse) {
  SoftmaxState state = softmax_state_empty();
  for (int p = 0; p < num_parts; ++p) softmax_state_add(state, load_lse(p));
  return softmax_state_lse(state);
}

// Weight of a part with LSE part_lse in a merge whose total LSE is total_lse:
// exp(part_lse - total_lse), and exactly 0 for an absent part or an all-absent merge.
// Callers skip parts of weight 0 rather than multiply, so an absent part's garbage
// output (NaN, inf) never reaches the result.
HELIX_HOST_DEVICE float merge_weight(float part_lse, float total_lse) {
  if (total_lse == neg_inf() || part_lse == neg_inf()) return 0.0f;
  return expf(part_lse - total_lse);
}

// ---------------------------------------------------------------------------------------
// Online softmax of attention scores, tile by tile (flash-decode, CPU and CUDA alike).
// Scores live in the log2 domain (pre-multiplied by softmax_scale * log2(e)) so that the
// hot loop needs exp2 only. Per query row the state is (max, sum of exp2(score - max));
// the output accumulator is rescaled by the factor online_softmax_rescale returns.

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Folds a tile whose largest (log2-domain) score is tile_max into the state: raises the
// running max and returns alpha, the factor by which sum and accumulator must be scaled
// (0 when nothing was seen before, 1 while every score so far is -inf).
HELIX_HOST_DEVICE float online_softmax_rescale(SoftmaxState& state, float tile_max) {
  const float new_max = state.max > tile_max ? state.max : tile_max;
  if (new_max == neg_inf()) return 1.0f;
  const float alpha = exp2f(state.max - new_max);  // exp2(-inf) = 0 for an empty state
  state.sum *= alpha;
  state.max = new_max;
  return alpha;
}

// The max to subtract from scores of the current tile: the running max, or 0 while every
// score is -inf, so that exp2(score - max) is 0 for masked scores and never NaN.
HELIX_HOST_DEVICE float online_softmax_offset(const SoftmaxState& state) {
  return state.max == neg_inf() ? 0.0f : state.max;
}

// Natural-log LSE of a log2-domain state: -inf when no score was finite.
HELIX_HOST_DEVICE float online_softmax_lse(const SoftmaxState& state) {
  if (state.max == neg_inf()) return neg_inf();
  return (state.max + log2f(state.sum)) * kLn2;
}

}  // namespace helix
