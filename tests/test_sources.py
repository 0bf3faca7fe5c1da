"""Data sources: a folder-per-class tree and Fashion-MNIST (taxonomist.data.sources).

The other formats (nested folders, manifests, archives, Label Studio) are in test_sources_formats.py.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import shutil
import threading
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folder
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from taxonomist.data.manifest import COLUMNS, IMAGES_ARCHIVE, join_labels, pack_images, read_manifest, write_manifest
from taxonomist.data.sources import fashion_mnist as fm
from taxonomist.data.sources import materialise
from taxonomist.data.sources.folder import materialise_folder, scan_folder
from taxonomist.errors import DataError, StageOrderError
from taxonomist.files import sha256_file

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def source_cfg(source: Path | str, task: str = "multiclass", image_root: Path | None = None) -> DictConfig:
    """A whole config with only the keys the readers use."""
    data = {"source": str(source), "format": "auto", "image_root": str(image_root) if image_root else None}
    return OmegaConf.create({"data": data, "task": {"name": task}})


# --------------------------------------------------------------------------- folder source


def test_folder_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=rf"{missing} does not exist"):
        scan_folder(missing)


def test_folder_is_a_file(tmp_path):
    path = tmp_path / "images.zip"
    path.write_bytes(b"PK")
    with pytest.raises(DataError, match=rf"{path} is not a folder"):
        scan_folder(path)


def test_folder_with_empty_class_folder_names_it(tmp_path):
    root = make_image_folder(tmp_path / "src", per_class=2, classes=("a", "b"))
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("not an image")
    expected = rf"class folder\(s\) of data\.source {root} hold no images.*\n  class folder {root / 'empty'}$"
    with pytest.raises(DataError, match=expected):
        scan_folder(root)


def test_folder_reports_every_kind_of_problem_at_once(tmp_path):
    root = make_image_folder(tmp_path / "src", per_class=2, classes=("a", "b", "x|y", "p|q"))
    for empty in ("empty1", "empty2"):
        (root / empty).mkdir()
    with pytest.raises(DataError) as info:
        scan_folder(root)
    message = str(info.value)
    assert message.startswith("4 problems found:\n")
    assert f"2 class folder(s) of data.source {root} hold no images" in message
    assert f"\n  class folder {root / 'empty1'}\n  class folder {root / 'empty2'}\n" in message
    assert "2 folder name(s) of data.source cannot be labels:\n" in message
    assert f"\n  folder {root / 'p|q'}: label 'p|q' contains '|'" in message
    assert f"\n  folder {root / 'x|y'}: label 'x|y' contains '|'" in message


def test_folder_without_class_folders(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "loose.png")
    with pytest.raises(DataError, match=rf"{root} has no class folders"):
        scan_folder(root)


def test_folder_with_a_single_class(tmp_path):
    root = make_image_folder(tmp_path / "src", per_class=3, classes=("only",))
    with pytest.raises(DataError, match=rf"{root} has one class \('only'\)"):
        scan_folder(root)


def test_folder_scan_ignores_hidden_folders_and_non_images(tmp_path):
    root = make_image_folder(tmp_path / "src", per_class=3, classes=("a", "b"))
    (root / ".git").mkdir()
    (root / "a" / "README.txt").write_text("x")
    nested = root / "b" / "sub"
    nested.mkdir()
    Image.new("RGB", (8, 8)).save(nested / "deep.PNG")
    classes = scan_folder(root)
    assert sorted(classes) == ["a", "b"]
    assert len(classes["a"]) == 3
    assert len(classes["b"]) == 4  # nested images count, upper-case suffixes too
    assert nested / "deep.PNG" in classes["b"]


def test_materialise_folder_stages_links_and_packing_hashes_them(tmp_path):
    """Staging reads nothing (each generated name links to the user's file); packing reads
    each image once and returns the hash of its bytes."""
    root = make_image_folder(tmp_path / "src", per_class=6)
    out = tmp_path / "raw"
    records = materialise(source_cfg(root), out)
    hashes = pack_images(out, [r.path for r in records])
    assert len(records) == 18
    assert Counter(r.labels for r in records) == {("circle",): 6, ("square",): 6, ("triangle",): 6}
    assert {r.split for r in records} == {""}  # splits are assigned later, in preprocess
    for r in records:
        copied = out / r.path
        original = root / r.source_id
        assert r.path.startswith("images/")  # generated names, never built from labels
        assert r.labels == (Path(r.source_id).parts[0],)
        assert copied.suffix == original.suffix.lower()
        assert copied.is_symlink() and copied.resolve() == original.resolve()
        assert r.sha256 == ""  # filled in by ingest from the packing
        assert hashes[r.path] == sha256_file(original)
    assert len({r.path for r in records}) == len(records)
    with zipfile.ZipFile(out / IMAGES_ARCHIVE) as zf:
        assert zf.read(records[0].path) == (root / records[0].source_id).read_bytes()


def test_manifest_round_trip(tmp_path):
    root = make_image_folder(tmp_path / "src", per_class=2, classes=("a", "b"))
    records = materialise_folder(source_cfg(root), root, tmp_path / "raw")
    write_manifest(records, tmp_path / "raw")
    frame = read_manifest(tmp_path / "raw")
    assert list(frame.columns) == COLUMNS
    assert frame.to_dict("records") == [{**r.__dict__, "labels": join_labels(r.labels)} for r in records]
    assert (frame["split"] == "").all()  # empty strings survive, not NaN


def test_read_manifest_missing(tmp_path):
    with pytest.raises(StageOrderError, match=r"manifest\.csv not found: run the ingest stage first"):
        read_manifest(tmp_path)


def test_unknown_builtin_source(tmp_path):
    with pytest.raises(DataError, match="unknown built-in dataset 'mnist'"):
        materialise(source_cfg("builtin:mnist"), tmp_path)


# --------------------------------------------------------------------------- Fashion-MNIST

TRAIN_N, TEST_N = 5, 3


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write an IDX image/label pair, gzipped, as Fashion-MNIST ships them."""
    n, rows, cols = images.shape
    header = np.array([2051, n, rows, cols], dtype=">u4").tobytes()
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(header + images.astype(np.uint8).tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(np.array([2049, n], dtype=">u4").tobytes() + labels.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fmnist(tmp_path):
    """A folder with four tiny IDX files (5 train, 3 test images) and the arrays they hold."""
    folder = tmp_path / "fake-fmnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = {
        "train": (rng.integers(0, 256, (TRAIN_N, 28, 28), dtype=np.uint8), np.array([0, 9, 3, 3, 7])),
        "t10k": (rng.integers(0, 256, (TEST_N, 28, 28), dtype=np.uint8), np.array([1, 2, 9])),
    }
    for prefix, (images, labels) in arrays.items():
        write_idx(folder, prefix, images, labels)
    assert sorted(p.name for p in folder.iterdir()) == sorted(fm.FILES)
    return folder, arrays


def fmnist_cfg(builtin_dir: Path, download: bool = False, url: str = "http://127.0.0.1:9/") -> DictConfig:
    """A whole config for the Fashion-MNIST reader (``fm.locate`` takes its ``data`` section)."""
    cfg = source_cfg("builtin:fashion-mnist")
    cfg.data.update(builtin_dir=str(builtin_dir), download=download, download_url=url)
    return cfg


def test_read_idx(fake_fmnist):
    folder, arrays = fake_fmnist
    images, labels = fm.read_idx(folder / "train-images-idx3-ubyte.gz", folder / "train-labels-idx1-ubyte.gz")
    assert images.shape == (TRAIN_N, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(images, arrays["train"][0])
    np.testing.assert_array_equal(labels, arrays["train"][1])


def test_read_idx_rejects_swapped_files(fake_fmnist):
    folder, _ = fake_fmnist
    labels_gz = folder / "train-labels-idx1-ubyte.gz"
    with pytest.raises(DataError, match="not an IDX image file"):
        fm.read_idx(labels_gz, labels_gz)


def test_read_idx_rejects_label_count_mismatch(fake_fmnist):
    folder, _ = fake_fmnist
    with pytest.raises(DataError, match="not an IDX label file matching"):
        fm.read_idx(folder / "train-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte.gz")


def test_read_idx_rejects_truncated_images(fake_fmnist, tmp_path):
    folder, arrays = fake_fmnist
    images, _ = arrays["train"]
    short = tmp_path / "short-images.gz"
    header = np.array([2051, TRAIN_N, 28, 28], dtype=">u4").tobytes()
    with gzip.open(short, "wb") as fh:
        fh.write(header + images.tobytes()[:-100])
    with pytest.raises(DataError, match=rf"{short}: truncated or corrupt"):
        fm.read_idx(short, folder / "train-labels-idx1-ubyte.gz")


def test_read_idx_rejects_tiny_file(fake_fmnist, tmp_path):
    folder, _ = fake_fmnist
    tiny = tmp_path / "tiny.gz"
    with gzip.open(tiny, "wb") as fh:
        fh.write(b"\x00\x00")
    with pytest.raises(DataError, match=rf"{tiny}: not an IDX image file"):
        fm.read_idx(tiny, folder / "train-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match=rf"{tiny}: not an IDX label file"):
        fm.read_idx(folder / "train-images-idx3-ubyte.gz", tiny)


def check_materialised(records, out: Path, arrays) -> None:
    splits = {"train": "train", "test": "t10k"}
    assert Counter(r.split for r in records) == {"train": TRAIN_N, "test": TEST_N}
    for split, prefix in splits.items():
        images, labels = arrays[prefix]
        rows = [r for r in records if r.split == split]
        for idx, r in enumerate(rows):
            assert r.source_id == f"fashion-mnist:{split}:{idx}"
            assert r.labels == (fm.CLASSES[labels[idx]],)
            assert r.path == f"images/{split}/{r.labels[0]}/{split}_{idx:05d}.png"
            assert r.sha256 == sha256_file(out / r.path)
            with Image.open(out / r.path) as img:
                assert img.mode == "L"
                np.testing.assert_array_equal(np.asarray(img), images[idx])  # lossless PNG


def test_materialise_from_builtin_dir(fake_fmnist, tmp_path, monkeypatch):
    folder, arrays = fake_fmnist
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "raw"
    records = materialise(fmnist_cfg(folder, download=False), out)
    check_materialised(records, out, arrays)
    assert not (tmp_path / "data" / "downloads").exists()  # nothing downloaded


def test_missing_data_without_download_tells_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as info:
        fm.locate(fmnist_cfg(empty, download=False).data, download_dir=tmp_path / "dl")
    message = str(info.value)
    assert str(empty) in message
    assert "data.download=false" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert not (tmp_path / "dl").exists()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture
def file_server():
    """Serve a folder over HTTP on 127.0.0.1 (a free port) from a thread; yields a start function."""
    servers: list[http.server.ThreadingHTTPServer] = []
    threads: list[threading.Thread] = []
    requests: list[str] = []

    def start(folder: Path) -> str:
        class Handler(_QuietHandler):
            def do_GET(self):
                requests.append(self.path)
                super().do_GET()

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append(server)
        threads.append(thread)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    start.requests = requests  # type: ignore[attr-defined]
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
    for thread in threads:
        thread.join(timeout=5)


def md5s(folder: Path) -> dict[str, str]:
    return {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in fm.FILES}


def test_download_verifies_md5_and_materialises(fake_fmnist, tmp_path, monkeypatch, file_server):
    folder, arrays = fake_fmnist
    monkeypatch.setattr(fm, "FILES", md5s(folder))
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "not-installed"
    url = file_server(folder)
    out = tmp_path / "raw"
    records = materialise(fmnist_cfg(empty, download=True, url=url), out)
    check_materialised(records, out, arrays)
    downloads = tmp_path / "data" / "downloads" / "fashion-mnist"
    assert sorted(p.name for p in downloads.iterdir()) == sorted(fm.FILES)  # no .part files left
    assert md5s(downloads) == fm.FILES
    assert sorted(file_server.requests) == sorted(f"/{n}" for n in fm.FILES)

    # A second run finds the verified downloads and does not fetch again.
    file_server.requests.clear()
    assert fm.locate(fmnist_cfg(empty, download=True, url=url).data, download_dir=downloads) == downloads
    assert file_server.requests == []


def test_download_checksum_mismatch(fake_fmnist, tmp_path, monkeypatch, file_server):
    folder, _ = fake_fmnist
    expected = md5s(folder)
    expected["t10k-images-idx3-ubyte.gz"] = "0" * 32
    monkeypatch.setattr(fm, "FILES", expected)
    url = file_server(folder)
    dl = tmp_path / "dl"
    with pytest.raises(DataError, match=r"Checksum mismatch for .*t10k-images-idx3-ubyte\.gz.*expected 0{32}"):
        fm.locate(fmnist_cfg(tmp_path / "none", download=True, url=url).data, download_dir=dl)
    assert not (dl / "t10k-images-idx3-ubyte.gz").exists()
    assert not list(dl.glob("*.part"))


def test_real_checksums_reject_fake_files(fake_fmnist, tmp_path, file_server):
    # With the published MD5s, files that are not the real dataset are refused.
    folder, _ = fake_fmnist
    url = file_server(folder)
    with pytest.raises(DataError, match="Checksum mismatch"):
        fm.locate(fmnist_cfg(tmp_path / "none", download=True, url=url).data, download_dir=tmp_path / "dl")


def test_download_http_error_is_a_source_error(fake_fmnist, tmp_path, monkeypatch, file_server):
    folder, _ = fake_fmnist
    monkeypatch.setattr(fm, "FILES", md5s(folder))
    served = tmp_path / "served"
    shutil.copytree(folder, served)
    (served / "train-labels-idx1-ubyte.gz").unlink()  # -> HTTP 404
    url = file_server(served)
    with pytest.raises(DataError, match=r"Could not download .*train-labels-idx1-ubyte\.gz.*apt-get"):
        fm.locate(fmnist_cfg(tmp_path / "none", download=True, url=url).data, download_dir=tmp_path / "dl")
    assert not list((tmp_path / "dl").glob("*.part"))


@pytest.mark.skipif(not REAL_FASHION_MNIST.is_dir(), reason=f"{REAL_FASHION_MNIST} is absent (dataset-fashion-mnist)")
def test_read_idx_on_real_fashion_mnist():
    images, labels = fm.read_idx(
        REAL_FASHION_MNIST / "train-images-idx3-ubyte.gz", REAL_FASHION_MNIST / "train-labels-idx1-ubyte.gz"
    )
    assert images.shape == (60000, 28, 28)
    assert images.dtype == np.uint8
    assert labels.shape == (60000,)
    assert sorted(np.unique(labels).tolist()) == list(range(10))
    assert np.bincount(labels).tolist() == [6000] * 10


def test_ctrl_c_during_ingest_keeps_the_previous_raw_data(tmp_path, monkeypatch):
    from conftest import REPO, tiny_overrides

    from taxonomist.config import compose
    from taxonomist.stages import ingest

    source = make_image_folder(tmp_path / "shapes", per_class=6)
    cfg = compose(tiny_overrides(source), conf_dir=REPO / "conf")
    raw = tmp_path / "data" / "raw"
    ingest.run(cfg, out_dir=raw)
    before = {p.name: p.read_bytes() for p in raw.iterdir()}
    shutil.copyfile(sorted((source / "square").iterdir())[0], source / "circle" / "new.png")  # the source changed

    def interrupted(folder: Path, *args, **kwargs):
        (folder / "images.zip").write_bytes(b"half a zip")  # Ctrl-C while the new archive is written
        raise KeyboardInterrupt

    monkeypatch.setattr(ingest, "pack_images", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ingest.run(cfg, out_dir=raw)
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == before
    assert not [p for p in raw.parent.iterdir() if p.name.startswith(".raw")]
