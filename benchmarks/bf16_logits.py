"""How far bf16 moves `optimize()`'s logits from float32, on real photos (scikit-image's samples).

R50x1 with random weights (a non-trivial head), the photos through BitImageProcessor; prints the largest
|logit difference| relative to the largest logit, and how many photos keep their top-1 class.

    python benchmarks/bf16_logits.py
"""

from __future__ import annotations

import torch
from skimage import data

from bigtransfer import BitConfig, BitForImageClassification, BitImageProcessor, optimize

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "cat")


def main() -> None:
    torch.manual_seed(0)
    model = BitForImageClassification(BitConfig.from_variant("BiT-S-R50x1")).eval()
    with torch.no_grad():
        model.classifier[1].weight.normal_(std=0.01)  # the zero-initialised head would give all-zero logits
    pixels = BitImageProcessor()([getattr(data, name)() for name in PHOTOS], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        expected = model(pixels).logits
        actual = optimize(model, compile=False, dtype="bf16")(pixels).logits
    relative = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1.0)).item()
    same = int((actual.argmax(-1) == expected.argmax(-1)).sum())
    print(f"bf16 vs float32 on {len(PHOTOS)} photos: largest |logit difference| {relative:.2g} of the largest logit "
          f"(clamped at 1); same top-1 class for {same} of {len(PHOTOS)}")


if __name__ == "__main__":
    main()
