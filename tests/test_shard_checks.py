"""Shards and Arrow data tried as a hostile user would: every index checked against what it indexes (relabelled,
swapped and lying files), every reader bounded before it allocates (brace bombs, huge labels, giant row groups),
nothing silent (truncated headers, link members, float labels) and every message naming the file, member or row."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
from PIL import Image

from bigtransfer.cli import main
from bigtransfer.data import EvalTransform, TransformedDataset, open_source
from conftest import CHILD_PEAK_MB

pytest.importorskip("webdataset")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(autouse=True)
def _index_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGTRANSFER_INDEX_CACHE", str(tmp_path / "index-cache"))


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 255 - value, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path, members) -> None:
    """A tar of (name, bytes) members, or (name, TarInfo) for links."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            if isinstance(data, tarfile.TarInfo):
                tar.addfile(data)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def sample_members(labels, start=0, shade=0):
    return [member for number, label in enumerate(labels, start) for member in
            ((f"{number:04d}.png", png((number * 37 + shade) % 256)), (f"{number:04d}.cls", str(label).encode()))]


def tar_labels(path) -> list[int]:
    """The peer's reading: webdataset's own tar iterator, in member order."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    with open(path, "rb") as stream:
        samples = list(group_by_keys(tar_file_expander([{"stream": stream, "url": str(path)}])))
    return [int(sample["cls"]) for sample in samples]


@pytest.fixture
def shard_set(tmp_path):
    """`bigtransfer shard` output: a folder of 24 PNGs in 3 classes, in 3 shards of 8."""
    out, photos = tmp_path / "shards", tmp_path / "photos"
    for number in range(24):
        (photos / f"class{number % 3}").mkdir(parents=True, exist_ok=True)
        (photos / f"class{number % 3}" / f"{number:02d}.png").write_bytes(png(number * 10))
    assert main(["shard", "--data", str(photos), "--output", str(out), "--shard-size", "8", "--no-progress"]) == 0
    info = json.loads((out / "_info.json").read_text())
    keep = info["splits"]["train"]["filenames"]
    return out, f"wds:{out}/shard-{{000000..{len(keep) - 1:06d}}}.tar", len(keep)


def relabel_in_place(shard, key: str, new: int) -> int:
    """Rewrite the text of one .cls member without changing the file's size; returns the old label."""
    with tarfile.open(shard) as tar:
        member = tar.getmember(f"{key}.cls")
        old = tar.extractfile(member).read()
    text = str(new).encode().rjust(len(old))
    with open(shard, "r+b") as handle:
        handle.seek(member.offset_data)
        handle.write(text)
    return int(old)


def test_a_shard_relabelled_in_place_is_read_again_and_changes_the_fingerprint(shard_set):
    out, pattern, _ = shard_set
    before = open_source(pattern, "all")
    shard = out / "shard-000001.tar"
    key = before.path(9).rsplit("#", 1)[1]
    old = relabel_in_place(shard, key, 2 if before.labels[9] != 2 else 1)
    assert old == before.labels[9]
    with pytest.warns(UserWarning, match=r"shard-000001.tar: 1 shard\(s\) changed since .*_index.npz was written"):
        after = open_source(pattern, "all")
    assert after.labels[8:16].tolist() == tar_labels(shard)  # webdataset reads the new label; so does this package
    assert after.labels[9] != old and np.array_equal(np.delete(after.labels, 9), np.delete(before.labels, 9))
    assert after.fingerprint() != before.fingerprint()  # what --resume compares: relabelled data is refused


def test_a_same_size_swap_with_the_old_modification_time_is_caught(tmp_path):
    """Two hand-made shards of equal size; the second copied over the first with the first's mtime restored."""
    first, second = tmp_path / "s-0.tar", tmp_path / "s-1.tar"
    write_tar(first, sample_members([0, 1, 0, 1]))
    write_tar(second, sample_members([1, 1, 0, 0], start=4, shade=100))
    assert first.stat().st_size == second.stat().st_size
    pattern = f"wds:{tmp_path}/s-{{0..1}}.tar"
    assert open_source(pattern, "all").labels.tolist() == [0, 1, 0, 1, 1, 1, 0, 0]  # indexed into the cache
    stamp = first.stat().st_mtime_ns
    shutil.copyfile(second, first)
    os.utime(first, ns=(stamp, stamp))
    swapped = open_source(pattern, "all")
    assert swapped.labels[:4].tolist() == tar_labels(first) == [1, 1, 0, 0]
    assert swapped.path(0).endswith("s-0.tar#0004")


