"""Images/s of bigtransfer's BitImageProcessor against transformers' on real photos.

The photos shipped with scikit-image are decoded once up front (decoding is not part of any
processor); then each round times every contender on the whole set, contenders interleaved
(A B C A B C ...) after warm-up, and the median round is reported. Two modes: one image per
call (a data-loader worker) and the whole set in one call (a batch).

    python benchmarks/bench_processor.py [--rounds 15] [--threads N] [--json results.json]

The machine's 1-minute load average is recorded: torch's threaded kernels (used by transformers'
torchvision processor for everything, and by ours for the resize) slow down sharply when the CPU
is oversubscribed, so compare runs made under similar load.

Contenders: `bigtransfer` (this library), `transformers` (BitImageProcessor, in transformers 5
the torchvision-backed "fast" one) and `transformers-pil` (BitImageProcessorPil, the slow
PIL/NumPy one; in transformers 4 this was BitImageProcessor itself and the fast one was
BitImageProcessorFast). All run with default settings and return_tensors="pt".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import PIL.Image
import torch

from bigtransfer.processing import BitImageProcessor

PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "camera.png",
    "logo.png",
)


def load_photos() -> list[PIL.Image.Image]:
    import skimage

    data_dir = os.path.join(os.path.dirname(skimage.__file__), "data")
    images = []
    for name in PHOTOS:
        image = PIL.Image.open(os.path.join(data_dir, name))
        image.load()
        images.append(image)
    return images


def contenders() -> dict[str, Callable]:
    found = {"bigtransfer": BitImageProcessor()}
    try:
        import transformers
    except ImportError:
        return found
    # transformers 5: BitImageProcessor (torchvision) + BitImageProcessorPil; 4: BitImageProcessor (PIL)
    # + BitImageProcessorFast (torchvision). In 5, BitImageProcessorFast is only a deprecated alias.
    names = [("transformers", "BitImageProcessor")]
    if hasattr(transformers, "BitImageProcessorPil"):
        names.append(("transformers-pil", "BitImageProcessorPil"))
    else:
        names.append(("transformers-fast", "BitImageProcessorFast"))
    for label, name in names:
        try:
            found[label] = getattr(transformers, name)()
        except Exception:  # e.g. the fast one without torchvision
            continue
    return found


def time_round(processor: Callable, images: list, batched: bool) -> float:
    start = time.perf_counter()
    if batched:
        processor(images, return_tensors="pt")
    else:
        for image in images:
            processor(image, return_tensors="pt")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per mode (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds per contender first")
    parser.add_argument("--json", metavar="PATH", help="write the results there")
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads for every contender (default: torch's default)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    images = load_photos()
    processors = contenders()
    results: dict = {
        "photos": list(PHOTOS),
        "sizes": [image.size for image in images],
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "versions": {"torch": torch.__version__, "pillow": PIL.__version__},
        "modes": {},
    }
    try:
        import transformers

        results["versions"]["transformers"] = transformers.__version__
    except ImportError:
        pass

    for mode, batched in (("per_image", False), ("batch", True)):
        for processor in processors.values():
            for _ in range(args.warmup):
                time_round(processor, images, batched)
        times: dict[str, list[float]] = {name: [] for name in processors}
        for _ in range(args.rounds):
            for name, processor in processors.items():  # interleaved: A B C A B C ...
                times[name].append(time_round(processor, images, batched))
        rates = {name: len(images) / statistics.median(t) for name, t in times.items()}
        ours = rates["bigtransfer"]
        results["modes"][mode] = {
            "images_per_s": rates,
            "speedup_vs": {name: ours / rate for name, rate in rates.items() if name != "bigtransfer"},
        }
        print(
            f"{mode} ({len(images)} photos, median of {args.rounds} rounds, {torch.get_num_threads()} threads):"
        )
        for name, rate in rates.items():
            ratio = "" if name == "bigtransfer" else f"   bigtransfer is {ours / rate:.2f}x faster"
            print(f"  {name:18s} {rate:8.1f} images/s{ratio}")

    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(results, file, indent=2)
    return results


if __name__ == "__main__":
    main()
