// flash_decode, CPU: split-KV decode attention over a paged cache.
//
// Work items are (sequence, KV head, slab of at most 64 query heads of its GQA group, chunk of
// tokens). An item walks its chunk in tiles of kTile tokens; each K/V row is read once for
// the whole query group. Two engines compute a tile's products:
// - GEMM tiles on torch's CPU micro-kernel (at::native::cpublas::brgemm, oneDNN's: AMX for
//   bf16 where the CPU has it, AVX-512/AVX2 for fp32), for groups of more than 4 heads:
//     scores S[T, H] = K_tile[T, Dk] x Q^T[Dk, H]   (K read in place when the tile is whole)
//     acc[H, Dv]    += P[H, T] x V_tile[T, Dv]      (bf16: V packed in VNNI pairs of rows)
// - vector loops (AVX-512/AVX2/baseline clones, simd.h) for groups of 1-4 heads, where an AMX
//   tile (16 rows at least) would be mostly padding; with bf16 q and K/V on CPUs with
//   AVX512-BF16, its products run on vdpbf16ps (HELIX_CPU_DPBF16=0 keeps the fp32 loops).
// Between the products runs the online softmax of helix/softmax_merge.h (the CUDA kernel's
// math); chunks of one sequence are merged with the merge math of merge_states. Like the CUDA
// kernel, probabilities are rounded to q's dtype before they weight V (a no-op for float32,
// which only this CPU kernel takes: the runtime's fp32 test models).
//
// Compute types: bf16 q with a group > 4 runs in bf16 when oneDNN can pack bf16 on this CPU
// (AMX); everything else widens K/V to fp32, exact for every input dtype (vdpbf16ps too: bf16
// products are exact in fp32). AMX and vdpbf16ps read bf16 subnormals (|x| < 2^-126) as zero:
// there such q, K, V or probability elements count as 0 (an absolute error below 1.2e-38 per
// term).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "flash_decode_args.h"
#include "helix/fp8.h"
#include "helix/softmax_merge.h"
#include "simd.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define HELIX_HAVE_DPBF16 1
#else
#define HELIX_HAVE_DPBF16 0
#endif

namespace helix {
namespace {

constexpr int64_t kChunkTokens = 2048;  // tokens per work item (and per partial state)
constexpr int64_t kTile = 64;           // tokens per GEMM tile (even: VNNI pairs rows)
constexpr int64_t kSpan = 512;          // tokens per online-softmax step of the GEMM engines
constexpr int64_t kMaxSlabHeads = 64;   // query heads per work item (the columns of a score tile)
// Query groups up to this size run the vector engine: a GEMM tile is 16 rows of heads at least.
constexpr int64_t kVectorMaxGroup = 4;
// Query heads per vector-engine work item: its rows span several KV heads of small groups.
constexpr int64_t kVectorMaxItemHeads = 16;

using c10::BFloat16;

// 2^f for |f| <= 1/2 by its Taylor series to degree 7 (relative error < 1e-8), on a float or
// a vector of them.
template <typename F>
HELIX_VECTOR_INLINE F exp2_fraction(F f) {
  // ln2^k / k!, k = 7 down to 1.
  constexpr float c7 = 1.5252733804059841e-05f, c6 = 1.5403530393381606e-04f, c5 = 1.3333558146428443e-03f,
                  c4 = 9.6181291076284772e-03f, c3 = 5.5504108664821580e-02f, c2 = 2.4022650695910071e-01f,
                  c1 = 6.9314718055994531e-01f;
  return 1.0f + f * (c1 + f * (c2 + f * (c3 + f * (c4 + f * (c5 + f * (c6 + f * c7))))));
}

// The unsigned integer type as wide as F (a float or a vector of floats), for its bits.
template <typename F>
struct BitsOf {
  using type = uint32_t;
};
#if defined(__GNUC__)
template <>
struct BitsOf<F32x16> {
  using type = U32x16;
};
#endif

// 2^x for x <= 0 (the probabilities of an online softmax), on a float or 16 lanes of them,
// branch-free so the loops that call it vectorize: x = n + f with n = round(x), |f| <= 1/2, 2^f
// by its Taylor series to degree 7 (relative error < 1e-8 before rounding), 2^n built in the
// exponent bits. x below -126 gives 0 (exp2(-inf) = 0, as for an absent key); NaN stays NaN.
template <typename F>
HELIX_VECTOR_INLINE F exp2_nonpositive(F x) {
  using U = typename BitsOf<F>::type;
  const F floor = F{} - 127.0f;
  x = x < floor ? floor : x;  // NaN compares false and passes through
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const F shifted = x + kRound;
  const F f = x - (shifted - kRound);
  U shifted_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof(shifted_bits));
  const U exponent_bits = (shifted_bits - 0x4B400000u + 127u) << 23;  // n + 127 in the exponent
  F two_to_n;
  std::memcpy(&two_to_n, &exponent_bits, sizeof(two_to_n));
  return exp2_fraction(f) * two_to_n;
}

// Scales the tile's first `count` rows of S[t, h] into the log2 domain in place and returns
// each head's largest score. Scaling once, before both the max and the exponent, keeps
// score - max exactly 0 at the max (a multiply contracted into the subtraction's FMA in one
// place and not the other would leave it +-1 ulp of the score, which for a huge score is huge).
// std::max keeps the running value when a score is NaN: NaN reaches the sum, not the max.
HELIX_CPU_CLONES void scale_and_max(float* scores, int64_t width, int64_t heads, int64_t count, float scale,
                                    float* tile_max) {
  for (int64_t h = 0; h < heads; ++h) tile_max[h] = neg_inf();
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      const float score = scores[t * width + h] * scale;
      scores[t * width + h] = score;
      tile_max[h] = std::max(tile_max[h], score);
    }
  }
}

// S[t, h] -> exp2(S[t, h] - offset[h]) in place for t < count (every argument <= 0), and each
// head's sum.
HELIX_CPU_CLONES void exponentiate_tile(float* scores, int64_t width, int64_t heads, int64_t count,
                                        const float* offset, float* tile_sum) {
  for (int64_t h = 0; h < heads; ++h) tile_sum[h] = 0.0f;
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      const float probability = exp2_nonpositive(scores[t * width + h] - offset[h]);
      scores[t * width + h] = probability;
      tile_sum[h] += probability;
    }
  }
}

// Row h of P: the tile's probabilities of head h (column h of the in-place S[t, h]) rounded
// to q's dtype, as the tensor-core kernel feeds them to its P*V product, in the compute type.
template <typename QT, typename CT>
HELIX_CPU_CLONES void round_probabilities(const float* __restrict probabilities, int64_t width, int64_t head,
                                          int64_t count, CT* __restrict row) {
  if constexpr (std::is_same_v<CT, BFloat16>) {  // q is bf16 too
    uint16_t* bits = reinterpret_cast<uint16_t*>(row);
    for (int64_t t = 0; t < count; ++t) bits[t] = bf16_round_bits(probabilities[t * width + head]);
  } else {
    for (int64_t t = 0; t < count; ++t) row[t] = static_cast<float>(static_cast<QT>(probabilities[t * width + head]));
  }
}

