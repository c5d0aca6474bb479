"""Datasets as flat float tensors with pixels in [0, 1].

* ``digits``: scikit-learn's 8×8 handwritten digits (1,797 images, shipped with
  scikit-learn, so it needs no download); fixed stratified 75/25 train/test split.
* ``mnist`` / ``fashion-mnist``: the four standard IDX files (gzip or raw) read from
  ``data_dir``; with no ``data_dir`` they are downloaded once from the official
  mirrors into the cache (``$GLRNET_CACHE`` or ``~/.cache/glrnet``), each file's MD5
  verified before it is moved into place, so nothing half-written stays there.

``data_dir`` is either the dataset's own folder or a folder holding ``<dataset>/``
(:func:`resolve_data_dir`, the one place that decides). A folder is checked before it is
read: its files against its ``SHA256SUMS`` (when it has one), and its content against the
known checksums of each dataset (:func:`identify_data_dir`: the MD5 of each file's
uncompressed bytes, the same for any compression), so MNIST files asked for as
Fashion-MNIST (or the reverse) are refused with a line naming the folder and what it
holds. Files no checksum knows (a dataset of one's own in the IDX format) are read as
the dataset asked for.

Images can be resized by area averaging (28 → 14 is the seed's 2×2 average pooling).

Splits (``split=``): ``"standard"`` is the dataset's own train/test split (MNIST
60,000/10,000; digits a fixed stratified 75/25); ``"seed"`` pools train and test and
draws a stratified, fixed-seed 60/40 split: 42,000 / 28,000 for MNIST, the scale of the
seed paper's 1680 iterations of batch 25 per epoch. ``val_fraction`` then holds out a
stratified part of *training* for validation; the test part is only for final figures.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}

# (mirrors, {file: md5}) — the checksums torchvision uses for the official files
REMOTE = {
    "mnist": (["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"], {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}),
    "fashion-mnist": (["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"], {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}),
}
# MD5 of each file's *uncompressed* IDX bytes (the same whatever the compression): what a folder holds.
# mnist and fashion-mnist are the official files; mnist-10k is the 10,000-image MNIST subset
# (6,000 / 4,000) the seed's literal reading uses, an MNIST dataset.
CONTENT_MD5 = {
    "mnist": {"train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
              "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
              "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
              "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637"},
    "fashion-mnist": {"train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
                      "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
                      "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
                      "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965"},
    "mnist-10k": {"train-images-idx3-ubyte": "efc4f1046eda0ce68a8f2ef05e9f35a0",
                  "train-labels-idx1-ubyte": "53363bd501fb08e26ecbce88bc111aa9",
                  "t10k-images-idx3-ubyte": "841755e782c6f0f97128fc0bb1f6fc79",
                  "t10k-labels-idx1-ubyte": "fddc1ca1a3e02c559e173c7bbaade04b"},
}
KNOWN_AS = {"mnist": "mnist", "fashion-mnist": "fashion-mnist", "mnist-10k": "mnist"}   # known files → dataset
DATASETS = ("digits", "mnist", "fashion-mnist")
SPLITS = ("standard", "seed")
SEED_SPLIT_TEST_FRACTION = 0.4     # the seed: 42,000 train / 28,000 test of all 70,000 MNIST images
SEED_SPLIT_RANDOM_STATE = 2022     # fixed: the "seed" split is the same everywhere
CLASS_NAMES = {"fashion-mnist": ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                 "Sneaker", "Bag", "Boot"]}


class DataError(ValueError):
    """A dataset could not be found or read; the message names the file and what is wrong."""


@dataclass
class Dataset:
    """Flattened images (N, H·W) in [0, 1] and int64 labels; ``val`` is empty unless asked for."""

    name: str
    image_shape: tuple[int, int]
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    x_val: Tensor | None = None
    y_val: Tensor | None = None
    num_classes: int = 10

    @property
    def in_features(self) -> int:
        return self.image_shape[0] * self.image_shape[1]

    def to(self, device) -> "Dataset":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Dataset(self.name, self.image_shape, *(move(t) for t in (
            self.x_train, self.y_train, self.x_test, self.y_test, self.x_val, self.y_val)), self.num_classes)

    def summary(self) -> str:
        val = 0 if self.x_val is None else len(self.x_val)
        h, w = self.image_shape
        return f"{self.name} {h}×{w}: {len(self.x_train)} train, {val} validation, {len(self.x_test)} test"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    return Path(override or os.environ.get("GLRNET_CACHE") or Path.home() / ".cache" / "glrnet")


def load_dataset(name: str = "digits", data_dir: str | os.PathLike | None = None, image_size: int | None = None,
                 val_fraction: float = 0.0, subset: int | None = None, seed: int = 0,
                 download: bool = True, cache: str | os.PathLike | None = None,
                 split: str = "standard") -> Dataset:
    """Load ``name`` as flat tensors; ``image_size`` resizes (area averaging) to a square.

    ``split``: ``"standard"`` (the dataset's own train/test) or ``"seed"`` (all images
    pooled, stratified fixed-seed 60/40). ``subset`` keeps the first ``subset`` training
    and ``subset // 4`` test images after a seeded shuffle (quick runs); ``val_fraction``
    holds out a stratified part of training (seeded by ``seed``) as ``x_val``/``y_val``.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if name == "digits":
        if data_dir is not None:
            raise DataError(digits_folder_message(data_dir))
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        d = load_digits()
        x = d.images.astype(np.float32) / 16.0
        x_tr, x_te, y_tr, y_te = train_test_split(x, d.target, test_size=0.25, stratify=d.target, random_state=0)
    else:
        folder = (resolve_data_dir(name, data_dir) if data_dir is not None
                  else _download(name, cache_dir(cache), download))
        arrays = read_idx_folder(folder)
        x_tr, y_tr = arrays["train_images"].astype(np.float32) / 255.0, arrays["train_labels"]
        x_te, y_te = arrays["test_images"].astype(np.float32) / 255.0, arrays["test_labels"]
    if split == "seed":
        from sklearn.model_selection import train_test_split
        x_all, y_all = np.concatenate([x_tr, x_te]), np.concatenate([y_tr, y_te])
        x_tr, x_te, y_tr, y_te = train_test_split(x_all, y_all, test_size=SEED_SPLIT_TEST_FRACTION, stratify=y_all,
                                                  random_state=SEED_SPLIT_RANDOM_STATE)
    x_tr, x_te = torch.from_numpy(np.ascontiguousarray(x_tr)), torch.from_numpy(np.ascontiguousarray(x_te))
    y_tr, y_te = torch.from_numpy(np.asarray(y_tr, np.int64)), torch.from_numpy(np.asarray(y_te, np.int64))
    if image_size is not None:
        x_tr, x_te = resize(x_tr, image_size), resize(x_te, image_size)
    shape = tuple(x_tr.shape[1:])
    x_tr, x_te = x_tr.reshape(len(x_tr), -1), x_te.reshape(len(x_te), -1)
    if subset is not None:
        if subset < 10:
            raise DataError(f"subset must be ≥ 10 images, got {subset}")
        g = torch.Generator().manual_seed(seed)
        tr, te = torch.randperm(len(x_tr), generator=g)[:subset], torch.randperm(len(x_te), generator=g)
        te = te[:max(10, subset // 4)]
        x_tr, y_tr, x_te, y_te = x_tr[tr], y_tr[tr], x_te[te], y_te[te]
    ds = Dataset(name, shape, x_tr, y_tr, x_te, y_te)
    if val_fraction > 0:
        from sklearn.model_selection import train_test_split
        idx = np.arange(len(ds.x_train))
        held, classes = int(np.ceil(val_fraction * len(idx))), int(ds.y_train.unique().numel())
        if held < classes:
            raise DataError(f"--val-fraction {val_fraction:g} of {len(idx)} training images holds out {held}, fewer "
                            f"than the {classes} classes a stratified split needs: use more images (--subset) or "
                            "--val-fraction 0")
        tr, va = train_test_split(idx, test_size=val_fraction, stratify=ds.y_train.numpy(), random_state=seed)
        tr, va = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(va))
        ds.x_val, ds.y_val = ds.x_train[va], ds.y_train[va]
        ds.x_train, ds.y_train = ds.x_train[tr], ds.y_train[tr]
    return ds


def load_run_dataset(cfg: dict, dataset: str | None = None, data_dir: str | None = None,
                     image_size: int | None = None, subset: int | None = None, split: str | None = None) -> Dataset:
    """The dataset a saved run (its training config ``cfg``) was trained on; arguments given override it.
    A data folder recorded in ``cfg`` that is gone now is a :class:`DataError` saying so."""
    name = dataset or cfg.get("dataset", "digits")
    trained = cfg.get("dataset")
    if dataset and trained and dataset != trained:
        print(f"glrnet: warning: the run was trained on {trained}, evaluated here on {dataset} "
              "(its images are resized to the model's input; the figures are not the run's test accuracy)",
              file=sys.stderr)
    if data_dir is None and cfg.get("data_dir") and (not dataset or dataset == trained):
        data_dir = cfg["data_dir"]
        if not Path(data_dir).is_dir():
            raise DataError(f"the run was trained on data folder {data_dir}, which is not there now; pass "
                            "--dataset and --data-dir to say where the data is")
    return load_dataset(name, data_dir, image_size or cfg.get("image_size"), subset=subset,
                        split=split or cfg.get("split", "standard"))


def resize(images: Tensor, size: int) -> Tensor:
    """(N, H, W) → (N, size, size) by area averaging (exact 2×2 mean pooling for 28 → 14)."""
    if size < 1:
        raise DataError(f"image size must be ≥ 1, got {size}")
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.adaptive_avg_pool2d(images.unsqueeze(1), size).squeeze(1)


# ---------------------------------------------------------------------- which folder, which dataset
_DIGESTS: dict[tuple, str] = {}   # (kind, path, size, mtime) → hex digest: each file hashed once per process


def _digest(path: Path, kind: str) -> str:
    """``"sha256"`` of the file's bytes on disk, or ``"content-md5"``: MD5 of its uncompressed bytes."""
    st = path.stat()
    key = (kind, str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        if kind == "sha256":
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            _DIGESTS[key] = h.hexdigest()
        else:
            _DIGESTS[key] = hashlib.md5(_read_raw(path), usedforsecurity=False).hexdigest()
    return _DIGESTS[key]


def _idx_paths(folder: Path) -> dict[str, Path]:
    """The IDX files present in ``folder`` (stem → path; .gz preferred, as the reader does)."""
    return {stem: p for stem in IDX_FILES.values() if (p := _find(folder, stem)) is not None}


def verify_sha256sums(folder: str | os.PathLike) -> None:
    """Check the IDX files of ``folder`` against its ``SHA256SUMS`` (``sha256sum -c`` format), if it has one;
    a :class:`DataError` naming the first file that differs."""
    folder = Path(folder)
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        return
    expected = {}
    for line in sums.read_text(errors="replace").splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) == 2:
            expected[parts[1].lstrip("*").strip()] = parts[0].lower()
    for path in _idx_paths(folder).values():
        want = expected.get(path.name)
        if want is not None and _digest(path, "sha256") != want:
            raise DataError(f"{path}: its SHA-256 differs from the one in {sums} (the file was changed or damaged): "
                            "restore it from its source")


def identify_data_dir(folder: str | os.PathLike) -> str | None:
    """Which known dataset the IDX files in ``folder`` are, by the MD5 of their uncompressed content:
    ``"mnist"``, ``"fashion-mnist"``, ``"mnist-10k"`` (an MNIST subset; :data:`KNOWN_AS` maps each to its
    dataset), or ``None`` when no file is known (a dataset of one's own). Files of two datasets in one
    folder are a :class:`DataError`."""
    folder = Path(folder)
    found: dict[str, list[str]] = {}
    for stem, path in _idx_paths(folder).items():
        try:
            digest = _digest(path, "content-md5")
        except DataError:
            continue           # unreadable: the reader names it
        for known, files in CONTENT_MD5.items():
            if files.get(stem) == digest:
                found.setdefault(known, []).append(path.name)
    if len({KNOWN_AS[k] for k in found}) > 1:
        raise DataError(f"data folder {folder} mixes the files of "
                        + " and ".join(f"{k} ({', '.join(v)})" for k, v in found.items())
                        + ": keep each dataset's four files in a folder of its own")
    if not found:
        return None
    return max(found, key=lambda k: len(found[k]))


def _held(known: str) -> str:
    return "the 10,000-image MNIST subset mnist-10k" if known == "mnist-10k" else known


def resolve_data_dir(dataset: str, data_dir: str | os.PathLike) -> Path:
    """The folder that holds ``dataset``'s four IDX files, given ``data_dir``: the dataset's own folder, or
    a folder holding ``<dataset>/`` (``--data-dir ../shared/data/mnist`` and ``--data-dir ../shared/data``
    both mean the MNIST folder). Checked before anything is read: the files against the folder's
    ``SHA256SUMS``, and their content against the known checksums (:func:`identify_data_dir`), so a
    folder of another dataset is a :class:`DataError` naming the folder and what it holds."""
    if dataset not in REMOTE:
        if dataset == "digits":
            raise DataError(digits_folder_message(data_dir))
        raise DataError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    base = Path(data_dir).expanduser()
    if _idx_paths(base) or not (base / dataset).is_dir():
        folder = base                     # the dataset's own folder (or an error naming what it lacks)
    else:
        folder = base / dataset           # a parent holding <dataset>/
    if folder.is_dir() and not _idx_paths(folder):
        others = [d for d in REMOTE if (base / d).is_dir()]
        raise DataError(f"data folder {base} holds neither the four IDX files "
                        f"{', '.join(f'{s}[.gz]' for s in IDX_FILES.values())} nor a folder {dataset}/ with them"
                        + (f" (it holds {', '.join(d + '/' for d in others)})" if others else ""))
    verify_sha256sums(folder)
    known = identify_data_dir(folder)
    if known is not None and KNOWN_AS[known] != dataset:
        raise DataError(f"data folder {folder} holds {_held(known)} (identified by its files' checksums), not "
                        f"{dataset}: pass the {dataset} folder (or a folder holding {dataset}/) as --data-dir, "
                        f"or --dataset {KNOWN_AS[known]}")
    return folder


def digits_folder_message(data_dir: str | os.PathLike) -> str:
    """Why a data folder with the ``digits`` dataset is refused, naming what the folder holds."""
    base = Path(data_dir).expanduser()
    hint = "--dataset mnist or --dataset fashion-mnist"
    try:
        known = identify_data_dir(base) if base.is_dir() else None
    except DataError:
        known = None
    if known is not None:
        holds, hint = f"holds {_held(known)} (identified by its files' checksums)", f"--dataset {KNOWN_AS[known]}"
    elif base.is_dir() and _idx_paths(base):
        holds = "holds IDX files"
    elif base.is_dir() and any((base / d).is_dir() for d in REMOTE):
        holds = "holds " + " and ".join(d + "/" for d in REMOTE if (base / d).is_dir())
    else:
        holds = "is given"
    return (f"--data-dir {data_dir} {holds}, but the dataset is digits (the default; bundled with scikit-learn, "
            f"it reads no folder): add {hint}")


# ---------------------------------------------------------------------- IDX files
def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def read_idx_folder(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read the four standard MNIST-format files (gzip or raw) from ``folder``, checking them."""
    folder = Path(folder)
    wanted = ", ".join(f"{s}[.gz]" for s in IDX_FILES.values())
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist; it should hold the four IDX files "
                        f"{wanted} (download them from http://yann.lecun.com/exdb/mnist/ or "
                        f"https://github.com/zalandoresearch/fashion-mnist, or omit --data-dir to download)")
    out = {}
    for key, stem in IDX_FILES.items():
        path = _find(folder, stem)
        if path is None:
            raise DataError(f"{folder} lacks {stem}[.gz]; a data folder must hold the four IDX files {wanted}")
        out[key] = read_idx(path, expect_dims=3 if key.endswith("images") else 1)
    for split in ("train", "test"):
        n_img, n_lab = len(out[f"{split}_images"]), len(out[f"{split}_labels"])
        if n_img != n_lab:
            raise DataError(f"{folder}: {split} has {n_img} images but {n_lab} labels")
        labels = out[f"{split}_labels"]
        if labels.size and labels.max() > 9:
            raise DataError(f"{folder / IDX_FILES[split + '_labels']}: labels must be 0-9, found {labels.max()}")
    return out


def read_idx(path: str | os.PathLike, expect_dims: int | None = None) -> np.ndarray:
    """Parse one IDX file (unsigned-byte data only, as MNIST uses)."""
    path = Path(path)
    raw = _read_raw(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise DataError(f"{path}: IDX data type 0x{raw[2]:02x} unsupported (expected unsigned byte 0x08)")
    dims = raw[3]
    if expect_dims is not None and dims != expect_dims:
        raise DataError(f"{path}: expected {expect_dims} dimensions, found {dims} (images and labels swapped?)")
    header = 4 + 4 * dims
    if len(raw) < header:
        raise DataError(f"{path}: truncated header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise DataError(f"{path}: header says {shape} = {size} bytes of data, file has {len(raw) - header} "
                        "(truncated or corrupted)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _read_raw(path: Path) -> bytes:
    """The file's IDX bytes (decompressed if it ends in .gz)."""
    try:
        return gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e}); the file is truncated or not gzip") from None


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzip if the name ends in .gz); used by tests and tools."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