def test_an_index_claiming_more_samples_than_its_shard_is_refused(shard_set):
    from bigtransfer.data.tar_index import decode_index, encode_index

    out, pattern, _ = shard_set
    indexes = decode_index((out / "_index.npz").read_bytes(), "index")
    lying = indexes[0]
    repeat = 10_000 // len(lying) + 1
    lying.offset, lying.size, lying.label = (np.tile(values, repeat) for values in (lying.offset, lying.size,
                                                                                   lying.label))
    lying.key_end = np.cumsum(np.tile(np.diff(np.concatenate([[0], lying.key_end])), repeat))
    lying.key_blob = lying.key_blob * repeat
    (out / "_index.npz").write_bytes(encode_index(indexes))
    with pytest.raises(ValueError, match=r"_index.npz: its entry for .*shard-000000.tar \(10,008 samples\) does not "
                                         r"fit the [\d,]+-byte shard"):
        open_source(pattern, "all")


def test_a_shard_count_other_than_info_json_records_is_refused(shard_set):
    out, pattern, _ = shard_set
    info = json.loads((out / "_info.json").read_text())
    info["splits"]["train"]["shard_lengths"][2] = 7
    (out / "_info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"shard-000002.tar holds 8 samples but .*_info.json records 7"):
        open_source(pattern, "all")


def test_overwrite_with_fewer_shards_leaves_no_old_shard(shard_set):
    out, _, count = shard_set
    (out / "notes.txt").write_text("mine")
    assert count == 3
    assert main(["shard", "--data", str(out.parent / "photos"), "--output", str(out), "--shard-size", "24",
                 "--overwrite", "--no-progress"]) == 0
    assert sorted(path.name for path in out.iterdir()) == ["_index.npz", "_info.json", "notes.txt",
                                                          "shard-000000.tar"]
    assert len(open_source(f"wds:{out}/shard-*.tar", "all")) == 24


def test_a_brace_bomb_is_refused_before_expanding():
    with pytest.raises(ValueError, match=r"names 1,000,000,000 shards, more than the 1,000,000"):
        open_source("wds:x/s{0..999}{0..999}{0..999}.tar", "all")
    with pytest.raises(ValueError, match=r"names 1,000,000,000 shards"):
        open_source("wds:x/s{000000000..999999999}.tar", "all")


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("0000.cls", b"99999999999", r"holds '99999999999', expected an integer: a class index in \[0, 1,000,000\)"),
    ("0000.cls", b"0.7", r"holds '0.7', expected an integer"),
    ("0000.cls", b"1.7", r"holds '1.7', expected an integer"),
    ("0000.json", b'{"label": 1.7}', r"holds '\{\"label\": 1.7\}', expected a JSON object with an integer"),
    ("0000.json", b'{"label": true}', r"holds '\{\"label\": true\}', expected a JSON object"),
    ("0000.json", b'{"label": 100000000000}', r"holds .*, expected a JSON object with an integer \"label\": a class index"),
])
def test_labels_that_are_no_class_index_are_refused_naming_the_member(tmp_path, name, text, expected):
    write_tar(tmp_path / "bad.tar", [("0000.png", png(1)), (name, text)])
    with pytest.raises(ValueError, match=rf"bad.tar: label member {name} {expected}"):
        open_source(f"wds:{tmp_path / 'bad.tar'}", "all")


def _parquet(path, labels, label_type=None, rows_per_group=None):
    images = pa.array([{"bytes": png(value % 256), "path": None} for value in range(len(labels))],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": images, "label": pa.array(labels, label_type)}), path,
                   row_group_size=rows_per_group)


@pytest.mark.parametrize(("labels", "kind", "expected"), [
    ([0, 1, 100_000_000_000], pa.int64(), r"row 2 holds 100000000000, expected a class index in \[0, 1,000,000\)"),
    ([0.0, 0.7, 1.0], pa.float64(), r"row 1 holds 0.7, expected an integer class index"),
    ([True, False, True], pa.bool_(), r"holds bool values, expected integer class indices"),
    (["1", "1.7", "0"], pa.string(), r"holds string values, expected integer class indices"),
    ([0, None, 1], pa.int64(), r"row 1 has no label"),
])
def test_arrow_labels_that_are_no_class_index_are_refused_naming_the_row(tmp_path, labels, kind, expected):
    _parquet(tmp_path / "train.parquet", labels, kind)
    with pytest.raises(ValueError, match=rf"train.parquet: column 'label'.*{expected}"):
        open_source(f"hf:{tmp_path / 'train.parquet'}", "all")