#if defined(__GNUC__)
// 16 rows of 16 bf16 lanes transposed in registers: four perfect shuffles (row i with row i + 8,
// lanes interleaved) rotate each element's 8-bit (row, lane) index by one bit; four of them
// swap row and lane.
HELIX_VECTOR_INLINE void transpose_16x16(U16x16* rows) {
  for (int stage = 0; stage < 4; ++stage) {
    U16x16 next[16];
    for (int i = 0; i < 8; ++i) {
      next[2 * i] = __builtin_shufflevector(rows[i], rows[i + 8], 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7,
                                            23);
      next[2 * i + 1] = __builtin_shufflevector(rows[i], rows[i + 8], 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29,
                                                14, 30, 15, 31);
    }
    for (int i = 0; i < 16; ++i) rows[i] = next[i];
  }
}

// exponentiate_tile and round_probabilities in one pass for bf16 probabilities and a score tile
// whose width is a multiple of 16: 16 tokens x 16 heads at a time, exponentiated on 16 lanes,
// rounded to bf16, transposed in registers and stored to P [heads, stride] (tokens from `count`
// on up to a multiple of 16 as zeros; the caller zeroes the rest of each row).
HELIX_CPU_CLONES void exponentiate_and_round_bf16(const float* __restrict scores, int64_t width, int64_t heads,
                                                  int64_t count, const float* __restrict offset,
                                                  float* __restrict tile_sum, uint16_t* __restrict probabilities,
                                                  int64_t stride) {
  for (int64_t column = 0; column < width; column += 16) {
    F32x16 head_offset = {}, sum = {};
    for (int64_t h = 0; h < 16 && column + h < heads; ++h) head_offset[h] = offset[column + h];
    for (int64_t first = 0; first < count; first += 16) {
      U16x16 rows[16];
      for (int64_t j = 0; j < 16; ++j) {
        if (first + j >= count) {
          rows[j] = U16x16{};
          continue;
        }
        const F32x16 p = exp2_nonpositive(load_f32x16(scores + (first + j) * width + column) - head_offset);
        sum += p;
        U32x16 word;
        std::memcpy(&word, &p, sizeof(word));
        const U32x16 rounded = p != p ? U32x16{} + kQuietNanBitsBf16 : bf16_round_word(word);
        rows[j] = __builtin_convertvector(rounded, U16x16);
      }
      transpose_16x16(rows);
      for (int64_t h = 0; h < 16 && column + h < heads; ++h) {
        std::memcpy(probabilities + (column + h) * stride + first, &rows[h], sizeof(U16x16));
      }
    }
    for (int64_t h = 0; h < 16 && column + h < heads; ++h) tile_sum[column + h] = sum[h];
  }
}
#endif

HELIX_CPU_CLONES void scale_row(float* row, int64_t count, float factor) {
  for (int64_t d = 0; d < count; ++d) row[d] *= factor;
}

// fp8_e4m3_to_float's values as bf16 and fp32 bits, computed with masks instead of branches
// so that a row of codes converts in vector registers (NaN as sign | the canonical quiet NaN).
inline uint32_t fp8_e4m3_to_float_bits(uint8_t code) {
  const uint32_t magnitude = code & 0x7Fu, sign = static_cast<uint32_t>(code & 0x80u) << 24;
  const uint32_t normal = (magnitude << 20) + (120u << 23);  // exponent rebiased 7 -> 127
  const float subnormal_value = static_cast<float>(static_cast<int32_t>(magnitude)) * 0.001953125f;  // m * 2^-9
  uint32_t subnormal;
  std::memcpy(&subnormal, &subnormal_value, sizeof(subnormal));
  const uint32_t is_subnormal = 0u - static_cast<uint32_t>(magnitude < 8);
  const uint32_t is_nan = 0u - static_cast<uint32_t>(magnitude == 0x7Fu);
  const uint32_t bits = (subnormal & is_subnormal) | (normal & ~is_subnormal);
  return ((kQuietNanBitsF32 & is_nan) | (bits & ~is_nan)) | sign;
}

#if defined(__GNUC__)
typedef uint16_t U16x32 __attribute__((vector_size(64)));
typedef uint8_t U8x32 __attribute__((vector_size(32)));

// 32 E4M3 codes as bf16 bits (exact; the same values as fp8_e4m3_to_float_bits >> 16) in 16-bit
// lanes, a third of the instructions of the 32-bit form above: a normal code's bits are its
// magnitude shifted into place plus the exponent rebias, a subnormal's (magnitude < 8: m * 2^-9)
// come from an 8-entry table (one vpermw), NaN (magnitude 0x7F) is the canonical quiet NaN.
HELIX_VECTOR_INLINE U16x32 fp8_e4m3_to_bf16x32(const uint8_t* codes) {
  U8x32 bytes;
  std::memcpy(&bytes, codes, sizeof(bytes));
  const U16x32 code = __builtin_convertvector(bytes, U16x32);
  const U16x32 magnitude = code & 0x7F;
  const U16x32 normal = (magnitude << 4) + (120 << 7);
  constexpr uint16_t kZero = 0, kSub1 = 0x3B00, kSub2 = 0x3B80, kSub3 = 0x3BC0, kSub4 = 0x3C00, kSub5 = 0x3C20,
                     kSub6 = 0x3C40, kSub7 = 0x3C60;  // m * 2^-9 for m = 0..7
  const U16x32 table = {kZero, kSub1, kSub2, kSub3, kSub4, kSub5, kSub6, kSub7};
  const U16x32 subnormal = __builtin_shuffle(table, magnitude);  // only read where magnitude < 8
  U16x32 bits = magnitude < 8 ? subnormal : normal;
  bits = magnitude == 0x7F ? U16x32{} + kQuietNanBitsBf16 : bits;
  return bits | ((code & 0x80) << 8);
}
#endif

// Element d of a cache row as a float (exact), written for the vectorizer.
template <typename KVT>
inline float widen(const KVT* row, int64_t d) {
  if constexpr (std::is_same_v<KVT, float>) {
    return row[d];
  } else if constexpr (std::is_same_v<KVT, BFloat16>) {
    const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(row)[d]) << 16;
    float value;
    std::memcpy(&value, &bits, sizeof(value));
    return value;
  } else if constexpr (std::is_same_v<KVT, uint8_t>) {
    const uint32_t bits = fp8_e4m3_to_float_bits(row[d]);
    float value;
    std::memcpy(&value, &bits, sizeof(value));
    return value;
  } else {
    return static_cast<float>(row[d]);
  }
}

// One cache row, converted to the compute type (exact: fp8 and bf16 into bf16, any into fp32).
template <typename KVT, typename CT>
HELIX_CPU_CLONES void convert_row(const KVT* __restrict source, int64_t count, CT* __restrict destination) {
  if constexpr (std::is_same_v<KVT, CT>) {
    std::memcpy(destination, source, count * sizeof(CT));
  } else if constexpr (std::is_same_v<KVT, uint8_t> && std::is_same_v<CT, BFloat16>) {
    uint16_t* bits = reinterpret_cast<uint16_t*>(destination);
    int64_t d = 0;
#if defined(__GNUC__)
    for (; d + 32 <= count; d += 32) {
      const U16x32 converted = fp8_e4m3_to_bf16x32(source + d);
      std::memcpy(bits + d, &converted, sizeof(converted));
    }
#endif
    for (; d < count; ++d) {  // every E4M3 value is a bf16: the top half of its fp32 bits
      bits[d] = static_cast<uint16_t>(fp8_e4m3_to_float_bits(source[d]) >> 16);
    }
  } else {
    for (int64_t d = 0; d < count; ++d) destination[d] = widen(source, d);  // CT is float
  }
}

