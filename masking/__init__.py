"""SimMIM mask generators (numpy only): random and BEiT-style block-wise masking."""

from masking.generators import (KINDS, BlockMaskGenerator, MaskGenerator, build_mask_generator, check_mask_patch_size,
                                mask_patch_sizes)

__all__ = ["KINDS", "MaskGenerator", "BlockMaskGenerator", "build_mask_generator", "check_mask_patch_size",
           "mask_patch_sizes"]
