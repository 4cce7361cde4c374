"""Block mask generator (spec §2.3), reproducible per (seed, epoch, sample)."""

from __future__ import annotations

import math

import numpy as np

from must_core.errors import InvalidConfigError


class MaskGenerator:
    """Random block masks on a (H/m)×(H/m) grid, upsampled to model-patch tokens.

    Every mask has exactly ``ceil(r·(H/m)²)·(m/p)²`` ones, so all images of a batch mask the same number
    of tokens.
    """

    def __init__(
        self, input_size: int, mask_patch_size: int, model_patch_size: int, mask_ratio: float
    ) -> None:
        if mask_patch_size % model_patch_size != 0:
            raise InvalidConfigError(
                f"mask_patch_size {mask_patch_size} is not a multiple of the model patch size "
                f"{model_patch_size}"
            )
        if input_size % mask_patch_size != 0:
            raise InvalidConfigError(
                f"image size {input_size} is not divisible by mask_patch_size {mask_patch_size}"
            )
        if not 0.0 <= mask_ratio <= 1.0:
            raise InvalidConfigError(f"mask_ratio {mask_ratio} is outside [0, 1]")
        self.rand_size = input_size // mask_patch_size
        self.scale = mask_patch_size // model_patch_size
        self.token_count = self.rand_size**2
        self.mask_count = math.ceil(self.token_count * mask_ratio)
        self.grid = self.rand_size * self.scale

    @property
    def num_masked_tokens(self) -> int:
        return self.mask_count * self.scale**2

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """One [g, g] int64 mask (1 = masked)."""
        idx = rng.permutation(self.token_count)[: self.mask_count]
        flat = np.zeros(self.token_count, dtype=np.int64)
        flat[idx] = 1
        cells = flat.reshape(self.rand_size, self.rand_size)
        return cells.repeat(self.scale, axis=0).repeat(self.scale, axis=1)
