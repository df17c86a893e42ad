"""Datasets: Fashion-MNIST IDX files, image folders, the stratified subset and decode-once sets."""

from __future__ import annotations

import gzip
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from conftest import needs_fashion_mnist
from lesionbench.data import EvalSetCache, RawDataset, build_eval_set, stratified_subset
from lesionbench.errors import LesionbenchError
from lesionbench.plugins.fashion_mnist import CLASSES, FashionMNIST, read_idx
from lesionbench.plugins.image_folder import ImageFolderSource

# ---------------------------------------------------------------- Fashion-MNIST (IDX)

N_IMAGES = 6


def idx_images(images: np.ndarray) -> bytes:
    n, h, w = images.shape
    return struct.pack(">IIII", 0x00000803, n, h, w) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 0x00000801, len(labels)) + labels.astype(np.uint8).tobytes()


@pytest.fixture
def fashion_dir(tmp_path):
    """A tiny Fashion-MNIST test split: distinct random 28×28 images with known labels."""
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, size=(N_IMAGES, 28, 28), dtype=np.uint8)
    labels = np.array([9, 0, 3, 3, 7, 1], dtype=np.uint8)
    root = tmp_path / "fashion"
    root.mkdir()
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_images(images)))
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_labels(labels)))
    return root, images, labels


def test_fashion_mnist_labels_and_exact_pixels(fashion_dir):
    root, images, labels = fashion_dir
    raw = FashionMNIST().load(str(root), "test")
    assert len(raw) == N_IMAGES
    assert raw.labels.dtype == np.int64
    assert raw.labels.tolist() == labels.tolist()
    assert raw.num_classes == 10
    assert raw.class_names == CLASSES
    assert raw.path == str(root)
    for i in range(N_IMAGES):
        img = raw.decode(i)
        assert img.mode == "L" and img.size == (28, 28)
        np.testing.assert_array_equal(np.asarray(img), images[i])


def test_fashion_mnist_uncompressed_files(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28) % 256
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_images(images))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_labels(np.array([4, 2])))
    raw = FashionMNIST().load(str(tmp_path), "train")
    assert raw.labels.tolist() == [4, 2]
    np.testing.assert_array_equal(np.asarray(raw.decode(1)), images[1].astype(np.uint8))


