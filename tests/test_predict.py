"""``taxonomist predict``: inputs, batches with per-image errors, resumable outputs, and the
limits the served model enforces (taxonomist.predict, taxonomist.export.serving)."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from taxonomist.errors import DataError, RegistryError
from taxonomist.export import registry
from taxonomist.export.onnx import export_onnx
from taxonomist.export.serving import ERROR_COLUMN, Limits
from taxonomist.predict import batch, inputs

CLASSES = ["circle", "square", "triangle"]


def png(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header announcing ``width`` x ``height`` gray pixels, with one tiny data chunk:
    a few hundred bytes that would decode to width x height bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """A packaged model folder (model.onnx + serving.json) of a small random network."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=len(CLASSES), in_chans=3).eval()
    folder = tmp_path_factory.mktemp("dist")
    export_onnx(model, torch.randn(2, 3, 32, 32), folder / "model.onnx")
    settings = {
        "image_size": 32,
        "channels": 3,
        "resize_mode": "squash",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "labels": {"task": "multiclass", "classes": CLASSES, "nodes": []},
        "decision": {"thresholds": []},
        "limits": {"max_pixels": 1_000_000, "max_images": 8, "max_request_mb": 1},
    }
    (folder / "serving.json").write_text(json.dumps(settings))
    return folder


@pytest.fixture(scope="module")
def loaded(dist):
    return registry.load_model(str(dist), dist)


@pytest.fixture
def photos(tmp_path) -> Path:
    """A folder of 12 good PNGs in two sub-folders, plus the bad files a user's folder has."""
    root = tmp_path / "photos"
    for i in range(12):
        (root / f"set{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"set{i % 2}" / f"{i:02d}.png").write_bytes(png(i))
    (root / "bad").mkdir()
    (root / "bad" / "text.png").write_text("this is not an image\n")
    (root / "bad" / "empty.jpg").write_bytes(b"")
    (root / "bad" / "cut.png").write_bytes(png(99)[:200])
    (root / "bad" / "bomb.png").write_bytes(bomb_png(12_000, 12_000))
    (root / ".hidden.png").write_bytes(png(100))
    (root / "notes.txt").write_text("not listed: not an image suffix")
    return root


# --------------------------------------------------------------------------- inputs


def test_inputs_from_a_folder_a_glob_a_list_a_manifest_and_archives(photos, tmp_path):
    found = inputs.expand([str(photos)])
    assert len(found) == 16 and not any(".hidden" in k or k.endswith(".txt") for k in found)
    assert inputs.expand([str(photos / "set0" / "*.png")]) == sorted(str(p) for p in (photos / "set0").glob("*.png"))
    listing = tmp_path / "list.txt"
    listing.write_text("# two images and a missing one\nphotos/set0/00.png\n\nphotos/set1/01.png\nphotos/gone.png\n")
    assert inputs.expand([str(listing)]) == [
        str(tmp_path / "photos/set0/00.png"),
        str(tmp_path / "photos/set1/01.png"),
        str(tmp_path / "photos/gone.png"),
    ]
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame({"image": ["photos/set0/02.png", str(photos / "set1" / "03.png")], "x": [1, 2]}).to_csv(manifest)
    assert inputs.expand([str(manifest)]) == [str(tmp_path / "photos/set0/02.png"), str(photos / "set1" / "03.png")]
    archive = tmp_path / "few.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a/1.png", png(1))
        zf.writestr("__MACOSX/a/._1.png", b"junk")
        zf.writestr("readme.md", "skipped")
    tarball = tmp_path / "few.tar.gz"
    with tarfile.open(tarball, "w:gz") as tf:
        tf.add(photos / "set0" / "00.png", arcname="x/00.png")
    keys = inputs.expand([str(archive), str(tarball), str(archive)])  # a repeated input counts once
    assert keys == [f"{archive}:a/1.png", f"{tarball}:x/00.png"]
    with inputs.ImageReader() as reader:
        assert reader.read(keys[0]) == png(1)
        assert reader.read(keys[1]) == (photos / "set0" / "00.png").read_bytes()