def test_integral_float_labels_are_read_as_the_peer_reads_them(tmp_path):
    _parquet(tmp_path / "train.parquet", [0.0, 2.0, 1.0], pa.float32(), rows_per_group=2)
    source = open_source(f"hf:{tmp_path / 'train.parquet'}", "all")
    assert source.labels.tolist() == pq.read_table(tmp_path / "train.parquet")["label"].to_pylist()
    assert np.array_equal(np.asarray(source[2][0]), np.asarray(Image.open(io.BytesIO(png(2))).convert("RGB")))


def test_a_truncated_header_is_reported_and_skipped_only_when_asked(tmp_path):
    shard = tmp_path / "cut.tar"
    write_tar(shard, sample_members([0, 1, 1, 0]))
    with tarfile.open(shard) as tar:
        third = tar.getmember("0002.png").offset  # the third sample's header
    shard.write_bytes(shard.read_bytes()[:third + 300])
    source = open_source(f"wds:{shard}", "all")
    assert source.labels.tolist() == tar_labels(tmp_path / "cut.tar")[:2] == [0, 1]
    transform = EvalTransform(8)
    with pytest.raises(ValueError, match=rf"cut.tar: the tar header at byte {third:,} is truncated"):
        TransformedDataset(source, transform)
    with pytest.warns(UserWarning, match=r"skipped \(on_bad_image='skip'\): .*cut.tar: the tar header at byte"):
        skipping = TransformedDataset(source, transform, on_bad_image="skip")
    assert [label for _, label in (skipping[0], skipping[1])] == [0, 1]


def test_a_hard_link_member_is_reported_by_name(tmp_path):
    link = tarfile.TarInfo("0001.png")
    link.type, link.linkname = tarfile.LNKTYPE, "0000.png"
    write_tar(tmp_path / "linked.tar", [*sample_members([0]), ("0001.png", link), ("0001.cls", b"1"),
                                        *sample_members([1], start=2)])
    source = open_source(f"wds:{tmp_path / 'linked.tar'}", "all")
    assert source.labels.tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match=r"cannot read image .*linked.tar#0001: a link member"):
        TransformedDataset(source, EvalTransform(8))[1]
    skipped = TransformedDataset(source, EvalTransform(8), on_bad_image="skip")[1]
    assert skipped.path.endswith("linked.tar#0001") and "link member" in skipped.reason
    with pytest.raises(ValueError, match=r"cannot read image .*linked.tar#0001: a link member"):
        source[1]


@pytest.mark.parametrize(("target", "content", "expected"), [
    ("_index.npz", b"PK\x03\x04 not a zip", r"_index.npz: not a readable shard index"),
    ("_info.json", b'{"splits": []}', r"_info.json: splits must be an object of splits"),
    ("_info.json", b'{"class_names": [1e300]}', r"_info.json: class_names must be a list of 1 to 1,000,000 strings"),
])
def test_damaged_index_files_are_named_by_the_cli(shard_set, capsys, target, content, expected):
    out, pattern, _ = shard_set
    (out / target).write_bytes(content)
    assert main(["shard", "--data", pattern, "--output", str(out.parent / "again"), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "unexpected" not in error and len(error.splitlines()) == 1
    assert error.startswith("bigtransfer shard: error: ") and __import__("re").search(expected, error), error


def test_a_cut_or_mistyped_global_index_is_named(shard_set):
    out, pattern, _ = shard_set
    whole = (out / "_index.npz").read_bytes()
    (out / "_index.npz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"_index.npz: not a readable shard index"):
        open_source(pattern, "all")
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.zeros(3, np.float32) for name in ("offset", "size", "label", "key_blob", "key_end",
                                                                    "meta")})
    (out / "_index.npz").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match=r"_index.npz: not a readable shard index \(array offset is float32\[3\], "
                                         r"expected int64"):
        open_source(pattern, "all")


