"""The data set health report: class balance, sizes, near duplicates (and what to do with
them across splits), blank/tiny images, similar class names, and the page it writes."""

from __future__ import annotations

import json
import logging

import imagehash
import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from taxonomist.data import health
from taxonomist.data.health import analyse, near_pairs, parse_hashes, similar_class_names
from taxonomist.errors import ConfigError, DataError

NO_DUPLICATES = pd.DataFrame(columns=["path", "labels", "split", "sha256", "source_id", "reason", "duplicate_of"])
NO_QUARANTINE = pd.DataFrame(columns=["path", "labels", "source_id", "reason"])


def flip(value: int, *bits: int) -> int:
    """``value`` with the given bits flipped."""
    for bit in bits:
        value ^= 1 << bit
    return value


def hexes(values) -> list[str]:
    return [f"{int(v):016x}" for v in values]


def random_hashes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)


def images_frame(hashes, splits, labels, **columns) -> pd.DataFrame:
    """The frame preprocess hands over: one row per image (sizes 100x100 RGB unless given)."""
    n = len(hashes)
    frame = pd.DataFrame(
        {
            "path": [f"images/{i:05d}.png" for i in range(n)],
            "labels": list(labels) if not isinstance(labels, str) else [labels] * n,
            "split": list(splits) if not isinstance(splits, str) else [splits] * n,
            "source_id": [f"src-{i}" for i in range(n)],
            "sha256": [f"{i:064x}" for i in range(n)],
            "width": 100,
            "height": 100,
            "mode": "RGB",
            "gray": False,
            "blank": False,
            "phash": hexes(hashes),
        }
    )
    for name, values in columns.items():
        frame[name] = values
    return frame


def run(frame: pd.DataFrame, max_distance: int = 2, action: str = "warn", **kw) -> health.Health:
    return analyse(
        frame, kw.get("duplicates", NO_DUPLICATES), kw.get("quarantined", NO_QUARANTINE), max_distance, action
    )


def bits_apart(a: int, b: int) -> int:
    return bin(int(a) ^ int(b)).count("1")


def brute_force(h: np.ndarray, max_distance: int) -> set[tuple[int, int]]:
    """Every pair within ``max_distance``, comparing all of them (uint64 XOR, bytes' set bits)."""
    x = (h[:, None] ^ h[None, :]).view(np.uint8).reshape(len(h), len(h), 8)
    bits = np.unpackbits(x, axis=-1).sum(axis=-1)
    i, j = np.nonzero(np.triu(bits <= max_distance, k=1))
    return set(zip(i.tolist(), j.tolist(), strict=True))


def clustered_hashes(n_bases: int, per_base: int, max_flips: int, seed: int) -> np.ndarray:
    """Random base hashes, each with variants a few flipped bits away."""
    rng = np.random.default_rng(seed)
    out = []
    for base in random_hashes(n_bases, seed):
        for _ in range(per_base):
            out.append(
                flip(int(base), *(int(b) for b in rng.choice(64, rng.integers(0, max_flips + 1), replace=False)))
            )
    return np.array(out, dtype=np.uint64)


# ---------------------------------------------------------------------------- classes


def test_class_counts_and_imbalance_warning():
    splits = ["train"] * 64 + ["val"] * 4 + ["test"] * 4
    labels = ["a"] * 60 + ["b"] * 4 + ["a", "b", "a|b", ""] + ["a", "b", "b", "b"]
    result = run(images_frame(random_hashes(len(splits)), splits, labels))
    s = result.summary
    assert s["imbalance_ratio"] == 15.0
    assert (s["largest_class"], s["largest_class_images"]) == ("a", 60)
    assert (s["smallest_class"], s["smallest_class_images"]) == ("b", 4)
    assert s["unlabelled"] == 1
    counts = result.class_counts
    assert counts.loc["a"].tolist() == [60, 2, 1] and counts.loc["b"].tolist() == [4, 2, 3]  # "a|b" counts for both
    (line,) = [w for w in s["warnings"] if "imbalanced" in w]
    assert "15x" in line and "task.class_weights=balanced" in line and "task.balanced_sampling=true" in line

    balanced = run(images_frame(random_hashes(40), "train", ["a"] * 20 + ["b"] * 20))
    assert balanced.summary["imbalance_ratio"] == 1.0
    assert not any("imbalanced" in w for w in balanced.summary["warnings"])


