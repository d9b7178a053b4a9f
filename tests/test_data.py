"""Data sources, splits, few-shot sampling, transforms and the reproducible Dataset."""

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from bigtransfer.data import (
    ACCEPTED_SPECS,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    BadImageError,
    Batch,
    CsvSource,
    EpochSampler,
    EvalTransform,
    ImageFolderSource,
    SkippedSample,
    TrainTransform,
    TransformedDataset,
    collate_skip_bad,
    few_shot_indices,
    load_cifar,
    load_digits,
    load_fashion_mnist,
    open_source,
    read_idx,
    safe_load,
    select_classes,
    stratified_split,
)

skimage_data = pytest.importorskip("skimage.data")

# ---------------------------------------------------------------- fixtures


def _small(array: np.ndarray, size=(48, 40)) -> Image.Image:
    return Image.fromarray(array).resize(size)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """root/<class>/<images>: real photos in several formats, plus files that must be ignored."""
    root = tmp_path_factory.mktemp("photos")
    cat, coffee, astronaut = skimage_data.chelsea(), skimage_data.coffee(), skimage_data.astronaut()
    layout = {
        "cat": [
            ("chelsea.png", cat),
            ("chelsea_flipped.JPG", cat[:, ::-1]),
            ("nested/chelsea_crop.bmp", cat[50:250]),
        ],
        "coffee": [("coffee.jpeg", coffee), ("coffee.TIFF", coffee[::-1]), ("coffee.webp", coffee[:, 100:])],
        "astronaut": [("astronaut.gif", astronaut), ("camera_gray.png", skimage_data.camera())],
        "logo": [("logo_rgba.png", skimage_data.logo()), ("astronaut.tif", astronaut[100:300])],
    }
    for class_name, files in layout.items():
        for name, array in files:
            path = root / class_name / name
            path.parent.mkdir(parents=True, exist_ok=True)
            _small(array).save(path)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".hidden.png").write_bytes(b"ignored")
    (root / ".cache").mkdir()
    return root


def _digit_png_folder(root: Path, per_class: int = 6) -> Path:
    digits = load_digits("train")
    for label in range(3):
        folder = root / f"digit{label}"
        folder.mkdir(parents=True)
        for k, index in enumerate(np.flatnonzero(digits.labels == label)[:per_class]):
            Image.fromarray(digits.images[index]).save(folder / f"{k}.png")
    return root


# ---------------------------------------------------------------- image folder


def test_image_folder_classes_labels_and_images(photo_folder):
    source = ImageFolderSource(photo_folder, val_fraction=0)
    assert source.classes == ["astronaut", "cat", "coffee", "logo"]
    assert len(source) == 10
    assert source.labels.dtype == np.int64
    assert np.bincount(source.labels).tolist() == [2, 3, 3, 2]
    for i in range(len(source)):
        image, label = source[i]
        assert image.mode == "RGB" and image.size == (48, 40)
        assert label == source.labels[i]
        path = Path(source.path(i))
        assert path.is_file() and path.is_relative_to(photo_folder)
        assert path.relative_to(photo_folder).parts[0] == source.classes[label]
    names = {Path(source.path(i)).name for i in range(len(source))}
    assert {"chelsea_flipped.JPG", "coffee.TIFF", "chelsea_crop.bmp", "camera_gray.png"} <= names
    assert "notes.txt" not in names and ".hidden.png" not in names
    assert source.image_size() == (40, 48)


def test_image_folder_seeded_stratified_split(tmp_path):
    root = _digit_png_folder(tmp_path / "digits")
    train = ImageFolderSource(root, "train", val_fraction=0.5, seed=3)
    test = ImageFolderSource(root, "test", val_fraction=0.5, seed=3)
    assert len(train) == len(test) == 9
    assert np.bincount(train.labels).tolist() == [3, 3, 3]
    assert np.bincount(test.labels).tolist() == [3, 3, 3]
    train_paths = {train.path(i) for i in range(len(train))}
    test_paths = {test.path(i) for i in range(len(test))}
    assert not train_paths & test_paths and len(train_paths | test_paths) == 18
    again = ImageFolderSource(root, "val", val_fraction=0.5, seed=3)  # "val" is "test"
    assert [again.path(i) for i in range(len(again))] == [test.path(i) for i in range(len(test))]
    splits = {tuple(ImageFolderSource(root, "test", val_fraction=0.5, seed=s).paths) for s in range(6)}
    assert len(splits) > 1