// One row pair of a VNNI-packed bf16 B operand ([rows/2][cols][2], the layout oneDNN's AMX
// micro-kernel reads): out[n] = (bf16 bits of even[n]) | (bf16 bits of odd[n]) << 16; a null
// odd row is zeros.
template <typename KVT>
HELIX_CPU_CLONES void interleave_rows(const KVT* __restrict even, const KVT* __restrict odd, int64_t count,
                                      uint32_t* __restrict out) {
  const auto bits = [](const KVT* row, int64_t n) -> uint32_t {
    if constexpr (std::is_same_v<KVT, uint8_t>) {
      return fp8_e4m3_to_float_bits(row[n]) >> 16;
    } else {
      return reinterpret_cast<const uint16_t*>(row)[n];
    }
  };
  int64_t n = 0;
#if defined(__GNUC__)
  if constexpr (std::is_same_v<KVT, uint8_t>) {  // 32 codes of each row at a time, paired by vpermt2w
    for (; odd != nullptr && n + 32 <= count; n += 32) {
      const U16x32 low = fp8_e4m3_to_bf16x32(even + n), high = fp8_e4m3_to_bf16x32(odd + n);
      const U16x32 first = __builtin_shufflevector(low, high, 0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7,
                                                   39, 8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47);
      const U16x32 second = __builtin_shufflevector(low, high, 16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22,
                                                    54, 23, 55, 24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30,
                                                    62, 31, 63);
      std::memcpy(out + n, &first, sizeof(first));
      std::memcpy(out + n + 16, &second, sizeof(second));
    }
  }
#endif
  if (odd == nullptr) {
    for (; n < count; ++n) out[n] = bits(even, n);
  } else {
    for (; n < count; ++n) out[n] = bits(even, n) | (bits(odd, n) << 16);
  }
}

// The vector engine's tile products (small query groups, where a 16-row GEMM tile would be
// mostly padding), on 16-float vectors (simd.h): rows read in place through their pointers,
// bf16 widened as it is loaded, fp8 and fp16 widened into `widened` first.
// A vector item may span several KV heads (small groups): head h of the item reads KV head
// h / group, `head_stride` elements after the item's first one in each row, and the loops walk
// token rows in the outer loop so that memory is first touched in row order (a KV head's own
// rows are Hkv * D elements apart: a stride the hardware prefetchers follow badly). While row t
// is read, row t of the next tile (`ahead`, the item's span of it) is prefetched.
constexpr int64_t kLanes = 16;

// Asks for `bytes` bytes from `start` on ahead of their use.
inline void prefetch_bytes(const void* start, int64_t bytes) {
  for (int64_t byte = 0; byte < bytes; byte += 64) __builtin_prefetch(static_cast<const char*>(start) + byte);
}

// 16 elements of a row from `d` on, as floats (`row` is float or bf16; the scalar tails use widen).
template <typename RT>
HELIX_VECTOR_INLINE F32x16 load_row16(const RT* row, int64_t d) {
  if constexpr (std::is_same_v<RT, float>) {
    return load_f32x16(row + d);
  } else {
    return load_f32x16_from_bf16(reinterpret_cast<const uint16_t*>(row) + d);
  }
}

// The row a vector loop reads: bf16 and fp32 in place, other types widened into `widened`.
template <typename KVT>
using VectorRow = std::conditional_t<std::is_same_v<KVT, BFloat16>, BFloat16, float>;

template <typename KVT>
HELIX_VECTOR_INLINE const VectorRow<KVT>* vector_row(const KVT* row, int64_t dim, float* widened) {
  if constexpr (std::is_same_v<KVT, float> || std::is_same_v<KVT, BFloat16>) {
    return row;
  } else {
    int64_t d = 0;
#if defined(__GNUC__)
    if constexpr (std::is_same_v<KVT, uint8_t>) {
      for (; d + 32 <= dim; d += 32) {
        const U16x32 bits = fp8_e4m3_to_bf16x32(row + d);
        store_f32x16(widened + d, widen_bf16x16(__builtin_shufflevector(bits, bits, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9,
                                                                        10, 11, 12, 13, 14, 15)));
        store_f32x16(widened + d + 16, widen_bf16x16(__builtin_shufflevector(bits, bits, 16, 17, 18, 19, 20, 21,
                                                                             22, 23, 24, 25, 26, 27, 28, 29, 30, 31)));
      }
    }
#endif
    for (; d < dim; ++d) widened[d] = widen(row, d);
    return widened;
  }
}

// query . key over dim elements: two 16-lane accumulators (independent FMA chains), a scalar
// tail for dims that are not a multiple of 16.
template <typename RT>
HELIX_VECTOR_INLINE float dot_row(const float* __restrict query, const RT* __restrict key, int64_t dim) {
  F32x16 even = {}, odd = {};
  int64_t d = 0;
  for (; d + 2 * kLanes <= dim; d += 2 * kLanes) {
    even += load_f32x16(query + d) * load_row16(key, d);
    odd += load_f32x16(query + d + kLanes) * load_row16(key, d + kLanes);
  }
  if (d + kLanes <= dim) {
    even += load_f32x16(query + d) * load_row16(key, d);
    d += kLanes;
  }
  float sum = horizontal_sum(even + odd);
  for (; d < dim; ++d) sum += query[d] * widen(key, d);
  return sum;
}

//   scores[t * heads + h] = queries[h] . rows[t][(h / group) * head_stride :][:dim]   (t < count)
template <typename KVT>
HELIX_CPU_CLONES void tile_scores_vector(const KVT* const* rows, int64_t count, const float* __restrict queries,
                                         int64_t heads, int64_t group, int64_t head_stride, int64_t dim,
                                         float* __restrict widened, float* __restrict scores,
                                         const KVT* const* ahead, int64_t ahead_count, int64_t ahead_bytes) {
  for (int64_t t = 0; t < count; ++t) {
    if (t < ahead_count) prefetch_bytes(ahead[t], ahead_bytes);
    for (int64_t first = 0; first < heads; first += group) {
      const auto* key = vector_row(rows[t] + first / group * head_stride, dim, widened);
      for (int64_t h = first; h < first + group; ++h) scores[t * heads + h] = dot_row(queries + h * dim, key, dim);
    }
  }
}