def test_similar_class_names():
    names = ["Dog", "dog ", "cat", "sea lion", "Sea  Lion", "sea\u00a0lion", "sealion", "bird", "Dog", "birds"]
    assert similar_class_names(names) == [["Dog", "dog "], ["Sea  Lion", "sea lion", "sealion", "sea\u00a0lion"]]
    assert similar_class_names(["a", "b", "a/b", "A/c"]) == []

    result = run(images_frame(random_hashes(6), "train", ["Dog", "dog ", "Dog", "cat", "cat", "dog "]))
    assert result.summary["similar_class_names"] == [["Dog", "dog "]]
    assert any("differ only by case or spaces" in w and "'Dog' / 'dog '" in w for w in result.summary["warnings"])


# ---------------------------------------------------------------------------- the hash search


def test_parse_hashes():
    values, valid = parse_hashes(["ffffffffffffffff", " 00000000000000A1", "", "xyz", "0123456789abcdef0"])
    assert valid.tolist() == [True, True, False, False, False]
    assert values[:2].tolist() == [2**64 - 1, 0xA1]


@pytest.mark.parametrize("max_distance", [0, 1, 2, 3, 5])
def test_near_pairs_finds_distance_up_to_max_and_not_above(max_distance):
    base = 0x9F3A_55C2_0E71_B4D8
    # Variant k flips k bits spread over the whole hash (across the chunk boundaries), disjoint
    # from the other variants' bits.
    spots = iter([0, 63, 21, 22, 42, 43, 10, 31, 52, 5, 15, 37, 58, 27, 48, 2, 19, 33, 45, 61, 7])
    variants = [flip(base, *(next(spots) for _ in range(k))) for k in range(max_distance + 2)]
    far = [int(v) for v in random_hashes(20, seed=max_distance)]
    h = np.array([base, *variants, *far], dtype=np.uint64)
    found = near_pairs(h, max_distance)
    pairs = set(zip(found.first.tolist(), found.second.tolist(), strict=True))
    assert pairs == brute_force(h, max_distance)
    with_base = {j: int(d) for i, j, d in zip(found.first, found.second, found.distance, strict=True) if i == 0}
    assert with_base == {1 + k: k for k in range(max_distance + 1)}  # 0..max_distance found, max_distance + 1 not
    assert found.complete


@pytest.mark.parametrize(("max_distance", "n_bases"), [(2, 150), (6, 150), (12, 60)])
def test_near_pairs_matches_brute_force(max_distance, n_bases):
    # 12 bits: 13 chunks of ~5 bits make buckets of ~30-60, searched by dense blocks.
    h = np.unique(clustered_hashes(n_bases, 8, max_distance + 2, seed=max_distance))
    found = near_pairs(h, max_distance)
    assert found.complete
    assert set(zip(found.first.tolist(), found.second.tolist(), strict=True)) == brute_force(h, max_distance)
    assert all(bits_apart(h[i], h[j]) == d for i, j, d in zip(*found[:3], strict=True))


def test_near_pairs_caps():
    h = np.unique(clustered_hashes(100, 8, 6, seed=3))
    exact = brute_force(h, 6)
    comparisons = len(h) * (len(h) - 1) // 2
    # Over the budget but all pairs fit it: compared all at once, still complete.
    all_pairs = near_pairs(h, 6, budget=comparisons)
    assert all_pairs.complete and set(zip(all_pairs.first.tolist(), all_pairs.second.tolist(), strict=True)) == exact
    # Neither fits: each hash is compared with its nearest in value only, and says so.
    window = near_pairs(h, 6, budget=20)
    assert window.capped == "window"
    assert set(zip(window.first.tolist(), window.second.tolist(), strict=True)) <= exact
    # Too many pairs: the nearest are kept.
    few = near_pairs(h, 6, max_pairs=50)
    assert few.capped == "pairs" and len(few.first) == 50
    assert set(zip(few.first.tolist(), few.second.tolist(), strict=True)) <= exact
    assert sorted(few.distance.tolist()) == sorted(bits_apart(h[i], h[j]) for i, j in exact)[:50]


