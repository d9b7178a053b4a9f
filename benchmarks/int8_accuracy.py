"""What int8 costs in accuracy: a classifier's top-1 in float32 and after `bigtransfer.quantize`, and how often the
two agree, on held-out images of a data spec (calibrated on others of the same spec).

    bigtransfer finetune --model tiny --data fashion-mnist --classes 5-9 --output runs/fm64 --max-steps 150 \\
        --batch-size 64 --resize 72 --crop 64 --base-lr 0.01
    python benchmarks/int8_accuracy.py --model runs/fm64/model --data fashion-mnist --classes 5-9

Calibration images are the first `--calibration-images` of a seeded shuffle of the published test split (or the
whole spec), the check images the next `--check-images`; labels must be the model's classes, in order.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from bigtransfer.data import open_source, whole_split
from bigtransfer.export import onnx_session
from bigtransfer.inference import load_for_inference
from bigtransfer.machine import cpu_description
from bigtransfer.quantize import quantize


def class_indices(text: str) -> list[int]:
    """`5-9` -> [5, 6, 7, 8, 9], `1,3` -> [1, 3]: the indices `bigtransfer finetune --classes` takes."""
    return [index for part in text.split(",") for low, _, high in [part.partition("-")]
            for index in range(int(low), int(high or low) + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--classes", type=class_indices)
    parser.add_argument("--calibration-images", type=int, default=64)
    parser.add_argument("--check-images", type=int, default=2000)
    args = parser.parse_args()
    model, processor = load_for_inference(args.model, "cpu")
    source = open_source(args.data, whole_split(args.data, "test"), classes=args.classes)
    order = np.random.default_rng(0).permutation(len(source))
    calibration, check = order[: args.calibration_images], order[args.calibration_images :][: args.check_images]

    def pixels(indices) -> np.ndarray:
        return processor([source[int(index)][0] for index in indices], return_tensors="np")["pixel_values"]

    check_pixels, labels = pixels(check), source.labels[check]
    with tempfile.TemporaryDirectory() as directory:
        report = quantize(model, Path(directory) / "int8.onnx", pixels(calibration), check_pixels)
        session = onnx_session(Path(directory) / "int8.onnx")
        name = session.get_inputs()[0].name
        int8 = np.concatenate([session.run(None, {name: check_pixels[i : i + 64]})[0].argmax(1)
                               for i in range(0, len(check_pixels), 64)])
    with torch.no_grad():
        float32 = model(torch.from_numpy(check_pixels)).logits.argmax(1).numpy()
    result = dict(cpu=cpu_description(), calibration_images=len(calibration), check_images=len(check),
                  float32_top1=float((float32 == labels).mean()), int8_top1=float((int8 == labels).mean()),
                  agreement=report.top1_agreement)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