//   acc[h] += probabilities[h * tile + t] * rows[t][(h / group) * head_stride :][:dim]   (t < count)
template <typename KVT>
HELIX_CPU_CLONES void tile_values_vector(const KVT* const* rows, int64_t count, const float* __restrict probabilities,
                                         int64_t tile, int64_t heads, int64_t group, int64_t head_stride,
                                         int64_t dim, float* __restrict widened, float* __restrict acc,
                                         const KVT* const* ahead, int64_t ahead_count, int64_t ahead_bytes) {
  for (int64_t t = 0; t < count; ++t) {
    if (t < ahead_count) prefetch_bytes(ahead[t], ahead_bytes);
    for (int64_t first = 0; first < heads; first += group) {
      const auto* value = vector_row(rows[t] + first / group * head_stride, dim, widened);
      for (int64_t h = first; h < first + group; ++h) {
        const float weight = probabilities[h * tile + t];
        float* out = acc + h * dim;
        int64_t d = 0;
        for (; d + kLanes <= dim; d += kLanes) store_f32x16(out + d, load_f32x16(out + d) + weight * load_row16(value, d));
        for (; d < dim; ++d) out[d] += weight * widen(value, d);
      }
    }
  }
}

// bf16 q and K on CPUs with AVX512-BF16: the scores of tile_scores_vector by vdpbf16ps (pairs
// of bf16 products, exact, added into fp32 lanes), 32 elements per instruction instead of
// widening K to fp32 first. Like AMX it reads bf16 subnormals as zero (an error below 1.2e-38
// per term). Measured (2-core Xeon, 2026-12-07; with tile_values_dpbf16): one thread reads a
// cache-resident C4-like shape at 14.3-15.5 GB/s instead of 11.0-12.6.
#if HELIX_HAVE_DPBF16
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void tile_scores_dpbf16(
    const BFloat16* const* rows, int64_t count, const BFloat16* __restrict queries, int64_t heads, int64_t group,
    int64_t head_stride, int64_t dim, float* __restrict scores, const BFloat16* const* ahead, int64_t ahead_count,
    int64_t ahead_bytes) {
  const int64_t whole = dim / 32 * 32;
  const __mmask32 tail_mask = static_cast<__mmask32>((uint64_t{1} << (dim - whole)) - 1);
  for (int64_t t = 0; t < count; ++t) {
    if (t < ahead_count) prefetch_bytes(ahead[t], ahead_bytes);
    for (int64_t first = 0; first < heads; first += group) {
      const BFloat16* key = rows[t] + first / group * head_stride;
      for (int64_t h = first; h < first + group; ++h) {
        const BFloat16* query = queries + h * dim;
        __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();
        int64_t d = 0;
        for (; d + 64 <= whole; d += 64) {
          even = _mm512_dpbf16_ps(even, (__m512bh)_mm512_loadu_si512(query + d), (__m512bh)_mm512_loadu_si512(key + d));
          odd = _mm512_dpbf16_ps(odd, (__m512bh)_mm512_loadu_si512(query + d + 32),
                                 (__m512bh)_mm512_loadu_si512(key + d + 32));
        }
        if (d < whole) {
          even = _mm512_dpbf16_ps(even, (__m512bh)_mm512_loadu_si512(query + d), (__m512bh)_mm512_loadu_si512(key + d));
        }
        if (tail_mask != 0) {  // the last dim % 32 elements, the rest of the lanes zero
          odd = _mm512_dpbf16_ps(odd, (__m512bh)_mm512_maskz_loadu_epi16(tail_mask, query + whole),
                                 (__m512bh)_mm512_maskz_loadu_epi16(tail_mask, key + whole));
        }
        scores[t * heads + h] = _mm512_reduce_add_ps(_mm512_add_ps(even, odd));
      }
    }
  }
}

// bf16 V: the products of tile_values_vector by vdpbf16ps, two tokens per instruction: rows t
// and t + 1 interleaved (unpack within 128-bit lanes) against the broadcast pair of their
// probabilities (already bf16 values). The accumulator is kept in the interleaved order
// (dpbf16_value_index gives where dim d lives); dim a multiple of 32.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void tile_values_dpbf16(
    const BFloat16* const* rows, int64_t count, const float* __restrict probabilities, int64_t tile, int64_t heads,
    int64_t group, int64_t head_stride, int64_t dim, float* __restrict acc, const BFloat16* const* ahead,
    int64_t ahead_count, int64_t ahead_bytes) {
  const auto bf16_bits = [](float value) {  // value is a bf16 already: its top half
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    return bits >> 16;
  };
  for (int64_t t = 0; t < count; t += 2) {
    const bool pair = t + 1 < count;
    for (int64_t r = t; r < t + 2 && r < ahead_count; ++r) prefetch_bytes(ahead[r], ahead_bytes);
    for (int64_t first = 0; first < heads; first += group) {
      const BFloat16* even_row = rows[t] + first / group * head_stride;
      const BFloat16* odd_row = pair ? rows[t + 1] + first / group * head_stride : nullptr;
      for (int64_t d = 0; d < dim; d += 32) {
        const __m512i even = _mm512_loadu_si512(even_row + d);
        const __m512i odd = pair ? _mm512_loadu_si512(odd_row + d) : _mm512_setzero_si512();
        const __m512bh low = (__m512bh)_mm512_unpacklo_epi16(even, odd);
        const __m512bh high = (__m512bh)_mm512_unpackhi_epi16(even, odd);
        for (int64_t h = first; h < first + group; ++h) {
          const uint32_t weights = bf16_bits(probabilities[h * tile + t]) |
                                   (pair ? bf16_bits(probabilities[h * tile + t + 1]) << 16 : 0u);
          const __m512bh weight = (__m512bh)_mm512_set1_epi32(static_cast<int>(weights));
          float* out = acc + h * dim + d;
          _mm512_storeu_ps(out, _mm512_dpbf16_ps(_mm512_loadu_ps(out), low, weight));
          _mm512_storeu_ps(out + 16, _mm512_dpbf16_ps(_mm512_loadu_ps(out + 16), high, weight));
        }
      }
    }
  }
}

bool cpu_has_dpbf16() {
  static const bool supported = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
  return supported;
}
#else
bool cpu_has_dpbf16() { return false; }
#endif

// Where tile_values_dpbf16 keeps dim d of a row: in each 32-dim chunk, unpacklo's lanes
// (dims 8L + 0..3 of 128-bit lane L) first, then unpackhi's (8L + 4..7).
inline int64_t dpbf16_value_index(int64_t d) {
  const int64_t chunk = d / 32 * 32, lane = d % 32 / 8, k = d % 8;
  return chunk + (k < 4 ? 4 * lane + k : 16 + 4 * lane + k - 4);
}

// HELIX_CPU_DPBF16=0 keeps the vector engine's bf16 scores on the fp32 loops (how the tests
// cover those on a CPU that has AVX512-BF16).
bool use_dpbf16() {
  const char* setting = std::getenv("HELIX_CPU_DPBF16");
  return cpu_has_dpbf16() && !(setting != nullptr && std::strcmp(setting, "0") == 0);
}

struct CacheView {
  const void* data;
  int64_t stride_block, stride_token, stride_head;
};

struct WorkItem {
  int64_t batch, kv_head, head_begin, heads, token_begin, token_end;
};

// Several query tokens per sequence (q [B, Q, Hq, Dk]): the kernel sees Q * Hq query rows, the
// Q * group rows of a KV head together (row j of a KV head is query j / group, head j % group of
// its group), so one read of a K/V tile serves every query token; each row sees its query's
// first visible[b * Q + i] keys (the others are masked to -inf). Q = 1 is the plain layout.
struct QueryRows {
  int64_t num_queries, group;                     // Q and the real GQA group (Hq / Hkv)
  int64_t num_q_heads;                            // the real Hq
  int64_t stride_batch, stride_query, stride_head;  // q's strides
  const int64_t* visible;                         // [B * Q] keys each query sees

