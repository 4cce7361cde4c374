"""Work-around for an engine bug found by this benchmark (reported; remove once the engine fixes it).

The engine's strong view uses timm's RandAugment 'rand-m9-n2-mstd0.5-inc1'. Its magnitude is drawn per
application from N(9, 0.5²) and clipped to [0, 10]; at magnitude 10, ``PosterizeIncreasing`` asks for
``bits_to_keep = 4 - int(10/10*4) = 0``. Pillow >= 11 raises ``ValueError: bits must be between or
equal to 1 and 8`` for 0 bits (older Pillow, as used by the reference, returned a black image), so a
DataLoader batch of 64 fails with roughly 10 % probability and every adaptation run crashes within a
few dozen steps. This patch restores the reference behaviour (0 bits = all-black image).
"""

from __future__ import annotations

from typing import Any

_PATCHED = False


def patch_timm_posterize() -> None:
    global _PATCHED
    if _PATCHED:
        return
    from PIL import Image, ImageOps
    from timm.data import auto_augment as aa

    def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
        if bits_to_keep >= 8:
            return img
        if bits_to_keep <= 0:  # what Pillow < 11 returned: every bit masked off
            return Image.new(img.mode, img.size)
        return ImageOps.posterize(img, bits_to_keep)

    aa.posterize = posterize
    for name, fn in list(aa.NAME_TO_OP.items()):
        if getattr(fn, "__name__", "") == "posterize":
            aa.NAME_TO_OP[name] = posterize
    _PATCHED = True