def test_read_idx_shape(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    images = np.full((3, 28, 28), 5, dtype=np.uint8)
    path.write_bytes(idx_images(images))
    assert read_idx(path).shape == (3, 28, 28)


def test_truncated_idx_body_is_refused(fashion_dir):
    root, images, _ = fashion_dir
    data = idx_images(images)
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(data[: len(data) // 2]))
    with pytest.raises(LesionbenchError, match="truncated"):
        FashionMNIST().load(str(root), "test")


def test_truncated_gzip_stream_is_refused(fashion_dir):
    root, _, _ = fashion_dir
    path = root / "t10k-images-idx3-ubyte.gz"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(LesionbenchError, match="truncated"):
        FashionMNIST().load(str(root), "test")


def test_truncated_idx_header_is_refused(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(struct.pack(">II", 0x00000803, 5))  # declares 3 dims, carries 1
    with pytest.raises(LesionbenchError, match="truncated"):
        read_idx(path)


def test_not_an_idx_file_is_refused(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(b"GIF89a this is not IDX")
    with pytest.raises(LesionbenchError, match="IDX"):
        read_idx(path)


def test_image_and_label_counts_must_agree(fashion_dir):
    root, _, _ = fashion_dir
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_labels(np.array([1, 2]))))
    with pytest.raises(LesionbenchError, match="6 images but 2 labels"):
        FashionMNIST().load(str(root), "test")


def test_missing_file_is_named(fashion_dir):
    root, _, _ = fashion_dir
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(LesionbenchError, match="t10k-labels-idx1-ubyte"):
        FashionMNIST().load(str(root), "test")


def test_missing_directory_mentions_apt_get(tmp_path):
    with pytest.raises(LesionbenchError) as info:
        FashionMNIST().load(str(tmp_path / "nowhere"), "test")
    assert "apt-get" in str(info.value)
    assert "dataset-fashion-mnist" in str(info.value)


def test_unknown_split(fashion_dir):
    root, _, _ = fashion_dir
    with pytest.raises(LesionbenchError, match="unknown split 'validation'"):
        FashionMNIST().load(str(root), "validation")


# ---------------------------------------------------------------- stratified subset


def test_stratified_subset_is_deterministic_and_seeded():
    labels = np.repeat(np.arange(10), 50)
    a = stratified_subset(labels, 40, seed=0)
    b = stratified_subset(labels, 40, seed=0)
    c = stratified_subset(labels, 40, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(a) == len(c) == 40
    assert len(set(a.tolist())) == 40  # no repeats


@pytest.mark.parametrize("n", [1, 7, 23, 40, 99])
def test_stratified_subset_balances_classes(n):
    rng = np.random.default_rng(3)
    labels = rng.permutation(np.repeat(np.arange(5), 40))  # 5 classes, 40 each, shuffled
    chosen = stratified_subset(labels, n, seed=11)
    assert len(chosen) == n
    counts = Counter(labels[chosen].tolist())
    full = [counts.get(c, 0) for c in range(5)]
    assert max(full) - min(full) <= 1
    assert np.all(np.diff(chosen) > 0)  # sorted, unique


def test_a_subset_smaller_than_the_class_count_draws_its_classes_at_random():
    labels = np.arange(1000)  # one image per class, as the ImageNet sample
    chosen = stratified_subset(labels, 100, seed=0)
    assert len(set(labels[chosen])) == 100
    assert labels[chosen].max() > 500 and labels[chosen].min() < 100  # not the first 100 classes
    assert not np.array_equal(chosen, stratified_subset(labels, 100, seed=1))
    # with every class represented the subset is the one earlier releases chose: committed tracks stand
    fashion = np.arange(10000) % 10
    assert stratified_subset(fashion, 500, seed=0)[:5].tolist() == [34, 39, 65, 69, 80]
    assert stratified_subset(fashion, 64, seed=0)[:5].tolist() == [232, 322, 427, 682, 694]


def test_stratified_subset_uneven_classes_takes_what_exists():
    labels = np.array([0] * 2 + [1] * 20 + [2] * 20)
    chosen = stratified_subset(labels, 20, seed=5)
    counts = Counter(labels[chosen].tolist())
    assert counts[0] == 2  # class 0 has only two members: both taken
    assert abs(counts[1] - counts[2]) <= 1 and counts[1] + counts[2] == 18


def test_stratified_subset_all_when_n_is_large_or_none():
    labels = np.array([2, 0, 1, 1, 0])
    np.testing.assert_array_equal(stratified_subset(labels, 5, seed=0), np.arange(5))
    np.testing.assert_array_equal(stratified_subset(labels, 50, seed=0), np.arange(5))
    np.testing.assert_array_equal(stratified_subset(labels, None, seed=0), np.arange(5))


def test_stratified_subset_refuses_non_positive_n():
    with pytest.raises(LesionbenchError, match="positive"):
        stratified_subset(np.array([0, 1, 1]), 0, seed=0)


# ---------------------------------------------------------------- image folders

WNID_0, WNID_1, WNID_999 = "n01440764", "n01443537", "n15075141"


def write_jpeg(path: Path, colour: tuple[int, int, int], size=(12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG")


def test_flat_wnid_layout_uses_imagenet_indices(tmp_path):
    write_jpeg(tmp_path / f"{WNID_999}_00000003.JPEG", (0, 0, 250))
    write_jpeg(tmp_path / f"{WNID_0}_00000001.JPEG", (250, 0, 0))
    write_jpeg(tmp_path / f"{WNID_1}_00000002.JPEG", (0, 250, 0))
    (tmp_path / "README.txt").write_text("not an image")
    write_jpeg(tmp_path / "holiday.JPEG", (9, 9, 9))  # no wnid: ignored
    raw = ImageFolderSource().load(str(tmp_path), "val")
    assert raw.labels.tolist() == [0, 1, 999]  # sorted by file name
    assert raw.labels.dtype == np.int64
    assert raw.num_classes == 1000
    assert len(raw.class_names) == 1000
    assert raw.class_names[0] == WNID_0 and raw.class_names[999] == WNID_999
    img = raw.decode(1)
    assert img.mode == "RGB" and img.size == (12, 10)
    r, g, b = img.getpixel((5, 5))
    assert g > 200 and r < 50 and b < 50  # the n01443537 file, decoded


def test_imagefolder_layout_with_wnid_subfolders_keeps_imagenet_indices(tmp_path):
    write_jpeg(tmp_path / WNID_999 / "a.JPEG", (0, 0, 250))
    write_jpeg(tmp_path / WNID_1 / "b.JPEG", (0, 250, 0))
    write_jpeg(tmp_path / WNID_1 / "c.JPEG", (0, 250, 0))
    raw = ImageFolderSource().load(str(tmp_path), "val")
    # only two classes present, yet they keep their ImageNet positions (not 0 and 1)
    assert sorted(raw.labels.tolist()) == [1, 1, 999]
    assert raw.num_classes == 1000
    assert raw.class_names[1] == WNID_1
    for i, label in enumerate(raw.labels.tolist()):
        _, _, b = raw.decode(i).getpixel((3, 3))
        assert (b > 200) == (label == 999)


def test_non_wnid_folders_fall_back_to_sorted_position(tmp_path):
    write_jpeg(tmp_path / "zebra" / "1.jpg", (1, 1, 1))
    write_jpeg(tmp_path / "cat" / "1.jpg", (2, 2, 2))
    write_jpeg(tmp_path / "cat" / "2.png", (3, 3, 3))
    raw = ImageFolderSource().load(str(tmp_path), "val")
    assert raw.class_names == ["cat", "zebra"]
    assert raw.num_classes == 2
    assert sorted(raw.labels.tolist()) == [0, 0, 1]


def test_mixed_wnid_and_plain_folders_fall_back_to_sorted_position(tmp_path):
    write_jpeg(tmp_path / WNID_999 / "a.JPEG", (1, 1, 1))
    write_jpeg(tmp_path / "aardvark" / "b.JPEG", (1, 1, 1))
    raw = ImageFolderSource().load(str(tmp_path), "val")
    assert raw.num_classes == 2
    assert raw.class_names == ["aardvark", WNID_999]
    assert sorted(raw.labels.tolist()) == [0, 1]


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(LesionbenchError, match="no images found"):
        ImageFolderSource().load(str(tmp_path), "val")


def test_folder_without_wnid_images_is_refused(tmp_path):
    write_jpeg(tmp_path / "holiday.JPEG", (1, 1, 1))
    with pytest.raises(LesionbenchError, match="no images found"):
        ImageFolderSource().load(str(tmp_path), "val")


def test_image_folder_needs_an_existing_path(tmp_path):
    with pytest.raises(LesionbenchError, match="needs a path"):
        ImageFolderSource().load(None, "val")
    with pytest.raises(LesionbenchError, match="does not exist"):
        ImageFolderSource().load(str(tmp_path / "missing"), "val")


# ---------------------------------------------------------------- evaluation sets

TINY = transforms.Compose([transforms.Resize((8, 8)), transforms.ToTensor()])


def test_build_eval_set_skips_and_counts_unreadable_images(tmp_path):
    write_jpeg(tmp_path / f"{WNID_0}_1.JPEG", (200, 0, 0))
    (tmp_path / f"{WNID_1}_2.JPEG").write_bytes(b"\xff\xd8\xff this is no jpeg")  # corrupt
    write_jpeg(tmp_path / f"{WNID_999}_3.JPEG", (0, 0, 200))
    raw = ImageFolderSource().load(str(tmp_path), "val")
    assert raw.labels.tolist() == [0, 1, 999]
    with pytest.warns(UserWarning, match="skipping unreadable image 1"):
        eval_set = build_eval_set(raw, np.arange(3), TINY)
    assert eval_set.skipped == 1
    assert len(eval_set) == 2
    assert eval_set.indices.tolist() == [0, 2]
    assert eval_set.labels.tolist() == [0, 999]
    assert eval_set.labels.dtype == torch.long
    assert eval_set.images.shape == (2, 3, 8, 8)
    # the images are the ones belonging to the labels: red first, blue second
    assert eval_set.images[0, 0].mean() > 0.6 and eval_set.images[0, 2].mean() < 0.2
    assert eval_set.images[1, 2].mean() > 0.6 and eval_set.images[1, 0].mean() < 0.2


def test_build_eval_set_with_nothing_readable_is_refused(tmp_path):
    (tmp_path / f"{WNID_0}_1.JPEG").write_bytes(b"garbage")
    raw = ImageFolderSource().load(str(tmp_path), "val")
    with pytest.warns(UserWarning), pytest.raises(LesionbenchError, match="no readable images"):
        build_eval_set(raw, np.arange(1), TINY)


def counting_dataset(n: int = 6, name: str = "counted") -> tuple[RawDataset, list[int]]:
    calls: list[int] = []

    def decode(i: int) -> Image.Image:
        calls.append(i)
        return Image.new("L", (4, 4), i * 10)

    raw = RawDataset(name=name, path="/nowhere", labels=np.arange(n) % 3, num_classes=3, decode=decode)
    return raw, calls


def test_eval_set_cache_decodes_once_per_preprocess_key():
    raw, calls = counting_dataset()
    cache = EvalSetCache()
    indices = np.array([0, 2, 4], dtype=np.int64)
    to_tensor = transforms.ToTensor()
    first = cache.get(raw, indices, to_tensor, "plain")
    assert calls == [0, 2, 4]
    assert first.labels.tolist() == [0, 2, 1]
    again = cache.get(raw, indices.copy(), to_tensor, "plain")
    assert again is first
    assert calls == [0, 2, 4]  # not decoded a second time

    doubled = cache.get(raw, indices, lambda im: to_tensor(im) * 2, "doubled")
    assert doubled is not first
    assert calls == [0, 2, 4, 0, 2, 4]
    assert torch.allclose(doubled.images, first.images * 2)

    other_subset = cache.get(raw, np.array([1], dtype=np.int64), to_tensor, "plain")
    assert other_subset is not first and len(other_subset) == 1
    assert calls[-1] == 1


def test_eval_set_cache_separates_datasets():
    raw_a, calls_a = counting_dataset(name="a")
    raw_b, calls_b = counting_dataset(name="b")
    cache = EvalSetCache()
    indices = np.array([1, 3])
    set_a = cache.get(raw_a, indices, transforms.ToTensor(), "k")
    set_b = cache.get(raw_b, indices, transforms.ToTensor(), "k")
    assert set_a is not set_b
    assert calls_a == [1, 3] and calls_b == [1, 3]


@needs_fashion_mnist()
@pytest.mark.parametrize("track", ["fashion-mnist", "beyond-paper", "int8-fashion"])
def test_the_default_subset_seed_selects_the_images_the_committed_tracks_evaluated(track):
    """The evaluation images follow ``dataset.subset_seed`` (default 0), not the study seed (a rerun
    with another seed evaluating the same images: tests/test_compare_significance.py); the default
    reproduces the subsets the committed tracks (all made with seed 0) kept in outcomes.arrow."""
    from lesionbench.store import read_results_with_outcomes
    from lesionbench.study import DatasetSpec

    repo = Path(__file__).resolve().parents[1]
    _df, outcomes = read_results_with_outcomes(repo / "leaderboard" / "results" / track)
    committed = np.sort(outcomes.images["index"].to_numpy())
    chosen = stratified_subset(FashionMNIST().load(None, "test").labels, 500, DatasetSpec().subset_seed)
    assert np.array_equal(chosen, committed)