  // Query token and real head of kernel row `row` (in [0, Q * Hq)).
  int64_t query_of(int64_t row) const { return row % (num_queries * group) / group; }
  int64_t head_of(int64_t row) const { return row / (num_queries * group) * group + row % group; }
  int64_t q_offset(int64_t batch, int64_t row) const {
    return batch * stride_batch + query_of(row) * stride_query + head_of(row) * stride_head;
  }
  int64_t out_row(int64_t batch, int64_t row) const {  // row of out viewed as [B * Q * Hq, Dv]
    return (batch * num_queries + query_of(row)) * num_q_heads + head_of(row);
  }
  int64_t keys_seen(int64_t batch, int64_t row) const { return visible[batch * num_queries + query_of(row)]; }
};

// Buffers of one thread, reused across its work items.
template <typename CT>
struct Scratch {
  std::vector<CT> queries, keys, values, values_packed, probabilities;
  std::vector<BFloat16> queries_bf16;  // the vector engine's q when it scores with vdpbf16ps
  std::vector<float> scores, accumulator, tile_max, offset, tile_sum;
  std::vector<SoftmaxState> states;
};

template <typename QT, typename KVT, typename CT>
class FlashDecodeCpu {
  static constexpr bool kVnni = std::is_same_v<CT, BFloat16>;  // bf16 operands, B packed for AMX

