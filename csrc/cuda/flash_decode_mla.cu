// flash_decode kernel instances for MLA (Dk 576, V = first 512 dims; 64 heads per CTA in 4x2 warps).
// Config: FlashDecodeConfig<Dk, Dv, warps over heads, warps over Dv, warps over tokens,
// tile tokens, pipeline stages, V shared with K>.
#include "flash_decode_variants.h"

namespace helix {

FlashDecodeVariant flash_decode_variant_mla(bool bf16, bool fp8) {
  return select_flash_decode_variant<FlashDecodeConfig<576, 512, 4, 2, 1, 32, 3, true>>(bf16, fp8);
}

}  // namespace helix
