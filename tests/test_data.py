"""Datasets: digits, IDX folders written by the tests, resizing, errors that name the file."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from glrnet.data import (DataError, _download, identify_data_dir, load_dataset, read_idx, resize, resolve_data_dir,
                         write_idx)


def make_idx_folder(folder, n_train=60, n_test=20, size=28, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    labels_tr, labels_te = rng.integers(0, 10, n_train), rng.integers(0, 10, n_test)
    # images that carry their label (a bright row), so tiny models can learn them
    imgs_tr = rng.integers(0, 60, (n_train, size, size))
    imgs_te = rng.integers(0, 60, (n_test, size, size))
    for imgs, labels in ((imgs_tr, labels_tr), (imgs_te, labels_te)):
        for img, lab in zip(imgs, labels):
            img[2 * lab: 2 * lab + 2] = 255
    write_idx(folder / f"train-images-idx3-ubyte{suffix}", imgs_tr)
    write_idx(folder / f"train-labels-idx1-ubyte{suffix}", labels_tr)
    write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", imgs_te)
    write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", labels_te)
    return folder


def test_digits_split_is_fixed_stratified_and_scaled():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert torch.equal(a.x_train, b.x_train) and len(a.x_train) + len(a.x_test) == 1797
    assert a.x_train.min() >= 0 and a.x_train.max() <= 1 and a.in_features == 64
    counts = torch.bincount(a.y_test, minlength=10).float()
    assert counts.min() / counts.max() > 0.9  # stratified


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_roundtrip_and_resize(tmp_path, gz):
    make_idx_folder(tmp_path, gz=gz)
    ds = load_dataset("mnist", tmp_path, image_size=14)
    assert ds.x_train.shape == (60, 196) and ds.x_test.shape == (20, 196) and ds.image_shape == (14, 14)
    raw = load_dataset("mnist", tmp_path)
    pooled = raw.x_train.reshape(-1, 14, 2, 14, 2).mean((2, 4)).reshape(60, -1)
    torch.testing.assert_close(ds.x_train, pooled)  # 28 → 14 is exactly 2×2 average pooling
    assert raw.x_train.max() == 1.0


def test_validation_split_and_subset(tmp_path):
    make_idx_folder(tmp_path, n_train=100)
    ds = load_dataset("mnist", tmp_path, val_fraction=0.2)
    assert len(ds.x_val) == 20 and len(ds.x_train) == 80
    sub = load_dataset("digits", subset=200)
    assert len(sub.x_train) == 200 and len(sub.x_test) == 50


def test_missing_and_corrupt_files_named(tmp_path):
    with pytest.raises(DataError, match="does not exist.*train-images-idx3-ubyte"):
        load_dataset("mnist", tmp_path / "nope")
    make_idx_folder(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="lacks t10k-labels-idx1-ubyte"):
        load_dataset("mnist", tmp_path)
    make_idx_folder(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: header says .*truncated"):
        load_dataset("mnist", tmp_path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: cannot read"):
        load_dataset("mnist", tmp_path)
    make_idx_folder(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(59))
    with pytest.raises(DataError, match="60 images but 59 labels"):
        load_dataset("mnist", tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros((60, 2)))
    with pytest.raises(DataError, match="expected 1 dimensions"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")


def test_download_verifies_checksum_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    """A mirror serving wrong bytes: an error naming the file and checksum, and no file in the cache."""
    import urllib.request

    def fake_retrieve(url, filename):
        with open(filename, "wb") as f:
            f.write(b"not mnist")
    monkeypatch.setattr(urllib.request, "urlretrieve", fake_retrieve)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*checksum mismatch"):
        _download("mnist", tmp_path, allowed=True)
    assert list((tmp_path / "mnist").iterdir()) == []
    with pytest.raises(DataError, match="downloading is off"):
        _download("mnist", tmp_path / "other", allowed=False)


def test_download_reuses_a_verified_cache(tmp_path, monkeypatch):
    import urllib.request

    from glrnet import data
    payload = b"pretend mnist"
    import hashlib
    md5 = hashlib.md5(payload).hexdigest()
    monkeypatch.setitem(data.REMOTE, "mnist", (["http://mirror/"], {"train-images-idx3-ubyte.gz": md5}))
    calls = []

    def fake_retrieve(url, filename):
        calls.append(url)
        with open(filename, "wb") as f:
            f.write(payload)
    monkeypatch.setattr(urllib.request, "urlretrieve", fake_retrieve)
    folder = _download("mnist", tmp_path, allowed=True)
    assert (folder / "train-images-idx3-ubyte.gz").read_bytes() == payload
    _download("mnist", tmp_path, allowed=True)
    assert calls == ["http://mirror/train-images-idx3-ubyte.gz"]


def test_read_idx_rejects_non_idx(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"\x01\x02\x03\x04hello")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(p)


def test_resize_area_average():
    img = torch.arange(16.0).reshape(1, 4, 4)
    torch.testing.assert_close(resize(img, 2), torch.tensor([[[2.5, 4.5], [10.5, 12.5]]]))


# ---------------------------------------------------------------------- which folder holds which dataset
def known_as(monkeypatch, name, folder):
    """Register the IDX files of ``folder`` as the known checksums of dataset ``name`` (for this test)."""
    from glrnet import data
    monkeypatch.setitem(data.CONTENT_MD5, name, {stem: data._digest(p, "content-md5")
                                                 for stem, p in data._idx_paths(folder).items()})


def test_a_folder_of_another_dataset_is_refused_naming_what_it_holds(tmp_path, monkeypatch):
    fashion = make_idx_folder(tmp_path / "f", seed=1)
    known_as(monkeypatch, "fashion-mnist", fashion)
    with pytest.raises(DataError, match=rf"data folder {fashion} holds fashion-mnist \(identified by its files' "
                                        r"checksums\), not mnist: .* or --dataset fashion-mnist"):
        load_dataset("mnist", fashion)
    assert load_dataset("fashion-mnist", fashion).x_train.shape == (60, 784)
    own = make_idx_folder(tmp_path / "own", seed=2)      # files no checksum knows: read as the dataset asked for
    assert identify_data_dir(own) is None and load_dataset("mnist", own).name == "mnist"


def test_data_dir_is_the_dataset_folder_or_its_parent(tmp_path, monkeypatch):
    parent = tmp_path / "data"
    mnist, fashion = make_idx_folder(parent / "mnist", seed=0), make_idx_folder(parent / "fashion-mnist", seed=1)
    known_as(monkeypatch, "mnist", mnist)
    known_as(monkeypatch, "fashion-mnist", fashion)
    assert resolve_data_dir("mnist", parent) == mnist and resolve_data_dir("mnist", mnist) == mnist
    assert resolve_data_dir("fashion-mnist", parent) == fashion
    a, b = load_dataset("fashion-mnist", parent), load_dataset("fashion-mnist", fashion)
    assert torch.equal(a.x_train, b.x_train)
    # a spec's fashion-mnist entry pointed at the MNIST folder: one line, not MNIST trained as Fashion-MNIST
    with pytest.raises(DataError, match=f"data folder {mnist} holds mnist .*, not fashion-mnist"):
        load_dataset("fashion-mnist", mnist)
    with pytest.raises(DataError, match="holds neither the four IDX files .* nor a folder mnist/"):
        resolve_data_dir("mnist", tmp_path)


def test_files_are_checked_against_the_folders_sha256sums(tmp_path):
    import hashlib
    folder = make_idx_folder(tmp_path / "m")
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}" for p in sorted(folder.iterdir())]
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    assert len(load_dataset("mnist", folder).x_train) == 60
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(20))            # replaced after the sums were taken
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: its SHA-256 differs from the one in "
                                        rf"{folder / 'SHA256SUMS'}"):
        load_dataset("mnist", folder)


def test_a_folder_mixing_two_datasets_is_refused(tmp_path, monkeypatch):
    import shutil
    mnist, fashion = make_idx_folder(tmp_path / "m", seed=0), make_idx_folder(tmp_path / "f", seed=1)
    known_as(monkeypatch, "mnist", mnist)
    known_as(monkeypatch, "fashion-mnist", fashion)
    shutil.copy(fashion / "t10k-images-idx3-ubyte.gz", mnist / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(DataError, match=r"mixes the files of mnist \(.*\) and fashion-mnist \(t10k-images"):
        load_dataset("mnist", mnist)


def test_digits_with_a_data_folder_names_what_the_folder_holds(tmp_path, monkeypatch):
    mnist = make_idx_folder(tmp_path / "m")
    known_as(monkeypatch, "mnist", mnist)
    with pytest.raises(DataError, match=r"--data-dir .* holds mnist \(identified .*\), but the dataset is digits "
                                        r"\(the default; .*\): add --dataset mnist"):
        load_dataset("digits", mnist)
    from glrnet.train import TrainConfig
    with pytest.raises(DataError, match="but the dataset is digits"):
        TrainConfig(data_dir=str(mnist)).validate()


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "fashion-mnist").is_dir(), reason="the shared MNIST / Fashion-MNIST files are absent")
def test_the_shared_folders_are_identified_by_their_checksums():
    assert identify_data_dir(SHARED / "mnist") == "mnist"
    assert identify_data_dir(SHARED / "fashion-mnist") == "fashion-mnist"
    assert identify_data_dir(SHARED / "mnist-10k") == "mnist-10k"
    assert resolve_data_dir("fashion-mnist", SHARED) == SHARED / "fashion-mnist"
    assert resolve_data_dir("mnist", SHARED / "mnist-10k") == SHARED / "mnist-10k"
    with pytest.raises(DataError, match="holds fashion-mnist .*, not mnist"):
        resolve_data_dir("mnist", SHARED / "fashion-mnist")
    with pytest.raises(DataError, match="holds the 10,000-image MNIST subset mnist-10k .*, not fashion-mnist"):
        resolve_data_dir("fashion-mnist", SHARED / "mnist-10k")