 public:
  // vector: the vector engine (CT float) rather than GEMM tiles.
  FlashDecodeCpu(const at::Tensor& q, const at::Tensor& k_cache, const std::optional<at::Tensor>& v_cache,
                 const at::Tensor& block_table, const FlashDecodeShape& shape, const QueryRows& rows,
                 float softmax_scale, float k_scale, float v_scale, bool vector)
      : vector_(vector),
        dpbf16_(vector && std::is_same_v<QT, BFloat16> && std::is_same_v<KVT, BFloat16> && use_dpbf16()),
        dpbf16_values_(dpbf16_ && shape.head_dim_v % 32 == 0),
        shape_(shape),
        group_size_(shape.num_q_heads / shape.num_kv_heads),
        rows_(rows),
        q_(q.const_data_ptr<QT>()),
        block_table_(block_table.const_data_ptr<int32_t>()),
        block_table_strides_{block_table.stride(0), block_table.stride(1)},
        score_scale_log2_(softmax_scale * k_scale * kLog2e),
        // MLA: V is part of the K entry, dequantized with k_scale.
        value_scale_(shape.mla ? k_scale : v_scale) {
    key_ = {k_cache.const_data_ptr(), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
    const at::Tensor& values = v_cache.has_value() ? *v_cache : k_cache;
    value_ = {values.const_data_ptr(), values.stride(0), values.stride(1), values.stride(2)};
    // Cache rows packed back to back, all KV heads of a token together, each head's Dk dims.
    packed_rows_ = key_.stride_token == shape.num_kv_heads * shape.head_dim_k &&
                   (shape.num_kv_heads == 1 || key_.stride_head == shape.head_dim_k);
  }

  // KV heads a work item reads (vector items span several; GEMM items one).
  int64_t item_kv_heads(const WorkItem& item) const { return (item.heads - 1) / group_size_ + 1; }

  // Bytes of each cache row the item reads: from its first KV head to the end of its last.
  int64_t row_span_bytes(const WorkItem& item, int64_t head_stride, int64_t dim) const {
    return ((item_kv_heads(item) - 1) * head_stride + dim) * static_cast<int64_t>(sizeof(KVT));
  }

  // Columns of the packed Q^T (and of the score tile) for a slab of `heads` query heads.
  int64_t padded_heads(int64_t heads) const { return kVnni ? (heads + 15) / 16 * 16 : heads; }

  // Partial state of one work item: out [heads, Dv] (normalized, fp32) and lse [heads].
  void run(const WorkItem& item, Scratch<CT>& s, float* partial_out, float* partial_lse) const {
    const int64_t heads = item.heads, width = padded_heads(heads);
    const int64_t dim_k = shape_.head_dim_k, dim_v = shape_.head_dim_v;
    // GEMM engines: software prefetch two tiles ahead when the item reads part of each cache
    // row (a KV head of several, or padded rows): its rows are then apart, a pattern the
    // hardware prefetchers follow badly. Measured (2-core Xeon, 2026-12-07): +15-20% at Hkv = 8,
    // -5-10% on rows read whole. (The vector engine prefetches as it reads.)
    const bool prefetch = !packed_rows_ || item_kv_heads(item) < shape_.num_kv_heads;
    // Q^T [Dk, width] (padding columns zero): row-major for fp32 GEMMs, VNNI pairs of rows for
    // bf16 ones; the vector engine keeps Q [heads, Dk].
    s.queries.assign(dim_k * width, CT(0.0f));
    for (int64_t h = 0; h < heads; ++h) {
      const QT* row = q_ + rows_.q_offset(item.batch, item.kv_head * group_size_ + item.head_begin + h);
      if constexpr (kVnni && std::is_same_v<QT, BFloat16>) {  // VNNI pairs copied as 32-bit words (Dk even)
        uint32_t* pairs = reinterpret_cast<uint32_t*>(s.queries.data());
        for (int64_t d = 0; d < dim_k; d += 2) std::memcpy(&pairs[(d / 2) * width + h], row + d, sizeof(uint32_t));
        continue;
      }
      for (int64_t d = 0; d < dim_k; ++d) {
        const int64_t index = vector_ ? h * dim_k + d : kVnni ? ((d / 2) * width + h) * 2 + d % 2 : d * width + h;
        s.queries[index] = static_cast<CT>(static_cast<float>(row[d]));
      }
    }
    if (dpbf16_) {
      s.queries_bf16.resize(heads * dim_k);
      for (int64_t h = 0; h < heads; ++h) {
        const QT* row = q_ + rows_.q_offset(item.batch, item.kv_head * group_size_ + item.head_begin + h);
        for (int64_t d = 0; d < dim_k; ++d) s.queries_bf16[h * dim_k + d] = static_cast<BFloat16>(row[d]);
      }
    }
    const CT* queries = s.queries.data();
    s.accumulator.assign(heads * dim_v, 0.0f);
    s.tile_max.resize(heads);
    s.offset.resize(heads);
    s.tile_sum.resize(heads);
    s.states.assign(heads, softmax_state_empty());
    if (vector_) {
      if constexpr (!kVnni) {  // the vector engine computes in fp32
        s.scores.resize(kTile * width);
        s.probabilities.resize(heads * kTile);
        for (int64_t first = item.token_begin; first < item.token_end; first += kTile) {
          vector_tile(item, first, std::min(kTile, item.token_end - first), s);
        }
      }
    } else {
      // Spans of kSpan tokens: all score tiles of a span (one GEMM shape), the online softmax
      // over the span, then all P x V tiles (another shape): the micro-kernel switches its
      // tile configuration twice per span, not twice per tile.
      s.scores.resize(kSpan * width);
      s.probabilities.resize(heads * kSpan);
      for (int64_t span = item.token_begin; span < item.token_end; span += kSpan) {
        const int64_t span_count = std::min(kSpan, item.token_end - span);
        const int64_t tiles = (span_count + kTile - 1) / kTile;
        for (int64_t i = 0; i < tiles; ++i) {
          const int64_t first = span + i * kTile, count = std::min(kTile, span + span_count - first);
          if (!kVnni && prefetch) prefetch_rows(key_, dim_k, item, first + 2 * kTile);
          int64_t key_stride = 0;
          const CT* keys = tile_rows(key_, dim_k, item, first, count, s.keys, &key_stride);
          at::native::cpublas::brgemm(kTile, width, dim_k, key_stride, width, width, false, keys, queries,
                                      s.scores.data() + i * kTile * width, kVnni);
        }
        softmax_tile(s, item, span, heads, width, span_count, kSpan);
        const CacheView& cache = shape_.mla ? key_ : value_;  // MLA: V is the first Dv dims of the K rows
        if constexpr (kVnni) {
          // V of the whole span packed straight from the cache rows (converted from fp8 on the
          // way; zero pairs past the sequence), so it is never staged; then one P x V product
          // for the span (one micro-kernel call instead of one per tile).
          s.values_packed.resize(kSpan * dim_v);
          uint32_t* packed = reinterpret_cast<uint32_t*>(s.values_packed.data());
          const int64_t value_bytes = row_span_bytes(item, cache.stride_head, dim_v);
          const int64_t key_bytes = row_span_bytes(item, key_.stride_head, dim_k);
          for (int64_t i = 0; i < tiles; ++i) {
            const int64_t first = span + i * kTile, count = std::min(kTile, span + span_count - first);
            const KVT* rows[kTile];
            tile_row_pointers(cache, item, first, count, rows);
            // Interleaved with the packing: the next tile's V rows and the next span's K rows.
            const KVT* values_ahead[kTile];
            const KVT* keys_ahead[kTile];
            const int64_t values_count = std::max<int64_t>(0, std::min(kTile, item.token_end - first - kTile));
            const int64_t keys_count = std::max<int64_t>(0, std::min(kTile, item.token_end - first - kSpan));
            if (values_count > 0) tile_row_pointers(cache, item, first + kTile, values_count, values_ahead);
            if (keys_count > 0) tile_row_pointers(key_, item, first + kSpan, keys_count, keys_ahead);
            for (int64_t pair = 0; pair < kTile / 2; ++pair) {
              for (int64_t r = 2 * pair; r < 2 * pair + 2; ++r) {
                if (r < values_count) prefetch_bytes(values_ahead[r], value_bytes);
                if (r < keys_count) prefetch_bytes(keys_ahead[r], key_bytes);
              }
              uint32_t* out = packed + (i * kTile / 2 + pair) * dim_v;
              if (2 * pair >= count) {
                std::fill(out, out + dim_v, 0u);
                continue;
              }
              interleave_rows<KVT>(rows[2 * pair], 2 * pair + 1 < count ? rows[2 * pair + 1] : nullptr, dim_v, out);
            }
          }
          at::native::cpublas::brgemm(heads, dim_v, tiles * kTile, kSpan, dim_v, dim_v, true, s.probabilities.data(),
                                      s.values_packed.data(), s.accumulator.data(), true);
        } else {
          for (int64_t i = 0; i < tiles; ++i) {
            const int64_t first = span + i * kTile, count = std::min(kTile, span + span_count - first);
            if (prefetch) prefetch_rows(cache, dim_v, item, first + 2 * kTile);
            int64_t value_stride = 0;
            const CT* values = tile_rows(cache, shape_.mla ? dim_k : dim_v, item, first, count, s.values,
                                         &value_stride);
            at::native::cpublas::brgemm(heads, dim_v, kTile, kSpan, value_stride, dim_v, true,
                                        s.probabilities.data() + i * kTile, values, s.accumulator.data(), false);
          }
        }
      }
    }
    for (int64_t h = 0; h < heads; ++h) {
      const SoftmaxState& state = s.states[h];
      const float normalizer = online_softmax_normalizer(state, value_scale_);
      for (int64_t d = 0; d < dim_v; ++d) {
        const int64_t index = dpbf16_values_ ? dpbf16_value_index(d) : d;
        partial_out[h * dim_v + d] = s.accumulator[h * dim_v + index] * normalizer;
      }
      partial_lse[h] = online_softmax_lse(state);
    }
  }

 private:
  // The tile's rows [first, first + count) in the compute type, kTile rows in all: in place in
  // the cache when the tile is whole, inside one block and already in the compute type;
  // otherwise gathered into `stage` and padded with zero rows (a row past the sequence is
  // never read: it may hold anything).
  const CT* tile_rows(const CacheView& cache, int64_t dim, const WorkItem& item, int64_t first, int64_t count,
                      std::vector<CT>& stage, int64_t* stride) const {
    const int64_t offset = first % shape_.block_size;
    if constexpr (std::is_same_v<KVT, CT>) {
      if (count == kTile && offset + kTile <= shape_.block_size && cache.stride_token >= dim) {
        const KVT* start;
        tile_row_pointers(cache, item, first, 1, &start);
        *stride = cache.stride_token;
        return start;
      }
    }
    stage.resize(kTile * dim);
    const KVT* rows[kTile];
    tile_row_pointers(cache, item, first, count, rows);
    for (int64_t i = 0; i < count; ++i) convert_row<KVT, CT>(rows[i], dim, &stage[i * dim]);
    std::fill(stage.begin() + count * dim, stage.end(), CT(0.0f));
    *stride = dim;
    return stage.data();
  }

  void vector_tile(const WorkItem& item, int64_t first, int64_t count, Scratch<CT>& s) const {
    const int64_t heads = item.heads, dim_k = shape_.head_dim_k, dim_v = shape_.head_dim_v;
    const KVT* rows[kTile];
    const KVT* ahead[kTile];
    // The next tile's rows, prefetched one row per row read (a burst of a whole tile's
    // prefetches measured slower: the misses queue up).
    const int64_t ahead_first = first + kTile;
    const int64_t ahead_count = std::max<int64_t>(0, std::min(kTile, item.token_end - ahead_first));
    s.values.resize(std::max(dim_k, dim_v));
    tile_row_pointers(key_, item, first, count, rows);
    if (ahead_count > 0) tile_row_pointers(key_, item, ahead_first, ahead_count, ahead);
    const int64_t key_bytes = row_span_bytes(item, key_.stride_head, dim_k);
#if HELIX_HAVE_DPBF16
    if constexpr (std::is_same_v<KVT, BFloat16>) {
      if (dpbf16_) {
        tile_scores_dpbf16(rows, count, s.queries_bf16.data(), heads, group_size_, key_.stride_head, dim_k,
                           s.scores.data(), ahead, ahead_count, key_bytes);
      }
    }
#endif
    if (!dpbf16_) {
      tile_scores_vector<KVT>(rows, count, s.queries.data(), heads, group_size_, key_.stride_head, dim_k,
                              s.values.data(), s.scores.data(), ahead, ahead_count, key_bytes);
    }
    softmax_tile(s, item, first, heads, heads, count, kTile);
    if (!shape_.mla) tile_row_pointers(value_, item, first, count, rows);
    if (ahead_count > 0 && !shape_.mla) tile_row_pointers(value_, item, ahead_first, ahead_count, ahead);
    const int64_t value_head_stride = shape_.mla ? key_.stride_head : value_.stride_head;
    const int64_t value_bytes = row_span_bytes(item, value_head_stride, dim_v);
#if HELIX_HAVE_DPBF16
    if constexpr (std::is_same_v<KVT, BFloat16>) {
      if (dpbf16_values_) {
        tile_values_dpbf16(rows, count, s.probabilities.data(), kTile, heads, group_size_, value_head_stride, dim_v,
                           s.accumulator.data(), ahead, shape_.mla ? 0 : ahead_count, value_bytes);
      }
    }
#endif
    if (!dpbf16_values_) {
      tile_values_vector<KVT>(rows, count, s.probabilities.data(), kTile, heads, group_size_, value_head_stride,
                              dim_v, s.values.data(), s.accumulator.data(), ahead, shape_.mla ? 0 : ahead_count,
                              value_bytes);
    }
  }

  // Asks for `dim` elements of the rows of the tile at `first` ahead of their use: a KV head's
  // rows are Hkv * D elements apart in the cache, a pattern the hardware prefetchers follow
  // badly.
  void prefetch_rows(const CacheView& cache, int64_t dim, const WorkItem& item, int64_t first) const {
    const int64_t count = std::min(first + kTile, item.token_end) - first;
    if (count <= 0) return;
    const KVT* rows[kTile];
    tile_row_pointers(cache, item, first, count, rows);
    const int64_t bytes = row_span_bytes(item, cache.stride_head, dim);
    for (int64_t t = 0; t < count; ++t) prefetch_bytes(rows[t], bytes);
  }

  // Row pointers of tokens [first, first + count) of one KV head: one division per tile (a
  // 64-bit division per row costs more than the row's arithmetic).
  void tile_row_pointers(const CacheView& cache, const WorkItem& item, int64_t first, int64_t count,
                         const KVT** rows) const {
    const int32_t* table = block_table_ + item.batch * block_table_strides_[0];
    const KVT* base = static_cast<const KVT*>(cache.data) + item.kv_head * cache.stride_head;
    int64_t block = first / shape_.block_size, offset = first % shape_.block_size;
    for (int64_t t = 0; t < count; ++t) {
      rows[t] = base + table[block * block_table_strides_[1]] * cache.stride_block + offset * cache.stride_token;
      if (++offset == shape_.block_size) {
        offset = 0;
        ++block;
      }
    }
  }

  // Online softmax over the tile's scores S[t, h] (t < count; later rows are padding): folds
  // them into each head's state, rescales the accumulator, and writes P[h, t] rounded to q's
  // dtype (zero for padding rows).
  // P rows are `stride` long: zero from count on (a GEMM tile past the sequence reads zeros).
  // The online softmax of the item's tokens [first, first + count), scores S[t, h] (row stride
  // `width`), probabilities to P [heads, stride].
  void softmax_tile(Scratch<CT>& s, const WorkItem& item, int64_t first, int64_t heads, int64_t width, int64_t count,
                    int64_t stride) const {
    float* tile_max = s.tile_max.data();
    float* offset = s.offset.data();
    scale_and_max(s.scores.data(), width, heads, count, score_scale_log2_, tile_max);
    {
      // Scores of keys a row's query does not see: -inf (after the scale, whose sign is free),
      // and that row's max over the keys it sees.
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t seen = rows_.keys_seen(item.batch, item.kv_head * group_size_ + item.head_begin + h) - first;
        if (seen >= count) continue;
        tile_max[h] = neg_inf();
        for (int64_t t = 0; t < count; ++t) {
          float& score = s.scores[t * width + h];
          if (t >= seen) score = neg_inf();
          tile_max[h] = std::max(tile_max[h], score);
        }
      }
    }
    for (int64_t h = 0; h < heads; ++h) {
      const float alpha = online_softmax_rescale(s.states[h], tile_max[h]);
      if (alpha != 1.0f) scale_row(&s.accumulator[h * shape_.head_dim_v], shape_.head_dim_v, alpha);
      offset[h] = online_softmax_offset(s.states[h]);
    }
#if defined(__GNUC__)
    if constexpr (kVnni) {
      if (width % 16 == 0 && stride % 16 == 0) {
        uint16_t* rows = reinterpret_cast<uint16_t*>(s.probabilities.data());
        exponentiate_and_round_bf16(s.scores.data(), width, heads, count, offset, s.tile_sum.data(), rows, stride);
        const int64_t written = (count + 15) / 16 * 16;
        for (int64_t h = 0; h < heads; ++h) {
          s.states[h].sum += s.tile_sum[h];
          std::fill(rows + h * stride + written, rows + (h + 1) * stride, uint16_t{0});
        }
        return;
      }
    }
#endif
    float* probabilities = s.scores.data();  // in place: P[t, h] over S[t, h]
    exponentiate_tile(probabilities, width, heads, count, offset, s.tile_sum.data());
    for (int64_t h = 0; h < heads; ++h) {
      s.states[h].sum += s.tile_sum[h];
      CT* row = &s.probabilities[h * stride];
      round_probabilities<QT, CT>(probabilities, width, h, count, row);
      std::fill(row + count, row + stride, CT(0.0f));
    }
  }

