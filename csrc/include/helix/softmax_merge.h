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
  float max;  // running maximum: -inf while empty, NaN once poisoned
  float sum;  // sum of exp(x - max): 0 while empty (>= 1 otherwise), NaN once poisoned
};

// A state is empty (no finite score or LSE seen: sum == 0), finite, or poisoned (a NaN or
// +inf was seen: sum is NaN). -inf means empty and nothing else; a poisoned state's LSE, its
// weights and so the whole row's output are NaN, on every path and for any number of parts.
HELIX_HOST_DEVICE float quiet_nan() { return __builtin_nanf(""); }
HELIX_HOST_DEVICE SoftmaxState softmax_state_empty() { return {neg_inf(), 0.0f}; }

// Adds one score (or one partial LSE, which is the same thing for a merge).
// A -inf input is absent; NaN or +inf poisons the state. Comparing with max first keeps
// exp()'s argument <= 0, so LSE values of any magnitude never overflow.
HELIX_HOST_DEVICE void softmax_state_add(SoftmaxState& state, float x) {
  if (x == neg_inf()) return;
  if (!(x <= 3.402823466e38f)) {  // NaN or +inf
    state = {quiet_nan(), quiet_nan()};
    return;
  }
  if (x > state.max) {
    // exp(-inf - x) = 0 when the state is still empty, so no special case is needed.
    state.sum = state.sum * expf(state.max - x) + 1.0f;
    state.max = x;
  } else {
    state.sum += expf(x - state.max);  // NaN stays NaN once poisoned (x > NaN is false)
  }
}

// Natural-log LSE of a state: -inf for an empty one, NaN for a poisoned one.
HELIX_HOST_DEVICE float softmax_state_lse(SoftmaxState state) {
  if (state.sum == 0.0f) return neg_inf();
  return state.max + logf(state.sum);
}

// The merge of P partial states (O_i, LSE_i), ready to weight them:
//   O = normalizer * sum_i weight_i * O_i,  weight_i = exp(LSE_i - max),  normalizer = 1 / sum_i weight_i.
// Weights are taken relative to the largest LSE, never to the rounded merged LSE, so the
// result's accuracy does not depend on |LSE| (exp(LSE_i - LSE) with an fp32 LSE of 2e4 would
// carry a relative error of 2e4 * 2^-24).
struct MergeScale {
  float max;         // largest part LSE (-inf: every part absent; NaN: poisoned)
  float normalizer;  // 1 / sum of the weights; 0 when every part is absent, NaN when poisoned
  float lse;         // merged natural-log LSE
};

// load_lse(p) returns part p's LSE.
template <typename LoadLse>
HELIX_HOST_DEVICE MergeScale merge_scale(int num_parts, LoadLse load_lse) {
  SoftmaxState state = softmax_state_empty();
  for (int p = 0; p < num_parts; ++p) softmax_state_add(state, load_lse(p));
  return {state.max, state.sum == 0.0f ? 0.0f : 1.0f / state.sum, softmax_state_lse(state)};
}

// Unnormalized weight exp(part_lse - max) of one part, in [0, 1]: exactly 0 for an absent
// part (-inf), NaN in a poisoned merge. Callers skip parts of weight 0 rather than multiply,
// so an absent part's garbage output (NaN, inf) never reaches the result, then multiply the
// weighted sum by the normalizer.
HELIX_HOST_DEVICE float merge_weight(float part_lse, const MergeScale& scale) {
  if (part_lse == neg_inf()) return 0.0f;
  return expf(part_lse - scale.max);
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

// Folds a complete log2-domain state (a slice of the tokens: its max and its whole sum) into
// total. Associative; an empty part changes nothing and a poisoned part (sum NaN, whatever
// its max: an all-NaN slice keeps max -inf) poisons total.
HELIX_HOST_DEVICE void online_softmax_combine(SoftmaxState& total, SoftmaxState part) {
  if (part.sum == 0.0f) return;
  online_softmax_rescale(total, part.max);
  total.sum += part.sum * exp2f(part.max - total.max);
}

// Natural-log LSE of a log2-domain state: -inf when no score was seen (sum 0), NaN when a
// score was NaN or +inf (then exp2 of it, and so the sum, is NaN: fmaxf/std::max drop a NaN
// from the tile max, but never from the sum).
HELIX_HOST_DEVICE float online_softmax_lse(const SoftmaxState& state) {
  if (state.sum == 0.0f) return neg_inf();
  return (state.max + log2f(state.sum)) * kLn2;
}

// The factor that turns a state's weighted sum of V into its output: scale / sum, 0 for an
// empty state (whose sum of V is 0), NaN for a poisoned one.
HELIX_HOST_DEVICE float online_softmax_normalizer(const SoftmaxState& state, float scale) {
  return state.sum == 0.0f ? 0.0f : scale / state.sum;
}

}  // namespace helix
