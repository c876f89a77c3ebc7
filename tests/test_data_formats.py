"""File formats: IDX, CIFAR pickles (including a hostile one), image folders, GTSRB, digits."""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from torchpurify.data import load_dataset
from torchpurify.data.cifar import load_cifar_pickle
from torchpurify.data.digits import read_digits
from torchpurify.data.folder import read_gtsrb, read_image_folder
from torchpurify.data.idx import read_idx
from torchpurify.errors import UserError


def idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.dtype("u1"): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}
    header = struct.pack(">BBBB", 0, 0, codes[array.dtype], array.ndim)
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("dtype", ["u1", ">i4", ">f4"])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, dtype, gz):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4).astype(dtype)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if gz else data)
    loaded = read_idx(path)
    assert loaded.shape == (2, 3, 4) and loaded.dtype.isnative
    np.testing.assert_array_equal(loaded, array)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x00\x00", "too short"),
        (b"\x01\x02\x08\x01" + struct.pack(">I", 3) + b"abc", "magic"),
        (b"\x00\x00\x42\x01" + struct.pack(">I", 3) + b"abc", "dtype code"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 3), "header"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 10) + b"abc", "says"),
    ],
)
def test_idx_damaged(tmp_path, data, message):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(data)
    with pytest.raises(UserError, match=message) as err:
        read_idx(path)
    assert str(path) in str(err.value) and "download again" in str(err.value)


def test_idx_bad_gzip_and_missing(tmp_path):
    truncated = tmp_path / "t.gz"
    truncated.write_bytes(gzip.compress(idx_bytes(np.zeros((5, 5), np.uint8)))[:20])
    with pytest.raises(UserError, match="gzip"):
        read_idx(truncated)
    not_gzip = tmp_path / "n.gz"
    not_gzip.write_bytes(b"plain text")
    with pytest.raises(UserError, match="gzip"):
        read_idx(not_gzip)
    with pytest.raises(UserError, match="check the path"):
        read_idx(tmp_path / "absent.gz")


# ---------------------------------------------------------------- CIFAR


def write_pickle(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def cifar_batch(n, labels, label_key=b"labels", seed=0):
    data = np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)
    return {b"batch_label": b"tiny", b"data": data, label_key: list(labels)}


def write_cifar10(root):
    folder = root / "cifar-10-batches-py"
    for i in range(1, 6):
        write_pickle(folder / f"data_batch_{i}", cifar_batch(2, [i - 1, i], seed=i))
    write_pickle(folder / "test_batch", cifar_batch(3, [9, 0, 1], seed=9))
    names = [n.encode() for n in "plane car bird cat deer dog frog horse ship truck".split()]
    write_pickle(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return folder


def test_cifar10_tiny(tmp_path):
    folder = write_cifar10(tmp_path)
    for root in (tmp_path, folder):  # the parent folder or the batches folder itself
        ds = load_dataset("cifar10", root=root)
        assert ds.train.x.shape == (10, 3, 32, 32) and ds.test.x.shape == (3, 3, 32, 32)
        assert ds.train.y.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
        assert ds.test.y.tolist() == [9, 0, 1]
        assert ds.classes[0] == "plane" and ds.num_classes == 10
    first = pickle.loads((folder / "data_batch_1").read_bytes())[b"data"][0]
    expected = first.reshape(3, 32, 32).astype(np.float32) / 255
    np.testing.assert_allclose(ds.train.x[0].numpy(), expected)


def test_cifar100_tiny(tmp_path):
    folder = tmp_path / "cifar-100-python"
    write_pickle(folder / "train", cifar_batch(4, [0, 99, 5, 5], b"fine_labels"))
    write_pickle(folder / "test", cifar_batch(2, [7, 8], b"fine_labels"))
    names = [f"c{i}".encode() for i in range(100)]
    write_pickle(folder / "meta", {b"fine_label_names": names, b"coarse_label_names": []})
    ds = load_dataset("cifar100", root=tmp_path)
    assert ds.train.x.shape == (4, 3, 32, 32) and ds.train.y.tolist() == [0, 99, 5, 5]
    assert ds.test.y.tolist() == [7, 8] and ds.num_classes == 100 and ds.classes[99] == "c99"


def test_cifar_python2_numpy1_pickle(tmp_path):
    # Real CIFAR files name numpy.core.multiarray (numpy 1.x); numpy 2 writes numpy._core.
    raw = pickle.dumps(cifar_batch(2, [1, 2]), protocol=2)
    path = tmp_path / "batch"
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert load_cifar_pickle(path)[b"data"].shape == (2, 3072)


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    folder = write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    write_pickle(folder / "data_batch_3", {b"data": Evil(marker), b"labels": [0]})
    with pytest.raises(UserError, match=r"refusing to unpickle .*system.*not a CIFAR batch"):
        load_dataset("cifar10", root=tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x80\x02}q\x00(U", "not a readable CIFAR pickle"),
        (pickle.dumps([1, 2], protocol=2), "not a CIFAR dict"),
        (pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 0]}, 2), "3072"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, 2), "labels"),
    ],
)
def test_cifar_damaged(tmp_path, content, message):
    folder = write_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_dataset("cifar10", root=tmp_path)