  bool vector_;
  bool dpbf16_;  // the vector engine scores bf16 q and K with vdpbf16ps
  bool dpbf16_values_;  // ... and its P x V too (Dv a multiple of 32; accumulator interleaved)
  bool packed_rows_;
  FlashDecodeShape shape_;
  int64_t group_size_;
  const QT* q_;
  QueryRows rows_;
  const int32_t* block_table_;
  int64_t block_table_strides_[2];
  CacheView key_, value_;
  float score_scale_log2_, value_scale_;
};

bool uses_vector_engine(const FlashDecodeShape& shape) {
  return shape.num_q_heads / shape.num_kv_heads <= kVectorMaxGroup;
}

// bf16 operands: B packed in VNNI pairs of rows (AMX), so the reduction dims must be even;
// Dv a multiple of 16 (the widths tested).
bool bf16_gemm_available(const FlashDecodeShape& shape) {
  return at::native::cpublas::could_pack(at::kBFloat16) && shape.head_dim_k % 2 == 0 && shape.head_dim_v % 16 == 0;
}

template <typename QT, typename KVT, typename CT>
void flash_decode_cpu_impl(const at::Tensor& q, const at::Tensor& k_cache, const std::optional<at::Tensor>& v_cache,
                           const at::Tensor& block_table, const FlashDecodeShape& shape, const QueryRows& rows,
                           float softmax_scale, float k_scale, float v_scale, at::Tensor& out, at::Tensor& lse) {
  // shape counts query rows as heads (Q * Hq; see QueryRows): group is Q times the real one.
  const bool vector = !std::is_same_v<CT, BFloat16> && uses_vector_engine(shape);
  const FlashDecodeCpu<QT, KVT, CT> kernel(q, k_cache, v_cache, block_table, shape, rows, softmax_scale, k_scale,
                                           v_scale, vector);
  const int64_t group = shape.num_q_heads / shape.num_kv_heads, dim_v = shape.head_dim_v;
  // Keys a sequence's work items cover: as many as its last query sees (the most).
  const auto length_of = [&](int64_t b) { return rows.visible[b * rows.num_queries + rows.num_queries - 1]; };
  const auto chunks_of = [&](int64_t b) {
    return std::max<int64_t>(1, (length_of(b) + kChunkTokens - 1) / kChunkTokens);
  };
  // Vector items span kv_step KV heads (whole groups, at most kVectorMaxItemHeads query heads),
  // fewer while that would leave under 4 items per thread; GEMM items one KV head's slab.
  int64_t kv_step = 1;
  if (vector) {
    int64_t chunks = 0;
    for (int64_t b = 0; b < shape.batch; ++b) chunks += chunks_of(b);
    kv_step = std::max<int64_t>(1, std::min(shape.num_kv_heads, kVectorMaxItemHeads / group));
    while (kv_step > 1 && chunks * ((shape.num_kv_heads + kv_step - 1) / kv_step) < 4 * at::get_num_threads()) {
      kv_step = (kv_step + 1) / 2;
    }
  }
  const int64_t slab = vector ? kv_step * group : std::min(group, kMaxSlabHeads);

  // Work items; the chunks of one (sequence, KV heads, head slab) are consecutive, starting at
  // first_item[slab_index], so that a merge reads a contiguous run.
  std::vector<WorkItem> items;
  std::vector<int64_t> first_item;
  for (int64_t b = 0; b < shape.batch; ++b) {
    const int64_t length = length_of(b), chunks = chunks_of(b);
    for (int64_t g = 0; g < shape.num_kv_heads; g += kv_step) {
      const int64_t heads = vector ? std::min(kv_step, shape.num_kv_heads - g) * group : group;
      for (int64_t head = 0; head < heads; head += slab) {
        first_item.push_back(static_cast<int64_t>(items.size()));
        for (int64_t c = 0; c < chunks; ++c) {
          items.push_back({b, g, head, std::min(slab, heads - head), c * kChunkTokens,
                           std::min(length, (c + 1) * kChunkTokens)});
        }
      }
    }
  }
  first_item.push_back(static_cast<int64_t>(items.size()));

  std::vector<float> partial_out(items.size() * slab * dim_v), partial_lse(items.size() * slab);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    Scratch<CT> scratch;
    for (int64_t i = begin; i < end; ++i) {
      kernel.run(items[i], scratch, &partial_out[i * slab * dim_v], &partial_lse[i * slab]);
    }
    if constexpr (std::is_same_v<CT, BFloat16>) at::native::cpublas::brgemm_release();
  });

  QT* out_data = out.mutable_data_ptr<QT>();
  float* lse_data = lse.mutable_data_ptr<float>();
  const int64_t num_slabs = static_cast<int64_t>(first_item.size()) - 1;
  at::parallel_for(0, num_slabs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> merged(dim_v);
    for (int64_t index = begin; index < end; ++index) {
      const int64_t first = first_item[index], parts = first_item[index + 1] - first;
      const WorkItem& item = items[first];
      for (int64_t h = 0; h < item.heads; ++h) {
        const auto part_lse = [&](int p) { return partial_lse[(first + p) * slab + h]; };
        const MergeScale total = merge_scale(static_cast<int>(parts), part_lse);
        std::fill(merged.begin(), merged.end(), 0.0f);
        for (int64_t p = 0; p < parts; ++p) {
          const float weight = merge_weight(part_lse(static_cast<int>(p)), total);
          if (weight == 0.0f) continue;
          const float* values = &partial_out[((first + p) * slab + h) * dim_v];
          for (int64_t d = 0; d < dim_v; ++d) merged[d] += weight * values[d];
        }
        const int64_t row = rows.out_row(item.batch, item.kv_head * group + item.head_begin + h);
        for (int64_t d = 0; d < dim_v; ++d) out_data[row * dim_v + d] = static_cast<QT>(merged[d] * total.normalizer);
        lse_data[row] = total.lse;
      }
    }
  });
}