# ---------------------------------------------------------------------- download
def md5sum(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(name: str, root: Path, allowed: bool) -> Path:
    mirrors, files = REMOTE[name]
    folder = root / name
    missing = [f for f, md5 in files.items() if not ((folder / f).is_file() and md5sum(folder / f) == md5)]
    if not missing:
        return folder
    if not allowed:
        raise DataError(f"{name} is not in the cache {folder} and downloading is off; pass a data folder "
                        f"holding {', '.join(files)}")
    folder.mkdir(parents=True, exist_ok=True)
    for fname in missing:
        errors = []
        for mirror in mirrors:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{fname}.", suffix=".part")
            os.close(fd)
            try:
                urllib.request.urlretrieve(mirror + fname, tmp)
                got = md5sum(Path(tmp))
                if got != files[fname]:
                    raise DataError(f"checksum mismatch: MD5 {got}, expected {files[fname]}")
                os.replace(tmp, folder / fname)  # atomic: the cache never holds a partial file
                break
            except Exception as e:  # noqa: BLE001 - try the next mirror, report all
                errors.append(f"{mirror}{fname}: {e}")
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            raise DataError(f"could not download {name} file {fname} (no network?):\n  " + "\n  ".join(errors)
                            + "\nPass --data-dir with a folder holding the four IDX files instead.")
    return folder


def describe_datasets(cache: str | os.PathLike | None = None) -> list[dict]:
    """Where each dataset is looked for, and whether it is available right now."""
    rows = [{"name": "digits", "source": "scikit-learn (bundled, 1,797 images of 8×8)", "available": True}]
    for name, (mirrors, files) in REMOTE.items():
        folder = cache_dir(cache) / name
        have = all((folder / f).is_file() for f in files)
        rows.append({"name": name, "source": f"--data-dir DIR with {', '.join(IDX_FILES.values())}[.gz], "
                                              f"or downloaded from {mirrors[0]} into {folder}",
                     "available": have})
    return rows