def test_image_folder_separate_validation_folder(tmp_path):
    train_root = _digit_png_folder(tmp_path / "train", per_class=2)
    val_root = tmp_path / "val"
    (val_root / "digit2").mkdir(parents=True)
    Image.new("RGB", (8, 8), "white").save(val_root / "digit2" / "x.png")
    (val_root / "extra").mkdir()
    Image.new("RGB", (8, 8), "black").save(val_root / "extra" / "y.png")
    train = ImageFolderSource(train_root, "train", val_root=val_root)
    test = ImageFolderSource(train_root, "test", val_root=val_root)
    assert train.classes == test.classes == ["digit0", "digit1", "digit2", "extra"]
    assert len(train) == 6 and train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert test.labels.tolist() == [2, 3]


def test_empty_folders_are_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=str(empty)):
        ImageFolderSource(empty)
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "a" / "1.png")
    (root / "b").mkdir()
    (root / "b" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"class folder .*b.* contains no images"):
        ImageFolderSource(root)
    with pytest.raises(FileNotFoundError):
        ImageFolderSource(tmp_path / "missing")


def test_corrupt_image_reported_by_path(tmp_path):
    root = tmp_path / "data"
    (root / "good").mkdir(parents=True)
    (root / "bad").mkdir()
    Image.fromarray(skimage_data.chelsea()).resize((32, 32)).save(root / "good" / "cat.png")
    (root / "bad" / "garbage.jpg").write_bytes(b"this is not a jpeg")
    full = root / "good" / "full.png"
    Image.fromarray(skimage_data.coffee()).save(full)
    truncated = root / "bad" / "truncated.png"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    source = ImageFolderSource(root, val_fraction=0)
    bad_paths = {str(root / "bad" / "garbage.jpg"), str(truncated)}
    for i in range(len(source)):
        if source.path(i) in bad_paths:
            with pytest.raises(BadImageError) as caught:
                source[i]
            assert caught.value.path == source.path(i)
            assert source.path(i) in str(caught.value)
            assert isinstance(caught.value, ValueError)
        else:
            assert source[i][0].mode == "RGB"
    # The error survives pickling (DataLoader workers) with its path.
    error = pickle.loads(pickle.dumps(BadImageError("/x/y.png", "broken")))
    assert error.path == "/x/y.png" and "broken" in str(error)