def test_inputs_that_name_nothing_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no images found \(looked for"):
        inputs.expand([str(tmp_path / "empty")])
    with pytest.raises(DataError, match="nope: no such file or folder"):
        inputs.expand([str(tmp_path / "nope")])
    (tmp_path / "m.csv").write_text("name\nx.png\n")
    with pytest.raises(DataError, match="a manifest needs a column of image paths named one of path, image"):
        inputs.expand([str(tmp_path / "m.csv")])


# --------------------------------------------------------------------------- the served model's limits


def test_one_bad_image_gets_an_error_row_and_the_others_are_answered(loaded, photos):
    model, _ = loaded
    names = ["set0/00.png", "bad/text.png", "bad/empty.jpg", "bad/cut.png", "bad/bomb.png", "set1/01.png"]
    out = model.predict(None, pd.DataFrame({"image": [(photos / n).read_bytes() for n in names]}))
    errors = out[ERROR_COLUMN].tolist()
    assert errors[0] == errors[5] == ""
    assert errors[1] == "cannot decode: not an image file (no known image format)"
    assert errors[2] == "cannot decode: empty file (0 bytes)"
    assert errors[3].startswith("cannot decode: ")
    assert errors[4] == "too large: 12000 x 12000 pixels is over the limit of 1,000,000 pixels"
    assert out.loc[[0, 5], "label"].isin(CLASSES).all()
    assert out.loc[1:4, "label"].isna().all() and out.loc[1:4, "score"].isna().all()
    alone = model.predict(None, pd.DataFrame({"image": [(photos / names[5]).read_bytes()]}))
    assert alone.loc[0, "label"] == out.loc[5, "label"]
    assert alone.loc[0, "score"] == pytest.approx(out.loc[5, "score"])


def test_a_request_over_a_limit_is_refused_in_one_line(loaded):
    model, _ = loaded
    assert model.limits == Limits(max_pixels=1_000_000, max_images=8, max_request_mb=1.0)
    cases = [
        (pd.DataFrame({"img": [png(0)]}), "the input needs a column 'image' of encoded images; got columns 'img'"),
        (pd.DataFrame({"image": [3]}), "row 0: 'image' must hold encoded image bytes (base64 in JSON), not int"),
        (pd.DataFrame({"image": ["/etc/passwd"]}), "row 0: 'image' must hold encoded image bytes"),
        (pd.DataFrame({"image": [png(0)] * 9}), "9 images in one request; the limit is 8 (package.serving.max_images)"),
        (pd.DataFrame({"image": [b"x" * 600_000] * 2}), "1.2 MB of images in one request; the limit is 1 MB"),
    ]
    for frame, message in cases:
        with pytest.raises(MlflowException) as caught:
            model.predict(None, frame)
        assert caught.value.get_http_status_code() == 400
        assert caught.value.message.startswith(message) and "\n" not in caught.value.message


def test_requests_keep_within_the_image_and_byte_limits():
    datas = [b"a" * 300, b"b" * 300, b"c" * 900, b"d" * 10, b"e" * 1200, b"f" * 10]  # e: alone, over the limit
    groups = list(batch.requests(list(range(10, 16)), datas, max_images=2, max_bytes=1000))
    assert [where for where, _ in groups] == [[10, 11], [12, 13], [14], [15]]


# --------------------------------------------------------------------------- batch prediction into files


def test_predict_writes_every_file_once_with_top_k_and_errors(loaded, photos, tmp_path):
    model, identity = loaded
    gone = photos / "gone.png"
    keys = [*inputs.expand([str(photos)]), str(gone)]
    out = tmp_path / "out.csv"
    summary = batch.predict_to_file(model, identity, keys, out, "csv", batch_size=5, top_k=2)
    rows = pd.read_csv(out, keep_default_na=False)
    assert rows["path"].tolist() == keys
    assert rows.columns.tolist() == [
        "path",
        "label",
        "score",
        "top1_label",
        "top1_prob",
        "top2_label",
        "top2_prob",
        "error",
    ]
    good = rows[rows["error"] == ""]
    assert len(good) == 12 and (good["label"] == good["top1_label"]).all()
    assert (good["top1_prob"].astype(float) >= good["top2_prob"].astype(float)).all()
    assert (
        rows.set_index("path").loc[str(photos / "gone.png"), "error"]
        == f"cannot read: file not found: {photos / 'gone.png'}"
    )
    assert summary["errors_now"] == 5 and summary["classified_now"] == 17
    record = json.loads((tmp_path / "out.csv.run.json").read_text())
    assert (
        record["complete"] and record["model"] == identity["model"] and record["onnx_sha256"] == identity["onnx_sha256"]
    )


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_a_rerun_resumes_and_gives_what_one_run_gives(loaded, photos, tmp_path, fmt):
    model, identity = loaded
    keys = inputs.expand([str(photos)])
    whole, resumed = tmp_path / f"whole.{fmt}", tmp_path / f"resumed.{fmt}"
    batch.predict_to_file(model, identity, keys, whole, fmt, batch_size=4)
    first = batch.predict_to_file(model, identity, keys[:7], resumed, fmt, batch_size=4)  # "interrupted" after 7
    if fmt != "parquet":  # a crash in the middle of a line: the cut line is dropped and done again
        with open(resumed, "a") as fh:
            fh.write(f"{keys[7]},squa" if fmt == "csv" else '{"path": "' + keys[7])
    again = batch.predict_to_file(model, identity, keys, resumed, fmt, batch_size=4)
    assert first["classified_now"] == 7 and again["resumed_from"] == 7 and again["classified_now"] == len(keys) - 7

    def read(path: Path) -> pd.DataFrame:
        if fmt == "csv":
            return pd.read_csv(path, keep_default_na=False)
        if fmt == "jsonl":
            return pd.read_json(path, lines=True)
        return pd.read_parquet(path)

    pd.testing.assert_frame_equal(read(resumed), read(whole))
    assert not (tmp_path / f"resumed.{fmt}.parts").exists()


def test_an_output_is_never_overwritten_silently(loaded, dist, photos, tmp_path):
    model, identity = loaded
    keys = inputs.expand([str(photos / "set0")])
    mine = tmp_path / "mine.csv"
    mine.write_text("path,label\nx.png,cat\n")
    with pytest.raises(DataError, match=r"mine\.csv exists and no mine\.csv\.run\.json beside it says what wrote it"):
        batch.predict_to_file(model, identity, keys, mine, "csv")
    assert mine.read_text() == "path,label\nx.png,cat\n"
    out = tmp_path / "out.csv"
    batch.predict_to_file(model, identity, keys, out, "csv")
    other = {**identity, "model": "models:/other/3", "onnx_sha256": "0" * 64}
    with pytest.raises(DataError, match=r"out\.csv holds predictions of .*, this run uses models:/other/3"):
        batch.predict_to_file(model, other, keys, out, "csv")
    replaced = batch.predict_to_file(model, other, keys, out, "csv", overwrite=True)
    assert replaced["resumed_from"] == 0 and len(pd.read_csv(out)) == len(keys)


def test_cli_predict_a_folder_into_a_file_and_to_the_console(dist, photos, tmp_path, capsys):
    from taxonomist.cli import main

    out = tmp_path / "p.jsonl"
    assert (
        main(["predict", str(photos / "set1"), str(photos / "bad" / "text.png"), "--model", str(dist), "-o", str(out)])
        == 0
    )
    said = capsys.readouterr().out
    assert f"{out}: 7 image(s), 7 classified now" in said and "1 with an error" in said
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 7 and rows[-1]["error"].startswith("cannot decode: not an image file")
    assert main(["predict", str(photos / "set1" / "01.png"), "--model", str(dist)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{photos / 'set1' / '01.png'}\t") and any(c in line for c in CLASSES)
    assert main(["predict", str(tmp_path / "nope.png"), "--model", str(dist)]) == 2
    assert f"{tmp_path / 'nope.png'}: no such file or folder" in capsys.readouterr().err
    assert main(["predict", str(photos), "--model", str(tmp_path)]) == 2
    assert "not a packaged Taxonomist model" in capsys.readouterr().err


def test_a_missing_alias_is_named_with_the_aliases_that_exist(tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    client.create_registered_model("shapes")
    version = client.create_model_version("shapes", source=str(tmp_path)).version
    client.set_registered_model_alias("shapes", "candidate", version)
    assert registry.resolve_version(client, "models:/shapes@candidate") == ("shapes", str(version))
    with pytest.raises(
        RegistryError, match=r"models:/shapes@champion: shapes has no alias @champion; its aliases: @candidate \(v1\)"
    ):
        registry.resolve_version(client, "models:/shapes@champion")
    with pytest.raises(RegistryError, match="models:/shapes/7: shapes has no version 7 \\(the latest is 1\\)"):
        registry.resolve_version(client, "models:/shapes/7")
    with pytest.raises(RegistryError, match="no registered model 'flowers' \\(registered: shapes\\)"):
        registry.resolve_version(client, "models:/flowers@champion")