def test_nearest_pairs_keeps_the_nearest_in_memory_bounded_by_the_limit():
    """The capped search keeps the ``limit`` nearest pairs of all it found (equally near ones:
    the first found) without ever holding much more than the limit."""
    rng = np.random.default_rng(5)
    limit, batches = 1_000, [rng.integers(0, 7, size) for size in rng.integers(0, 400, 60)]
    nearest = health._NearestPairs(limit)
    keys = np.arange(sum(len(b) for b in batches), dtype=np.int64)[::-1]  # keys in the reverse of the order added
    at = 0
    for dist in batches:
        nearest.add(keys[at : at + len(dist)], dist.astype(np.uint8))
        at += len(dist)
        assert nearest.held <= limit + limit // 2 + len(dist)
    got_keys, got_dist, capped = nearest.result()
    everything = np.concatenate(batches)
    first = np.argsort(everything, kind="stable")[:limit]  # nearest first, then in the order added
    order = np.argsort(keys[first])
    assert capped == "pairs"
    assert got_keys.tolist() == keys[first][order].tolist()
    assert got_dist.tolist() == everything[first][order].tolist()
    few = health._NearestPairs(limit)
    few.add(keys[:10], np.zeros(10, np.uint8))
    assert few.result()[2] == "" and few.result()[0].tolist() == sorted(keys[:10].tolist())


def test_popcount_without_numpy_2(monkeypatch):
    h = random_hashes(200, seed=2)
    expected = [bin(int(v)).count("1") for v in h]
    monkeypatch.delattr(np, "bitwise_count", raising=False)  # numpy < 2 has no bitwise_count
    assert health._popcount(h).tolist() == expected
    assert health._popcount(h[:, None] ^ h[None, :3]).shape == (200, 3)


def test_scale_20000_random_hashes():
    h = random_hashes(20_000, seed=7)
    h[1::4000] = [flip(int(v), 3, 40) for v in h[0::4000]]  # 5 planted pairs, 2 bits apart
    splits = np.array(["train", "val", "test"])[np.arange(20_000) % 3]
    result = run(images_frame(h, splits, "x"))
    nd = result.summary["near_duplicates"]
    assert (nd["searched"], nd["distinct_hashes"], nd["pairs"]) == (20_000, 20_000, 5)
    assert sorted(result.pairs["distance"]) == [2] * 5


