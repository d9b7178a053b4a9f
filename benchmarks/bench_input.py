"""Images/s of the training input pipeline alone (decode, squash-resize, random crop, flip, normalise, collate)
from an image folder, WebDataset shards and a Parquet file holding the same JPEGs, against the training step's
images/s of `tiny` and R50x1 at the same resolution: is data loading or compute the bottleneck?

    python benchmarks/bench_input.py [--images 256] [--workers 0,2] [--json input.json]

The photos are scikit-image's, squashed to 500x375 JPEGs (ImageNet's typical size), so the HyperRule trains at
512 / 480 px; `--small` uses 32x32 crops of them instead (CIFAR's size, HyperRule 160 / 128). The data loader
runs as `finetune` runs it (`--workers` processes, batches of 32); the training step is forward + backward + SGD
on random pixels at that resolution. The machine (CPU model, flags, cores, torch) is recorded with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bigtransfer import BitConfig, BitForImageClassification, hyperrule
from bigtransfer.data import TrainTransform, TransformedDataset, collate_skip_bad, open_source
from bigtransfer.data.shard_writer import write_shards
from bigtransfer.machine import cpu_description, usable_cpus

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry", "cat")


def machine() -> dict:
    return dict(cpu_description(), threads=torch.get_num_threads(), torch=torch.__version__)


def make_data(root: Path, count: int, small: bool) -> dict[str, str]:
    import datasets
    import skimage.data

    bases = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]
    size = (32, 32) if small else (500, 375)
    for index in range(count):
        image = bases[index % len(bases)].rotate(7 * index).resize(size)
        folder = root / "photos" / f"class{index % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:05d}.jpg", quality=90)
    source = open_source(str(root / "photos"), "all")
    write_shards(source, root / "shards", shard_size=64)  # what `bigtransfer shard --shard-size 64` writes
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=source.classes)})
    rows = {"image": [{"bytes": Path(source.path(i)).read_bytes(), "path": None} for i in range(len(source))],
            "label": source.labels.tolist()}
    (root / "parquet").mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(root / "parquet" / "train.parquet"))
    shards = len(list((root / "shards").glob("*.tar")))
    return {"folder": str(root / "photos"), "wds": f"wds:{root}/shards/shard-{{000000..{shards - 1:06d}}}.tar",
            "hf": f"hf:{root / 'parquet'}"}


def pipeline_rate(spec: str, precrop: int, crop: int, workers: int) -> float:
    source = open_source(spec, "all")
    dataset = TransformedDataset(source, TrainTransform(precrop, crop), seed=0, min_size=(precrop, precrop))
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, num_workers=workers, collate_fn=collate_skip_bad,
                                         shuffle=False, persistent_workers=False)
    started = time.perf_counter()
    seen = sum(len(batch[1]) for batch in loader)
    return seen / (time.perf_counter() - started)


def step_rate(variant: str, crop: int, batch: int = 16, steps: int = 3) -> float:
    model = BitForImageClassification(BitConfig.from_variant(variant, num_labels=4)).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    images, labels = torch.randn(batch, 3, crop, crop), torch.randint(0, 4, (batch,))
    timings = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(images).logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        timings.append(time.perf_counter() - started)
    return batch / float(np.median(timings[1:]))  # the first step warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--workers", default="0,2", help="data loader processes to try (comma-separated)")
    parser.add_argument("--small", action="store_true", help="32x32 images (HyperRule 160 / 128)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    precrop, crop = hyperrule.resolution(*((32, 32) if args.small else (375, 500)))
    with tempfile.TemporaryDirectory() as temporary:
        specs = make_data(Path(temporary), args.images, args.small)
        pipeline = {f"{kind}, {workers} workers": pipeline_rate(spec, precrop, crop, workers)
                    for workers in map(int, args.workers.split(",")) for kind, spec in specs.items()}
    steps = {variant: step_rate(variant, crop) for variant in ("tiny", "BiT-M-R50x1")}
    record = dict(machine=machine(), resolution=[precrop, crop], images=args.images, pipeline=pipeline, step=steps)
    print(json.dumps(record["machine"]))
    print(f"input pipeline, {precrop} -> {crop} px (images/s):")
    for name, rate in pipeline.items():
        print(f"  {name:24s} {rate:8.1f}  = {rate / steps['tiny']:5.1f}x tiny's step, "
              f"{rate / steps['BiT-M-R50x1']:6.1f}x R50x1's")
    for variant, rate in steps.items():
        print(f"training step {variant:12s} {rate:8.1f} images/s (batch 16, fp32)")
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(usable_cpus()))
    main()
