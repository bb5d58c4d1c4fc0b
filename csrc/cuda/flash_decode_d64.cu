// flash_decode kernel instances for GQA/MHA/MQA with head dim 64.
// Config: FlashDecodeConfig<Dk, Dv, warps over heads, warps over Dv, warps over tokens,
// tile tokens, pipeline stages, V shared with K>.
#include "flash_decode_variants.h"

namespace helix {

FlashDecodeVariant flash_decode_variant_d64(bool bf16, bool fp8) {
  return select_flash_decode_variant<FlashDecodeConfig<64, 64, 1, 1, 4, 64, 3, false>>(bf16, fp8);
}

}  // namespace helix