def test_real_phash_of_an_edited_copy_is_a_near_duplicate():
    def picture(seed: int) -> Image.Image:
        rng = np.random.default_rng(seed)
        img = Image.new("RGB", (96, 96), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x, y = rng.integers(0, 80, 2)
            draw.ellipse(
                [int(x), int(y), int(x) + 30, int(y) + 20], fill=tuple(int(c) for c in rng.integers(0, 256, 3))
            )
        return img

    original = picture(1)
    edited = ImageEnhance.Brightness(original.resize((120, 120))).enhance(1.05)  # resized, a little brighter
    frame = images_frame([0, 0, 0], ["train", "test", "test"], "x")
    frame["phash"] = [str(imagehash.phash(img)) for img in (original, edited, picture(2))]
    result = run(frame)
    assert result.pairs[["path_a", "path_b"]].values.tolist() == [["images/00000.png", "images/00001.png"]]


# ---------------------------------------------------------------------------- near duplicates in the data


def near_duplicate_set() -> pd.DataFrame:
    """Pairs: train~test (1 bit), train~train (2 bits), val~test (2 bits, different labels),
    train~val (0 bits), val~test 3 bits apart (not a near duplicate at distance 2)."""
    a, b, c, d, e = (int(v) for v in random_hashes(5, seed=11))
    hashes = [a, flip(a, 9), b, flip(b, 1, 60), c, flip(c, 30, 31), d, d, e, flip(e, 0, 20, 40)]
    splits = ["train", "test", "train", "train", "val", "test", "train", "val", "val", "test"]
    labels = ["cat", "cat", "dog", "dog", "cat", "dog", "dog", "dog", "cat", "cat"]
    return images_frame(hashes, splits, labels)


def test_near_duplicates_within_and_across_splits():
    result = run(near_duplicate_set())
    nd = result.summary["near_duplicates"]
    assert nd["by_split_pair"] == {"train-train": 1, "train-val": 1, "train-test": 1, "val-test": 1}
    assert (nd["pairs"], nd["cross_split"], nd["conflicting"]) == (4, 3, 1)
    listed = {(r.source_a, r.source_b): r.distance for r in result.pairs.itertuples()}
    assert listed == {("src-0", "src-1"): 1, ("src-2", "src-3"): 2, ("src-4", "src-5"): 2, ("src-6", "src-7"): 0}
    assert result.drop == []


def test_conflicting_near_duplicates_are_listed_separately():
    result = run(near_duplicate_set())
    conflicting = result.pairs[result.pairs["conflicting"]]
    assert conflicting[["source_a", "source_b", "labels_a", "labels_b"]].values.tolist() == [
        ["src-4", "src-5", "cat", "dog"]
    ]
    assert "1 near-duplicate pair with different labels (likely label noise)" in result.summary["warnings"]


def test_action_warn_logs_and_keeps(caplog):
    with caplog.at_level(logging.WARNING, logger="taxonomist.data.health"):
        result = run(near_duplicate_set(), action="warn")
    assert result.drop == []
    assert any("3 near-duplicate pairs across splits" in r.getMessage() for r in caplog.records)
    cross = result.pairs["split_a"] != result.pairs["split_b"]
    assert set(result.pairs.loc[cross, "action"]) == {"warned"}
    assert set(result.pairs.loc[~cross, "action"]) == {"kept (same split)"}
    assert result.summary["images"] == 10


def test_action_drop_removes_the_train_copy():
    frame = near_duplicate_set()
    result = run(frame, action="drop")
    # train~test and train~val: the train copy; val~test: the val copy; train~train: nothing.
    assert result.drop == ["images/00000.png", "images/00004.png", "images/00006.png"]
    s = result.summary
    assert s["near_duplicates"]["dropped"] == 3 and s["images"] == 7
    assert s["per_split"] == {"train": 2, "val": 2, "test": 3}
    assert "dropped 3 train/val copies" in s["warnings"][0]
    assert result.class_counts["train"].sum() == 2  # the report describes the images left


def test_action_drop_with_a_shared_hash_drops_every_train_copy():
    h = int(random_hashes(1, seed=5)[0])
    frame = images_frame([h] * 5, ["train", "train", "val", "test", "test"], "x")
    result = run(frame, action="drop")
    assert result.drop == ["images/00000.png", "images/00001.png", "images/00002.png"]


def test_action_fail_raises_one_line_naming_the_config_key():
    with pytest.raises(DataError) as err:
        run(near_duplicate_set(), action="fail")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("3 near-duplicate image pairs across splits")
    assert "train-val 1, train-test 1, val-test 1" in message
    assert "src-6 ~ src-7 (0 bits apart); src-0 ~ src-1 (1 bit apart); src-4 ~ src-5 (2 bits apart)" in message
    assert "preprocess.near_duplicates=warn" in message and "preprocess.near_duplicates=drop" in message
    # Within-split near duplicates do not fail.
    frame = near_duplicate_set()
    assert run(frame[frame["split"] == "train"], action="fail").summary["near_duplicates"]["pairs"] == 1


def test_bad_settings():
    with pytest.raises(ConfigError, match=r"preprocess\.near_duplicates"):
        run(near_duplicate_set(), action="delete")
    with pytest.raises(ConfigError, match=r"preprocess\.near_duplicate_distance"):
        run(near_duplicate_set(), max_distance=64)


def test_a_large_group_of_identical_hashes_is_counted_exactly_and_listed_in_part():
    h = int(random_hashes(1, seed=9)[0])
    n = 15  # per split, more than LISTED_PER_HASH
    splits = ["train"] * n + ["val"] * n + ["test"] * n
    labels = ["a", "b", "b"] * n  # a third "a" in each split
    frame = images_frame([h] * (3 * n), splits, labels)
    blank = images_frame([0] * 4, ["train", "val", "test", "test"], "a", blank=True)
    blank["path"] = [f"blank/{i}.png" for i in range(4)]
    result = run(pd.concat([frame, blank], ignore_index=True))
    nd = result.summary["near_duplicates"]
    within, across = n * (n - 1) // 2, n * n
    assert nd["by_split_pair"] == {
        "train-train": within,
        "train-val": across,
        "train-test": across,
        "val-val": within,
        "val-test": across,
        "test-test": within,
    }
    a, b = 3 * n // 3, 3 * n * 2 // 3  # images labelled a and b
    assert nd["conflicting"] == a * b
    assert (
        not nd["all_listed"]
        and len(result.pairs) == (3 * health.LISTED_PER_HASH) * (3 * health.LISTED_PER_HASH - 1) // 2
    )
    assert nd["blank_skipped"] == 4  # blank images are left out (they all hash alike)


def test_pairs_joined_block_by_block_count_and_list_as_in_one_block(monkeypatch):
    """The hash pairs are joined with their images a block at a time (bounded memory): blocks
    of a few pairs give the same counts, listing and leaks as one block of all of them."""
    rng = np.random.default_rng(4)
    h = clustered_hashes(40, 6, max_flips=2, seed=4)
    h = np.r_[h, h[:30]]  # some hashes shared by several images
    frame = images_frame(h, rng.choice(["train", "val", "test"], len(h)), rng.choice(["a", "b"], len(h)))
    monkeypatch.setattr(health, "LISTED_MAX", 60)  # the listing keeps the first 60 of every block's
    whole = run(frame)
    monkeypatch.setattr(health, "PAIR_BLOCK", 7)
    blocks = run(frame)
    assert whole.summary["near_duplicates"]["pairs"] > 100
    assert blocks.summary == whole.summary
    pd.testing.assert_frame_equal(blocks.pairs, whole.pairs)
    assert len(whole.pairs) == 60 and not whole.summary["near_duplicates"]["all_listed"]


def test_images_without_a_hash_are_left_out_and_counted():
    frame = near_duplicate_set()
    frame.loc[0, "phash"] = ""
    result = run(frame)
    assert result.summary["near_duplicates"]["unhashed"] == 1
    assert result.summary["near_duplicates"]["cross_split"] == 2
    assert not any("hash" in w for w in result.summary["warnings"])  # small images are not hashed: no warning


# ---------------------------------------------------------------------------- blank and tiny


def test_blank_and_tiny_images_are_listed():
    n = 20
    sizes = [(200, 150)] * n + [(10, 300), (40, 40), (60, 60), (200, 150)]
    frame = images_frame(random_hashes(len(sizes)), "train", "x")
    frame["width"], frame["height"] = [w for w, _ in sizes], [h for _, h in sizes]
    frame.loc[len(sizes) - 1, "blank"] = True
    result = run(frame)
    flagged = result.flagged.set_index("source_id")["problem"].to_dict()
    # 10 px short side; 40x40 is under 1/16 of the median area (30,000 px), 60x60 is not.
    assert flagged == {"src-20": "tiny", "src-21": "tiny", "src-23": "blank"}
    assert (result.summary["blank"], result.summary["tiny"]) == (1, 2)

    # A set of small images (8x8 digits) is not all tiny.
    digits = images_frame(random_hashes(10), "train", "x", width=8, height=8)
    assert run(digits).summary["tiny"] == 0


# ---------------------------------------------------------------------------- the page


def test_write_produces_the_page_plots_and_tables(tmp_path):
    n = 1_200
    h = random_hashes(n, seed=21)
    h[1] = flip(int(h[0]), 5)  # a train~test pair with different labels
    splits = ["train", "test"] + ["train"] * 1_000 + ["val"] * 98 + ["test"] * 100
    labels = ["cat", "dog"] + ["cat"] * 990 + ["dog"] * 10 + ["cat", "dog"] * 49 + ["cat", "dog"] * 50
    frame = images_frame(h, splits, labels)
    frame.loc[5, ["width", "height", "mode"]] = [4, 4, "L"]
    duplicates = pd.DataFrame(
        {
            "path": ["images/dup.png", "images/c1.png", "images/c2.png"],
            "labels": ["cat", "cat", "dog"],
            "split": ["train", "train", "test"],
            "sha256": ["a", "b", "b"],
            "source_id": ["dup.png", "c1.png", "c2.png"],
            "reason": ["duplicate", *["conflicting labels for identical images"] * 2],
            "duplicate_of": ["images/00002.png", "", ""],
        }
    )
    quarantined = pd.DataFrame(
        {
            "path": ["images/bad.png"],
            "labels": ["cat"],
            "source_id": ["bad.png"],
            "reason": ["cannot decode: truncated"],
        }
    )
    result = run(frame, duplicates=duplicates, quarantined=quarantined)
    json.dumps(result.summary)  # serialisable as is
    s = result.summary
    assert (s["exact_duplicates"], s["conflicting_duplicates"], s["quarantined"]) == (1, 2, 1)

    written = result.write(tmp_path, thumbnail=lambda path: np.full((16, 16, 1), 128, np.uint8))
    names = {p.name for p in written}
    assert names == {
        "health.md",
        "class_counts.png",
        "sizes.png",
        "aspect_ratios.png",
        "modes.png",
        "near_duplicates.png",
        "class_counts.csv",
        "near_duplicates.csv",
        "image_sizes.csv",
    }
    for png in (p for p in written if p.suffix == ".png"):
        with Image.open(png) as img:
            assert img.format == "PNG" and img.width > 100

    page = (tmp_path / "health.md").read_text()
    assert page.startswith("# Data set health\n\n**")
    assert f"**{len(s['warnings'])} warnings**" in page
    for line in s["warnings"]:
        assert f"- {line}" in page
    assert "1,200 images (train 1,001 · val 98 · test 101) in 2 classes" in page
    assert "classes are imbalanced 99x in train (cat 991 vs dog 10)" in page
    assert "| cat     | 991     | 49    | 50     | 1,090   | 90.8%   |" in page  # thousands and percentages
    for png in ("class_counts.png", "sizes.png", "aspect_ratios.png", "modes.png", "near_duplicates.png"):
        assert f"]({png})" in page
    assert "| train–test | 1       | 1                       |" in page
    assert "src-0" in page and "src-1" in page  # pairs are named by source id
    assert "src-5" in page and "4 x 4" in page  # the tiny image
    assert "dup.png" in page and "cannot decode: truncated" in page

    counts = pd.read_csv(tmp_path / "class_counts.csv")
    assert counts.columns.tolist() == ["class", "split", "images"]
    assert counts.set_index(["class", "split"])["images"].to_dict()[("dog", "test")] == 51
    pairs = pd.read_csv(tmp_path / "near_duplicates.csv")
    assert pairs.columns.tolist() == [
        "path_a",
        "path_b",
        "split_a",
        "split_b",
        "labels_a",
        "labels_b",
        "distance",
        "action",
    ]
    assert pairs.values.tolist() == [
        ["images/00000.png", "images/00001.png", "train", "test", "cat", "dog", 1, "warned"]
    ]
    sizes = pd.read_csv(tmp_path / "image_sizes.csv")
    assert sizes.columns.tolist() == ["path", "split", "width", "height", "mode"] and len(sizes) == n


def test_a_clean_data_set_says_so_and_has_no_grid_without_thumbnails(tmp_path):
    h = random_hashes(30, seed=4)
    h[6] = flip(int(h[0]), 17)  # a near duplicate within train, same label: not a warning
    result = run(images_frame(h, ["train", "val", "test"] * 10, ["a", "b"] * 15))
    assert result.summary["warnings"] == []
    assert result.summary["near_duplicates"]["by_split_pair"] == {"train-train": 1}
    written = {p.name for p in result.write(tmp_path)}
    assert "near_duplicates.png" not in written  # no way to make thumbnails: no grid
    page = (tmp_path / "health.md").read_text()
    assert "**No warnings.**" in page and "| train–train | 1 " in page
    assert "near_duplicates.png" not in page