def test_a_file_that_is_no_parquet_is_named(tmp_path, capsys):
    (tmp_path / "train.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"train.parquet: not a readable Parquet file \(reading its footer: .*"
                                         r"magic bytes"):
        open_source(f"hf:{tmp_path / 'train.parquet'}", "all")


@pytest.mark.slow
def test_a_giant_row_group_is_read_in_slices_without_a_cache_copy(tmp_path):
    """6,000 rows of 100 KB in one row group (600 MB of cells, 100 KB on disk), in data pages of 16 rows: opening and
    reading rows holds a slice, not the row group, and writes nothing into the datasets cache. (A reader cannot hold
    less than one decompressed data page: with pyarrow's default `write_batch_size` of 1,024 rows, pages of these
    cells hold about 200 MB, and reading this file so written peaked 349 MB above the imports.)"""
    images = pa.array([{"bytes": png(number % 256) + number.to_bytes(4, "big") + bytes(100_000), "path": None}
                       for number in range(6000)], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": images, "label": pa.array([n % 3 for n in range(6000)])}),
                   tmp_path / "giant.parquet", row_group_size=6000, compression="zstd", write_batch_size=16)
    del images
    assert pq.ParquetFile(tmp_path / "giant.parquet").metadata.row_group(0).total_byte_size > 600_000_000
    script = textwrap.dedent(f"""
        import datasets
        from bigtransfer.data import open_source
        before = {CHILD_PEAK_MB}
        source = open_source("hf:{tmp_path / 'giant.parquet'}", "all")
        images = [source[index][0].size for index in (5, 6, 4000)]
        print(len(source), images, int({CHILD_PEAK_MB} - before))
    """)
    cache = tmp_path / "hf-cache"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_DATASETS_CACHE=str(cache), HF_HOME=str(cache)))
    assert done.returncode == 0, done.stderr[-2000:]
    count, sizes, grown_mb = done.stdout.split(" ", 1)[0], done.stdout[done.stdout.index("["):done.stdout.index("]") + 1], int(done.stdout.split()[-1])
    assert count == "6000" and sizes == "[(8, 8), (8, 8), (8, 8)]"
    assert grown_mb < 100, f"peak memory grew by {grown_mb} MB"  # 18 MB measured
    assert not cache.exists() or not any(path.is_file() for path in cache.rglob("*"))


def test_running_out_of_memory_while_opening_names_what_was_read(tmp_path):
    """A 1,000,000-sample global index opened under an address-space limit too small for it."""
    from bigtransfer.data.storage import LocalStorage
    from bigtransfer.data.tar_index import INDEX_NAME, ShardIndex, encode_index, sampled_digests

    storage, samples = LocalStorage(), 1_000_000
    path = tmp_path / "shard-0.tar"
    with open(path, "wb") as handle:
        handle.truncate(samples * 1536)  # sparse: room for the samples the index lists
    stat = storage.stat_many([str(path)])[0]
    keys = np.arange(samples).astype("S9")
    index = ShardIndex(path.name, stat, sampled_digests(storage, [str(path)], [stat])[0],
                       np.arange(samples, dtype=np.int64) * 1536 + 512, np.full(samples, 1024), np.zeros(samples,
                       np.int64), keys.tobytes(), np.arange(1, samples + 1, dtype=np.int64) * 9)
    (tmp_path / INDEX_NAME).write_bytes(encode_index([index]))
    script = textwrap.dedent(f"""
        import resource, sys
        from bigtransfer.cli import main
        size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (size + (40 << 20), resource.RLIM_INFINITY))
        sys.exit(main(["shard", "--data", "wds:{tmp_path}/shard-0.tar", "--output", "{tmp_path}/out"]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "out of memory while reading the shards' indexes" in done.stderr and "shard-0.tar" in done.stderr


def test_parquet_converted_only_into_the_cache_the_user_names(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    _parquet(tmp_path / "train.parquet", [0, 2, 1, 1], pa.int64(), rows_per_group=3)
    direct = open_source(f"hf:{tmp_path / 'train.parquet'}", "all")
    cached = open_source(f"hf:{tmp_path / 'train.parquet'}#cache={tmp_path / 'mine'}", "all")
    assert cached.labels.tolist() == direct.labels.tolist() == [0, 2, 1, 1]
    assert all(cached.stored_bytes(index) == direct.stored_bytes(index) == png(index) for index in range(4))
    assert any(path.suffix == ".arrow" for path in (tmp_path / "mine").rglob("*"))
    assert not any(path.is_file() for path in (tmp_path / "hf-cache").rglob("*"))


def test_an_index_cache_that_cannot_be_written_is_named_and_done_without(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("BIGTRANSFER_INDEX_CACHE", str(tmp_path / "a-file" / "cache"))
    write_tar(tmp_path / "s.tar", sample_members([1, 0]))
    with pytest.warns(UserWarning, match=r"the index cache .*a-file/cache cannot be written .*; indexing .*s.tar"):
        assert open_source(f"wds:{tmp_path / 's.tar'}", "all").labels.tolist() == tar_labels(tmp_path / "s.tar")