float scale_value(const std::optional<at::Tensor>& scale) {
  return scale.has_value() ? scale->item<float>() : 1.0f;
}


std::tuple<at::Tensor, at::Tensor> flash_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                    const std::optional<at::Tensor>& v_cache,
                                                    const at::Tensor& block_table, const at::Tensor& seq_lens,
                                                    double softmax_scale, int64_t head_dim_v,
                                                    const std::optional<at::Tensor>& k_scale,
                                                    const std::optional<at::Tensor>& v_scale, int64_t num_splits,
                                                    const std::optional<at::Tensor>& query_key_lens) {
  const FlashDecodeShape real_shape = check_flash_decode_args(q, k_cache, v_cache, block_table, seq_lens, softmax_scale,
                                                              head_dim_v, k_scale, v_scale, num_splits, query_key_lens);
  TORCH_CHECK(q.device().is_cpu(), "flash_decode: q must be a CPU tensor here, got ", q.device());
  check_flash_decode_values(block_table, seq_lens, query_key_lens, real_shape);
  auto [out, lse] = allocate_flash_decode_outputs(q, real_shape);
  if (lse.numel() == 0) return {out, lse};
  const std::vector<int64_t> visible = flash_decode_visible_keys(seq_lens, query_key_lens, real_shape);
  const QueryRows rows{real_shape.num_queries, real_shape.num_q_heads / real_shape.num_kv_heads,
                       real_shape.num_q_heads, q.stride(0), real_shape.q_4d ? q.stride(1) : 0, q.stride(-2),
                       visible.data()};
  FlashDecodeShape shape = real_shape;  // query rows as heads
  shape.num_q_heads = real_shape.num_q_heads * real_shape.num_queries;
  const float k_multiplier = scale_value(k_scale), v_multiplier = scale_value(v_scale);
  const auto run = [&](auto q_type, auto kv_type, auto compute_type) {
    flash_decode_cpu_impl<decltype(q_type), decltype(kv_type), decltype(compute_type)>(
        q, k_cache, v_cache, block_table, shape, rows, static_cast<float>(softmax_scale), k_multiplier, v_multiplier,
        out, lse);
  };
  if (q.scalar_type() == at::kBFloat16) {
    if (bf16_gemm_available(shape) && !uses_vector_engine(shape)) {
      shape.kv_fp8 ? run(BFloat16(), uint8_t(), BFloat16()) : run(BFloat16(), BFloat16(), BFloat16());
    } else {
      shape.kv_fp8 ? run(BFloat16(), uint8_t(), float()) : run(BFloat16(), BFloat16(), float());
    }
  } else if (q.scalar_type() == at::kHalf) {
    shape.kv_fp8 ? run(c10::Half(), uint8_t(), float()) : run(c10::Half(), c10::Half(), float());
  } else {
    shape.kv_fp8 ? run(float(), uint8_t(), float()) : run(float(), float(), float());  // probabilities stay fp32
  }
  return {out, lse};
}

}  // namespace
}  // namespace helix

TORCH_LIBRARY_IMPL(helix, CPU, m) { m.impl("flash_decode", &helix::flash_decode_cpu); }
