// flash_decode kernel instances for GQA/MHA/MQA with head dim 256 (two stages: 64-token tiles of 256-wide K and V).
// Config: FlashDecodeConfig<Dk, Dv, warps over heads, warps over Dv, warps over tokens,
// tile tokens, pipeline stages, V shared with K>.
#include "flash_decode_variants.h"

namespace helix {

FlashDecodeVariant flash_decode_variant_d256(bool bf16, bool fp8) {
  return select_flash_decode_variant<FlashDecodeConfig<256, 256, 1, 1, 4, 64, 2, false>>(bf16, fp8);
}

}  // namespace helix