def test_skip_bad_images_in_a_loader(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    for k in range(3):
        Image.new("RGB", (10, 10), (k * 50, 0, 0)).save(root / "a" / f"{k}.png")
    (root / "a" / "9_bad.png").write_bytes(b"\x89PNG broken")
    source = ImageFolderSource(root, val_fraction=0)
    dataset = TransformedDataset(source, EvalTransform(8), on_bad_image="skip")
    bad = dataset[3]
    assert isinstance(bad, SkippedSample) and bad.path.endswith("9_bad.png")
    batches = list(DataLoader(dataset, batch_size=4, collate_fn=collate_skip_bad, num_workers=1))
    assert len(batches) == 1
    images, labels, skipped = batches[0]
    assert isinstance(batches[0], Batch)
    assert images.shape == (3, 3, 8, 8) and labels.tolist() == [0, 0, 0]
    assert [s.path for s in skipped] == [str(root / "a" / "9_bad.png")]
    all_bad = collate_skip_bad([bad, bad])
    assert all_bad.images.shape[0] == 0 and all_bad.labels.shape == (0,) and len(all_bad.skipped) == 2
    raising = TransformedDataset(source, EvalTransform(8))
    with pytest.raises(BadImageError, match="9_bad.png"):
        raising[3]


# ---------------------------------------------------------------- CSV


def test_csv_with_names_header_and_relative_paths(photo_folder, tmp_path):
    csv_path = tmp_path / "lists" / "train.csv"
    csv_path.parent.mkdir()
    rows = ["path,label"]
    rows.append(f"{os.path.relpath(photo_folder / 'cat' / 'chelsea.png', csv_path.parent)},cat")
    rows.append(f"{photo_folder / 'coffee' / 'coffee.jpeg'},coffee")  # absolute path
    rows.append("")
    rows.append(f"{os.path.relpath(photo_folder / 'cat' / 'chelsea_flipped.JPG', csv_path.parent)},cat")
    csv_path.write_text("\n".join(rows) + "\n")
    source = CsvSource(csv_path, val_fraction=0)
    assert source.classes == ["cat", "coffee"]
    assert source.labels.tolist() == [0, 1, 0]
    image, label = source[1]
    assert image.mode == "RGB" and label == 1
    assert Path(source.path(0)).resolve() == (photo_folder / "cat" / "chelsea.png").resolve()


def test_csv_saved_by_a_spreadsheet_with_a_byte_order_mark_and_crlf(photo_folder, tmp_path):
    csv_path = tmp_path / "list.csv"
    rows = ["path,label", f"{photo_folder / 'cat' / 'chelsea.png'},cat", f"{photo_folder / 'coffee' / 'coffee.jpeg'},coffee"]
    csv_path.write_bytes(("\r\n".join(rows) + "\r\n").encode("utf-8-sig"))  # Excel's "CSV UTF-8"
    source = CsvSource(csv_path, val_fraction=0)
    assert source.classes == ["cat", "coffee"] and source.labels.tolist() == [0, 1]


def test_csv_integer_labels_without_header(photo_folder, tmp_path):
    csv_path = tmp_path / "list.csv"
    csv_path.write_text(
        f"{photo_folder / 'cat' / 'chelsea.png'},3\n{photo_folder / 'logo' / 'logo_rgba.png'},0\n"
    )
    source = CsvSource(csv_path, val_fraction=0)
    assert source.labels.tolist() == [3, 0]
    assert source.classes == ["0", "1", "2", "3"]
    assert source[0][1] == 3


def test_csv_missing_file_names_row_and_path(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("path,label\nok.png,a\nmissing/gone.png,b\n")
    with pytest.raises(ValueError, match=r"row 3.*missing/gone\.png"):
        CsvSource(csv_path)
    csv_path.write_text("ok.png,a,extra\n")
    with pytest.raises(ValueError, match="row 1"):
        CsvSource(csv_path)


# ---------------------------------------------------------------- idx / Fashion-MNIST


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def test_idx_parser_on_synthetic_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    labels = np.array([0, 9, 1, 2, 3, 4, 5], dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, compress=True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels, compress=False)  # plain files are read too
    assert np.array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz", 0x803), images)
    assert read_idx(tmp_path / "train-images-idx3-ubyte.gz").shape == (7, 5, 3)
    with pytest.raises(ValueError, match="expected 0x00000801"):
        read_idx(tmp_path / "train-images-idx3-ubyte.gz", 0x801)
    source = load_fashion_mnist(tmp_path, "train")
    assert len(source) == 7 and source.labels.tolist() == labels.tolist()
    assert source.classes == FASHION_MNIST_CLASSES
    image, label = source[1]
    assert image.size == (3, 5) and label == 9
    assert np.array_equal(np.asarray(image)[..., 0], images[1])
    # A header that promises more data than the file holds, and mismatched counts.
    (tmp_path / "short").write_bytes((tmp_path / "train-labels-idx1-ubyte").read_bytes()[:-1])
    with pytest.raises(ValueError, match="short"):
        read_idx(tmp_path / "short")
    (tmp_path / "not_idx").write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "not_idx")
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels[:6], compress=False)
    with pytest.raises(ValueError, match="7 images but .* 6 labels"):
        load_fashion_mnist(tmp_path, "train")


@pytest.fixture(scope="module")
def fashion_train():
    if not Path(FASHION_MNIST_DIR).is_dir():
        pytest.skip(f"{FASHION_MNIST_DIR} missing (apt-get install dataset-fashion-mnist)")
    return load_fashion_mnist()