def test_cifar_incomplete_root(tmp_path):
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_4").unlink()
    with pytest.raises(UserError, match="data_batch_4.*point it at the folder holding"):
        load_dataset("cifar10", root=tmp_path)


# ---------------------------------------------------------------- image folder


def save(path, size, colour, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


def test_image_folder_rgb(tmp_path):
    save(tmp_path / "train/cat/a.png", (12, 10), (255, 0, 0))  # pillow sizes are (W, H)
    save(tmp_path / "train/cat/b.JPG", (24, 20), (255, 0, 0))
    save(tmp_path / "train/dog/c.bmp", (12, 10), (0, 0, 255))
    save(tmp_path / "test/dog/d.ppm", (6, 5), (0, 0, 255), mode="RGB")
    save(tmp_path / "test/cat/e.png", (12, 10), 128, mode="L")
    (tmp_path / "train/cat/notes.txt").write_text("ignored")
    ds = load_dataset("image-folder", root=tmp_path)
    assert ds.classes == ["cat", "dog"]
    assert ds.train.x.shape == (3, 3, 10, 12) and ds.test.x.shape == (2, 3, 10, 12)
    assert ds.train.y.tolist() == [0, 0, 1] and ds.test.y.tolist() == [0, 1]
    assert ds.train.x[2, 2].min() > 0.99 and ds.train.x[2, 0].max() < 0.01  # blue dog
    assert abs(float(ds.test.x[0].mean()) - 128 / 255) < 0.01  # grey converted to RGB


def test_image_folder_grey_and_size(tmp_path):
    save(tmp_path / "train/a/1.png", (8, 8), 10, mode="L")
    save(tmp_path / "test/a/2.png", (16, 16), 200, mode="L")
    ds = read_image_folder(tmp_path, size=(4, 6))
    assert ds.train.x.shape == (1, 1, 4, 6) and ds.test.x.shape == (1, 1, 4, 6)


def test_image_folder_mistakes(tmp_path):
    save(tmp_path / "train/a/1.png", (8, 8), 10, mode="L")
    save(tmp_path / "test/b/2.png", (8, 8), 10, mode="L")
    with pytest.raises(UserError, match="that train/ lacks"):
        load_dataset("image-folder", root=tmp_path)
    (tmp_path / "test/b/2.png").unlink()
    (tmp_path / "test/b").rename(tmp_path / "test/a")
    with pytest.raises(UserError, match="empty test split"):
        load_dataset("image-folder", root=tmp_path)
    (tmp_path / "train/a/1.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot read image"):
        load_dataset("image-folder", root=tmp_path)
    with pytest.raises(UserError, match="needs --data-root"):
        load_dataset("image-folder")


# ---------------------------------------------------------------- GTSRB

GT_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"


def sign(path, size=(40, 30), roi=(5, 6, 35, 24)):
    """A blue image whose ROI is red, so a correct crop is all red."""
    image = Image.new("RGB", size, (0, 0, 255))
    image.paste((255, 0, 0), roi)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return f"{path.name};{size[0]};{size[1]};{';'.join(map(str, roi))}"


def write_gtsrb(root, train_dir="Final_Training/Images", csv_in_images=False):
    gtsrb = root / "GTSRB"
    for class_id, n in ((0, 2), (42, 1)):
        folder = gtsrb / train_dir / f"{class_id:05d}"
        rows = [sign(folder / f"00000_{i:05d}.ppm") + f";{class_id}\n" for i in range(n)]
        (folder / f"GT-{class_id:05d}.csv").write_text(GT_HEADER + "".join(rows))
    images = gtsrb / "Final_Test/Images"
    rows = [sign(images / f"{i:05d}.ppm", (50, 50), (10, 10, 40, 40)) + f";{c}\n"
            for i, c in enumerate([42, 7])]  # fmt: skip
    (images / "GT-final_test.test.csv").write_text("unlabelled copy, ignored")
    csv_dir = images if csv_in_images else root
    (csv_dir / "GT-final_test.csv").write_text(GT_HEADER + "".join(rows))
    return gtsrb


@pytest.mark.parametrize("train_dir", ["Final_Training/Images", "Training"])
def test_gtsrb(tmp_path, train_dir):
    write_gtsrb(tmp_path, train_dir)
    ds = load_dataset("gtsrb", root=tmp_path)
    assert ds.train.x.shape == (3, 3, 32, 32) and ds.test.x.shape == (2, 3, 32, 32)
    assert ds.train.y.tolist() == [0, 0, 42] and ds.test.y.tolist() == [42, 7]
    assert ds.num_classes == 43 and ds.classes[42] == "00042"
    for x in (ds.train.x, ds.test.x):  # cropped to the red ROI: no blue left
        assert x[:, 0].min() > 0.99 and x[:, 2].max() < 0.01


def test_gtsrb_root_is_gtsrb_folder(tmp_path):
    gtsrb = write_gtsrb(tmp_path, csv_in_images=True)
    assert len(read_gtsrb(gtsrb).test) == 2


def test_gtsrb_missing_parts(tmp_path):
    gtsrb = write_gtsrb(tmp_path)
    (tmp_path / "GT-final_test.csv").unlink()
    with pytest.raises(UserError, match="GT-final_test.csv"):
        load_dataset("gtsrb", root=tmp_path)
    for path in (gtsrb / "Final_Test/Images").iterdir():
        path.unlink()
    (gtsrb / "Final_Test/Images").rmdir()
    with pytest.raises(UserError, match="Final_Test/Images"):
        load_dataset("gtsrb", root=tmp_path)


def test_gtsrb_bad_annotations(tmp_path):
    gtsrb = write_gtsrb(tmp_path)
    csv_path = gtsrb / "Final_Training/Images/00000/GT-00000.csv"
    csv_path.write_text(GT_HEADER + "00000_00000.ppm;40;30;5;6;99;24;0\n")
    with pytest.raises(UserError, match="ROI"):
        read_gtsrb(tmp_path)
    csv_path.write_text("Filename;Width\n00000_00000.ppm;40\n")
    with pytest.raises(UserError, match="not a GTSRB annotation file"):
        read_gtsrb(tmp_path)
    csv_path.unlink()
    with pytest.raises(UserError, match="GT-00000.csv"):
        read_gtsrb(tmp_path)


# ---------------------------------------------------------------- digits


def test_digits():
    ds = load_dataset("digits")
    assert ds.train.x.shape == (1438, 1, 8, 8) and ds.test.x.shape == (359, 1, 8, 8)
    assert ds.train.x.min() >= 0 and ds.train.x.max() == 1 and ds.num_classes == 10
    again = read_digits()
    assert (again.test.x == ds.test.x).all() and (again.test.y == ds.test.y).all()
