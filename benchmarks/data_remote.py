"""Training input from object storage against local shards, through the same pipeline (TarShardSource ->
TransformedDataset with the training transform -> DataLoader with workers, batches fetched in one round of range
requests), interleaved rounds, medians; and the time one process takes to open a 1,000,000-sample global index.

    python benchmarks/data_remote.py [--images 384] [--rounds 3] [--workers 2] [--sizes 160:128,512:480]

The S3 server is moto's, on 127.0.0.1 in a process of its own (so it competes for the same cores as the loader:
a pessimistic stand-in for a real object store, whose servers are elsewhere). Images are JPEGs of 500x375, the
size of a typical ImageNet photo. The 1,000,000-sample index points into sparse shard files (opening reads
indexes and identities, never image bytes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import loopback
import numpy as np
import torch
from PIL import Image

from bigtransfer.data import TrainTransform, TransformedDataset, collate_skip_bad, open_source
from bigtransfer.data.shard_writer import write_shards
from bigtransfer.data.sources import FileSource
from bigtransfer.data.storage import LocalStorage
from bigtransfer.data.tar_index import INDEX_NAME, ShardIndex, encode_index, sampled_digests
from bigtransfer.machine import cpu_description

SERVER = """
import logging, resource, sys
sys.path.insert(0, sys.argv[1])
import loopback
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
server, endpoint = loopback.start_s3()
print(endpoint, flush=True)
for line in sys.stdin:  # each line asks for the CPU seconds used so far
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(usage.ru_utime + usage.ru_stime, flush=True)
"""


def photos(folder: Path, count: int) -> FileSource:
    """`count` JPEGs of 500x375 made from scikit-image's photographs (rotated, shifted, noised: all different)."""
    from skimage import data as skimage_data

    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(getattr(skimage_data, name)()).convert("RGB").resize((500, 375))
                for name in ("chelsea", "coffee", "astronaut", "rocket")]
    paths, labels = [], []
    for number in range(count):
        picture = np.asarray(pictures[number % 4].rotate(number % 360), dtype=np.int16)
        noisy = np.clip(picture + rng.integers(-12, 12, picture.shape), 0, 255).astype(np.uint8)
        path = folder / f"{number:05d}.jpg"
        Image.fromarray(noisy).save(path, quality=90)
        paths.append(str(path))
        labels.append(number % 4)
    return FileSource(paths, np.array(labels), ["cat", "coffee", "astronaut", "rocket"], str(folder))


def samples_per_second(spec: str, precrop: int, crop: int, workers: int, batch: int) -> float:
    source = open_source(spec, "all")
    data = TransformedDataset(source, TrainTransform(precrop, crop), seed=0, min_size=(precrop, precrop))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [order[start:start + batch] for start in range(0, len(order) - batch + 1, batch)]
    loader = torch.utils.data.DataLoader(data, batch_sampler=batches, collate_fn=collate_skip_bad,
                                         num_workers=workers, prefetch_factor=2 if workers else None)
    iterator = iter(loader)
    next(iterator)  # workers started, first batch in: timed from here
    began, seen = time.perf_counter(), 0
    for images, _, _ in iterator:
        seen += len(images)
    return seen / (time.perf_counter() - began)


def throughput(args, root: Path) -> None:
    (root / "photos").mkdir()
    write_shards(photos(root / "photos", args.images), root / "shards", shard_size=64)
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(Path(__file__).parent)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)

    def server_cpu() -> float:
        server.stdin.write("\n")
        server.stdin.flush()
        return float(server.stdout.readline())

    try:
        endpoint = server.stdout.readline().strip()
        loopback.upload_folder(endpoint, root / "shards", "bench", "shards")
        os.environ.update(loopback.s3_environment(endpoint), BIGTRANSFER_INDEX_CACHE=str(root / "cache"))
        last = len(list((root / "shards").glob("*.tar"))) - 1
        specs = {"local": f"wds:{root}/shards/shard-{{000000..{last:06d}}}.tar",
                 "s3": f"wds:s3://bench/shards/shard-{{000000..{last:06d}}}.tar"}
        for size in args.sizes.split(","):
            precrop, crop = (int(value) for value in size.split(":"))
            rates: dict[str, list[float]] = {name: [] for name in specs}
            server_seconds = []
            for _ in range(args.rounds):  # interleaved: local, s3, local, s3, ...
                for name, spec in specs.items():
                    before = server_cpu()
                    rates[name].append(samples_per_second(spec, precrop, crop, args.workers, args.batch))
                    if name == "s3":
                        server_seconds.append((server_cpu() - before) / args.images * 1000)
            local, remote = (statistics.median(rates[name]) for name in ("local", "s3"))
            print(f"{precrop}->{crop} px, {args.workers} workers, batch {args.batch}: local {local:.1f} samples/s, "
                  f"loopback S3 {remote:.1f} samples/s, ratio {remote / local:.2f} (rounds: "
                  f"{', '.join(f'{a:.0f}/{b:.0f}' for a, b in zip(rates['local'], rates['s3'], strict=True))}); the S3 "
                  f"server used {statistics.median(server_seconds):.1f} ms of CPU per sample on the same cores")
    finally:
        server.kill()


def sparse_index(root: Path, shards: int, per_shard: int) -> str:
    """`shards` sparse shard files and a global index of `per_shard` samples in each; returns the wds: spec."""
    storage, indexes = LocalStorage(), []
    for number in range(shards):
        path = root / f"shard-{number:06d}.tar"
        with open(path, "wb") as handle:
            handle.truncate(per_shard * 1536)
        stat = storage.stat_many([str(path)])[0]
        keys = [f"{number * per_shard + row:09d}".encode() for row in range(per_shard)]
        indexes.append(ShardIndex(path.name, stat, sampled_digests(storage, [str(path)], [stat])[0],
                                  np.arange(per_shard, dtype=np.int64) * 1536 + 512, np.full(per_shard, 1024),
                                  np.arange(per_shard, dtype=np.int64) % 1000, b"".join(keys),
                                  np.cumsum([len(key) for key in keys])))
    (root / INDEX_NAME).write_bytes(encode_index(indexes))
    return f"wds:{root}/shard-{{000000..{shards - 1:06d}}}.tar"


def open_time(spec: str, rounds: int) -> None:
    script = ("import time, sys; began = time.perf_counter(); from bigtransfer.data import open_source; "
              "imported = time.perf_counter(); source = open_source(sys.argv[1], 'all'); "
              "print(len(source), imported - began, time.perf_counter() - imported)")
    imports, opens = [], []
    for _ in range(rounds):
        out = subprocess.run([sys.executable, "-c", script, spec], capture_output=True, text=True, check=True)
        count, imported, opened = out.stdout.split()
        imports.append(float(imported))
        opens.append(float(opened))
    print(f"opening a {int(count):,}-sample global index in a fresh process: median {statistics.median(opens):.2f} s "
          f"(rounds {', '.join(f'{value:.2f}' for value in opens)}), after {statistics.median(imports):.2f} s of "
          "imports (torch)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sizes", default="160:128", help="precrop:crop pairs, e.g. 160:128,512:480")
    parser.add_argument("--index-samples", type=int, default=1_000_000)
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    print(f"{cpu_description()}; {os.cpu_count()} cores; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "index").mkdir()
        open_time(sparse_index(root / "index", 100, args.index_samples // 100), args.rounds)
        if not args.skip_throughput:
            throughput(args, root)


if __name__ == "__main__":
    main()