def test_fashion_mnist_real_files(fashion_train):
    test = load_fashion_mnist(split="test")
    assert len(fashion_train) == 60_000 and len(test) == 10_000
    assert np.bincount(fashion_train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    image, label = fashion_train[0]
    assert image.size == (28, 28) and image.mode == "RGB" and label == fashion_train.labels[0]
    assert fashion_train.image_size() == (28, 28)
    assert fashion_train.classes[9] == "Ankle boot"


def test_select_classes_relabels_fashion_mnist(fashion_train):
    upstream = select_classes(fashion_train, range(5))
    downstream = select_classes(fashion_train, [5, 6, 7, 8, 9])
    assert len(upstream) == len(downstream) == 30_000
    assert downstream.classes == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert np.bincount(downstream.labels).tolist() == [6000] * 5
    first = int(np.flatnonzero(fashion_train.labels == 7)[0])
    position = int(np.searchsorted(downstream.indices, first))
    assert downstream.labels[position] == 2 and downstream[position][1] == 2
    assert downstream.path(position) == fashion_train.path(first)
    by_name = select_classes(fashion_train, ["Bag", "Sandal"])
    assert by_name.classes == ["Bag", "Sandal"] and set(np.unique(by_name.labels)) == {0, 1}
    with pytest.raises(ValueError, match="unknown class"):
        select_classes(fashion_train, ["Hat"])
    with pytest.raises(ValueError, match="out of range"):
        select_classes(fashion_train, [10])


# ---------------------------------------------------------------- digits


def test_digits_split_and_scaling():
    train, test = load_digits("train", seed=0), load_digits("test", seed=0)
    assert len(train) + len(test) == 1797
    assert abs(len(test) - 0.2 * 1797) < 10
    assert set(np.unique(test.labels)) == set(range(10))
    assert train.images.dtype == np.uint8 and train.images.max() == 255 and train.images.min() == 0
    assert train.image_size() == (8, 8)
    image, label = train[0]
    assert image.mode == "RGB" and image.size == (8, 8) and label == train.labels[0]
    again = load_digits("test", seed=0)
    assert np.array_equal(again.images, test.images)
    other = load_digits("test", seed=1)
    assert not np.array_equal(other.images, test.images)


# ---------------------------------------------------------------- CIFAR


def _cifar_images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, 3072), dtype=np.uint8)


def _make_fake_cifar(root: Path) -> dict:
    """The real layout and schema (bytes keys as written by Python 2), tiny."""
    c10 = root / "cifar-10-batches-py"
    c10.mkdir(parents=True)
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    meta = {b"num_cases_per_batch": 4, b"label_names": names, b"num_vis": 3072}
    (c10 / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    batches = {}
    for name, count, seed in [("data_batch_1", 4, 1), ("data_batch_2", 3, 2), ("test_batch", 2, 3)]:
        labels = [int(v) for v in np.random.default_rng(seed).integers(0, 10, count)]
        record = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": _cifar_images(count, seed),
            b"filenames": [f"img{i}.png".encode() for i in range(count)],
        }
        batches[name] = record
        (c10 / name).write_bytes(pickle.dumps(record, protocol=2))
    c100 = root / "cifar-100-python"
    c100.mkdir()
    meta100 = {
        b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
        b"coarse_label_names": [b"x"] * 20,
    }
    (c100 / "meta").write_bytes(pickle.dumps(meta100, protocol=5))  # newer protocol: numpy _frombuffer path
    for split, count in [("train", 5), ("test", 2)]:
        record = {
            b"filenames": [b"a"] * count,
            b"fine_labels": list(range(95, 95 + count)),
            b"coarse_labels": [0] * count,
            b"data": _cifar_images(count, 7),
        }
        batches["100" + split] = record
        (c100 / split).write_bytes(pickle.dumps(record, protocol=5))
    return batches


def test_fake_cifar10_and_100(tmp_path):
    batches = _make_fake_cifar(tmp_path)
    train = load_cifar(tmp_path, "train")
    assert len(train) == 7 and train.classes[3] == "cat"
    assert train.labels.tolist() == batches["data_batch_1"][b"labels"] + batches["data_batch_2"][b"labels"]
    image, label = train[5]  # second image of data_batch_2
    row = batches["data_batch_2"][b"data"][1]
    pixels = np.asarray(image)
    assert pixels.shape == (32, 32, 3) and label == train.labels[5]
    # Rows are channel-major: red plane, green plane, blue plane, each row by row.
    assert (
        pixels[0, 1, 0] == row[1]
        and pixels[2, 3, 1] == row[1024 + 2 * 32 + 3]
        and pixels[31, 31, 2] == row[3071]
    )
    test = load_cifar(tmp_path / "cifar-10-batches-py", "test")
    assert len(test) == 2
    assert np.array_equal(test.images[0].transpose(2, 0, 1).reshape(-1), batches["test_batch"][b"data"][0])
    c100 = load_cifar(tmp_path, "train", num_classes=100)
    assert len(c100) == 5 and c100.labels.tolist() == [95, 96, 97, 98, 99] and c100.classes[99] == "fine99"
    assert len(open_source(f"cifar100:{tmp_path}", "test")) == 2
    assert len(open_source(f"cifar10:{tmp_path}", "train")) == 7


class _Payload:
    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("kind", ["os.system", "builtins.open", "builtins.eval"])
