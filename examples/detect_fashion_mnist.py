"""Object detection with a BiT backbone: torchvision's Faster R-CNN over BiT stages and a feature pyramid.

The data are real images placed on a canvas: Fashion-MNIST items (classes 0-4) pasted at recorded positions on
96x96 canvases, two or three per image, so every box is known. A few SGD steps of the whole detector run on CPU;
the same code takes `BitModel.from_pretrained(...)` (any checkpoint) as the backbone.

    python examples/detect_fashion_mnist.py --steps 50     # needs apt-get install dataset-fashion-mnist

Expected: the loss falls over the steps (RPN and box-head losses printed), and the detector returns boxes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from bigtransfer import BitConfig, BitModel
from bigtransfer.backbones import fpn_backbone
from bigtransfer.data import load_fashion_mnist

CANVAS, CLASSES = 96, 5


def scenes(count: int, seed: int = 0) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """`count` canvases of 2-3 Fashion-MNIST items (classes 0-4) each, with their boxes and labels."""
    source = load_fashion_mnist(split="train")
    keep = np.flatnonzero(source.labels < CLASSES)
    rng = np.random.default_rng(seed)
    result = []
    for _ in range(count):
        canvas = np.zeros((CANVAS, CANVAS), np.float32)
        boxes, labels = [], []
        for index in rng.choice(keep, size=rng.integers(2, 4), replace=False):
            top, left = rng.integers(0, CANVAS - 28, size=2)
            canvas[top:top + 28, left:left + 28] = np.maximum(canvas[top:top + 28, left:left + 28],
                                                              source.images[index] / 255.0)
            boxes.append([left, top, left + 28, top + 28])
            labels.append(int(source.labels[index]) + 1)  # 0 is the background
        image = torch.from_numpy(canvas)[None].expand(3, -1, -1).clone()
        result.append((image, {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}))
    return result


def detector(backbone: BitModel) -> FasterRCNN:
    """Faster R-CNN over the BiT stages with anchors sized for 28-pixel items; inputs in [-1, 1] as BiT's."""
    anchors = AnchorGenerator(sizes=((16,), (32,), (48,), (64,), (96,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    pooler = MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    return FasterRCNN(fpn_backbone(backbone, out_channels=64), num_classes=CLASSES + 1, min_size=CANVAS,
                      max_size=CANVAS, image_mean=[0.5] * 3, image_std=[0.5] * 3, rpn_anchor_generator=anchors,
                      box_roi_pool=pooler)


def main(steps: int = 50, output: Path = Path("runs/detector"), seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = detector(BitModel(BitConfig.from_variant("tiny")))
    data = scenes(4 * steps, seed)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    losses = []
    model.train()
    for step in range(steps):
        batch = data[4 * step: 4 * step + 4]
        parts = model([image for image, _ in batch], [target for _, target in batch])
        loss = sum(parts.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
        print(f"step {step + 1}: loss {losses[-1]:.3f} " + " ".join(f"{k}={float(v):.3f}" for k, v in parts.items()))
    model.eval()
    with torch.no_grad():
        found = model([image for image, _ in scenes(2, seed + 1)])
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), output / "model.pt")
    return {"losses": losses, "boxes": sum(len(item["boxes"]) for item in found)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--output", type=Path, default=Path("runs/detector"))
    arguments = parser.parse_args()
    print(main(arguments.steps, arguments.output))