def test_malicious_pickle_is_refused_without_running(tmp_path, kind):
    target = tmp_path / "pwned"
    payload = {
        "os.system": _Payload(os.system, f"touch {target}"),
        "builtins.open": _Payload(open, str(target), "w"),
        "builtins.eval": _Payload(eval, f"open({str(target)!r}, 'w')"),
    }[kind]
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({b"data": payload}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        safe_load(evil)
    assert not target.exists()
    # The same file posing as a CIFAR batch.
    c10 = tmp_path / "cifar-10-batches-py"
    c10.mkdir()
    (c10 / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"x"] * 10}, protocol=2))
    (c10 / "data_batch_1").write_bytes(evil.read_bytes())
    with pytest.raises(pickle.UnpicklingError, match="data_batch_1"):
        load_cifar(tmp_path, "train")
    assert not target.exists()
    pickle.loads(evil.read_bytes())  # the payload is live: the plain unpickler does create the file
    assert target.exists()


def test_safe_load_refuses_object_arrays(tmp_path):
    path = tmp_path / "objects.pkl"
    path.write_bytes(pickle.dumps(np.array([1, "a"], dtype=object), protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        safe_load(path)


# ---------------------------------------------------------------- sampling


def test_few_shot_indices_deterministic_and_balanced():
    labels = np.repeat(np.arange(4), [10, 12, 5, 30])
    first = few_shot_indices(labels, shots=5, seed=0)
    assert np.array_equal(first, few_shot_indices(labels, shots=5, seed=0))
    assert np.bincount(labels[first]).tolist() == [5, 5, 5, 5]
    assert len(np.unique(first)) == 20 and first.dtype == np.int64
    assert not np.array_equal(first, few_shot_indices(labels, shots=5, seed=1))


def test_few_shot_indices_errors_name_the_class():
    labels = np.repeat(np.arange(3), [10, 4, 10])
    with pytest.raises(ValueError, match=r"class 1 has 4"):
        few_shot_indices(labels, shots=5, seed=0)
    with pytest.raises(ValueError, match=r"class 1 \('Trouser'\) has 4"):
        few_shot_indices(labels, shots=5, seed=0, classes=["T-shirt", "Trouser", "Pullover"])
    with pytest.raises(ValueError, match=r"class 3 \('Dress'\) has 0"):
        few_shot_indices(labels, shots=1, seed=0, classes=["a", "b", "c", "Dress"])


def test_stratified_split_properties():
    labels = np.repeat(np.arange(3), [10, 3, 1])
    train, test = stratified_split(labels, 0.2, seed=0)
    assert np.bincount(labels[test], minlength=3).tolist() == [2, 1, 0]
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(14))
    again = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test)


# ---------------------------------------------------------------- transforms


@pytest.fixture(scope="module")
def cat_image() -> Image.Image:
    return Image.fromarray(skimage_data.chelsea()).resize((90, 60))


def test_train_transform_shape_range_and_determinism(cat_image):
    transform = TrainTransform(precrop=40, crop=32)
    out = transform(cat_image, torch.Generator().manual_seed(0))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, transform(cat_image, torch.Generator().manual_seed(0)))
    assert torch.equal(out, transform(cat_image, 0))  # an int seed works too
    outputs = {transform(cat_image, seed).numpy().tobytes() for seed in range(8)}
    assert len(outputs) > 4
    with pytest.raises(ValueError, match="Generator"):
        transform(cat_image)


# The transforms resize with the processor's kernel (torch's antialiased resize, as transformers' processor does),
# which agrees with PIL's (the original code's torchvision-on-PIL) to one 8-bit level: 2/255 in [-1, 1].
ONE_LEVEL = 2 / 255 + 1e-5


def test_train_transform_is_a_crop_of_the_squashed_image(cat_image):
    squashed = (
        np.asarray(cat_image.resize((40, 40), Image.Resampling.BILINEAR)).astype(np.float32) / 127.5 - 1
    )
    windows = {}
    for top in range(9):
        for left in range(9):
            window = squashed[top : top + 32, left : left + 32]
            windows[(top, left, False)] = window
            windows[(top, left, True)] = window[:, ::-1]
    flips = set()
    for seed in range(12):
        out = TrainTransform(40, 32)(cat_image, seed).permute(1, 2, 0).numpy()
        match = [key for key, window in windows.items() if np.allclose(out, window, atol=ONE_LEVEL)]
        assert match, seed
        flips.add(match[0][2])
    assert flips == {False, True}
    no_flip = TrainTransform(40, 40, hflip=False)
    for seed in range(4):
        assert np.allclose(no_flip(cat_image, seed).permute(1, 2, 0).numpy(), squashed, atol=ONE_LEVEL)


def test_eval_transform_and_normalisation(cat_image):
    transform = EvalTransform(24, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    out = transform(cat_image)
    assert out.shape == (3, 24, 24)
    pixels = np.asarray(cat_image.resize((24, 24), Image.Resampling.BILINEAR)).astype(np.float32) / 255
    expected = (pixels - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert np.allclose(out.permute(1, 2, 0).numpy(), expected, atol=ONE_LEVEL / 2 / 0.224)
    assert torch.equal(out, transform(cat_image, 123))
    gray = Image.fromarray(skimage_data.camera()).resize((30, 20))
    assert EvalTransform(16)(gray).shape == (3, 16, 16)
    with pytest.raises(ValueError):
        TrainTransform(32, 40)


def test_eval_transform_matches_torchvision(cat_image):
    transforms = pytest.importorskip("torchvision.transforms")
    reference = transforms.Compose(
        [transforms.Resize((24, 24)), transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)]
    )
    assert torch.allclose(EvalTransform(24)(cat_image), reference(cat_image), atol=ONE_LEVEL)


# ---------------------------------------------------------------- TransformedDataset


def _loader_images(dataset, num_workers, batch_size):
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skip_bad)
    return torch.cat([batch.images for batch in loader])


def test_transformed_dataset_reproducible_across_workers_and_resume():
    digits = load_digits("test")
    indices = np.arange(0, 40, 2)
    dataset = TransformedDataset(digits, TrainTransform(12, 8), indices, seed=5)
    assert len(dataset) == 20 and np.array_equal(dataset.labels, digits.labels[indices])
    dataset.set_epoch(3)
    serial = _loader_images(dataset, num_workers=0, batch_size=4)
    parallel = _loader_images(dataset, num_workers=2, batch_size=7)
    assert torch.equal(serial, parallel)
    # A fresh dataset object (a resumed run) gives the same epoch-3 augmentations, item by item.
    resumed = TransformedDataset(digits, TrainTransform(12, 8), indices, seed=5)
    resumed.set_epoch(3)
    assert torch.equal(resumed[7][0], serial[7])
    assert torch.equal(resumed[(3, 7)][0], serial[7])
    assert resumed[7][1] == digits.labels[14]
    resumed.set_epoch(4)
    assert not torch.equal(_loader_images(resumed, 0, 20), serial)
    other_seed = TransformedDataset(digits, TrainTransform(12, 8), indices, seed=6)
    other_seed.set_epoch(3)
    assert not torch.equal(_loader_images(other_seed, 0, 20), serial)


def test_epoch_sampler_with_persistent_workers():
    digits = load_digits("test")
    dataset = TransformedDataset(digits, TrainTransform(12, 8), np.arange(8), seed=1)
    sampler = EpochSampler(torch.utils.data.SequentialSampler(range(8)))
    loader = DataLoader(dataset, batch_size=8, sampler=sampler, num_workers=1, persistent_workers=True)
    seen = {}
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        seen[epoch] = next(iter(loader))[0]
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        assert torch.equal(seen[epoch], torch.stack([dataset[i][0] for i in range(8)]))
    assert not torch.equal(seen[0], seen[1])


# ---------------------------------------------------------------- open_source


def test_open_source_specs(photo_folder, tmp_path):
    assert len(open_source("digits")) + len(open_source("digits", "test")) == 1797
    folder = open_source(photo_folder, val_fraction=0)
    assert isinstance(folder, ImageFolderSource) and len(folder) == 10
    subset = open_source(str(photo_folder), val_fraction=0, classes=["coffee", "cat"])
    assert subset.classes == ["coffee", "cat"] and np.bincount(subset.labels).tolist() == [3, 3]
    csv_path = tmp_path / "x.csv"
    csv_path.write_text(f"{photo_folder / 'cat' / 'chelsea.png'},cat\n")
    assert isinstance(open_source(csv_path, val_fraction=0), CsvSource)
    for bad in ["imagenet", str(tmp_path / "nope"), "cifar10"]:
        with pytest.raises(ValueError) as caught:
            open_source(bad)
        if bad != "cifar10":
            for accepted in ACCEPTED_SPECS:
                assert accepted in str(caught.value)


def test_open_source_fashion_mnist(fashion_train):
    test = open_source("fashion-mnist", "test", classes=range(5, 10))
    assert len(test) == 5000 and test.classes[0] == "Sandal"
    assert len(open_source(f"fashion-mnist:{FASHION_MNIST_DIR}", "test")) == 10_000
