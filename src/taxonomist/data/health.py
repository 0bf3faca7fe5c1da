"""The data set health report: what a person should know about the images before training.

Preprocess describes every image it keeps (size, mode, gray, blank, perceptual hash) and calls
:func:`analyse`, which returns a :class:`Health`: a compact JSON ``summary`` for
``report.json``, the paths to ``drop`` (near duplicates across splits, with
``preprocess.near_duplicates=drop``), and :meth:`Health.write`, which writes ``health.md`` (a
page: the verdict first, then a section per topic, with PNG plots) and the CSVs behind it.

What it looks at:

* images per class and split, and the class imbalance of the train split;
* image sizes, aspect ratios and PIL modes;
* near duplicates: images whose 64-bit pHashes differ in at most ``max_distance`` bits, within
  and across splits (:func:`near_pairs` finds them without comparing every pair). Across splits
  they leak test images into training: ``action`` "warn" lists them, "drop" drops the train copy
  of each pair (the val copy of a val-test pair, so the test split stays intact) and "fail"
  raises :class:`~taxonomist.errors.DataError`. Near duplicates with different labels are
  likely label noise;
* blank and tiny images, the exact duplicates and undecodable images preprocess removed, and
  class names that differ only by case or spaces (:func:`similar_class_names`).
"""

from __future__ import annotations

import io
import logging
import time
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from taxonomist.data.manifest import SPLITS, split_labels
from taxonomist.errors import ConfigError, DataError
from taxonomist.files import atomic_write_bytes, atomic_write_csv, atomic_write_text

log = logging.getLogger(__name__)

ACTIONS = ("warn", "drop", "fail")
HASH_BITS = 64
PHASH_SIDE = 32  # pHash hashes a 32x32 thumbnail: smaller images are scaled up
IMBALANCE_WARN = 10.0  # largest / smallest class in train above this: a warning
# Tiny: under 16 px on the short side while typical images are larger (a set of 8x8 digits is
# not all tiny), or under 1/16 of the median area (a quarter of the typical side).
TINY_SIDE = 16
TINY_AREA_FRACTION = 1 / 16
SEARCH_BUDGET = 200_000_000  # hash comparisons (~1-2 s) before the near-duplicate search is capped
MAX_PAIRS = 500_000  # pairs of distinct hashes kept (the nearest): more means the distance is too loose
SMALL_BUCKET = 48  # buckets up to this size are searched by offset, larger ones by dense blocks
BLOCK_CELLS = 2_000_000  # hash comparisons per dense block ...
BAND_ROWS = 256  # ... of at most this many rows
LISTED_PER_HASH = 10  # images per (hash, split) whose pairs are listed (all pairs are counted)
LISTED_MAX = 50_000  # pairs in near_duplicates.csv (cross-split and conflicting ones first)
PAIR_BLOCK = 16_384  # hash pairs joined with their images at a time
SHOWN = 20  # rows of a table on the page
PLOTTED_CLASSES = 40  # bars per split in class_counts.png (the most and the least frequent)
GRID_PAIRS = 8  # example pairs in near_duplicates.png
NO_LABEL = "(none)"
IMAGE_COLUMNS = ("path", "labels", "split", "source_id", "width", "height", "mode", "gray", "blank", "phash")

Thumbnail = Callable[[str], np.ndarray]  # an image's path -> (H, W, C) uint8 pixels


# ---------------------------------------------------------------------------- near duplicates


class HashPairs(NamedTuple):
    """Index pairs ``first[k] < second[k]`` of hashes that differ in ``distance[k]`` bits.

    ``capped`` says why some pairs may be missing: "" (none are), "window" (huge buckets were
    searched only near each hash) or "pairs" (more than the maximum were found: the nearest
    are kept)."""

    first: np.ndarray
    second: np.ndarray
    distance: np.ndarray
    capped: str = ""

    @property
    def complete(self) -> bool:
        """True when every pair within the distance is here."""
        return not self.capped


_BYTE_BITS = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (numpy >= 2 has it built in)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    x = np.ascontiguousarray(x, dtype=np.uint64)
    return _BYTE_BITS[x.view(np.uint8).reshape(*x.shape, 8)].sum(axis=-1, dtype=np.uint8)


def parse_hashes(values: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """Hex pHashes (16 digits) as uint64, and a mask of the values that are such hashes
    (others are 0 in the first array)."""
    # A Series stays in its own dtype: pandas' text (Arrow) is parsed without a Python string each.
    text = values if isinstance(values, pd.Series) else pd.Series(list(values), dtype=object)
    text = text.astype(str).str.strip().str.lower()
    valid = text.str.fullmatch(r"[0-9a-f]{16}").to_numpy(dtype=bool)
    hashes = np.zeros(len(text), dtype=np.uint64)
    if valid.any():
        hashes[valid] = np.frombuffer(bytes.fromhex(text[valid].str.cat()), dtype=">u8").astype(np.uint64)
    return hashes, valid


def _chunk_keys(hashes: np.ndarray, max_distance: int) -> list[np.ndarray]:
    """The hashes cut into ``max_distance + 1`` chunks of (nearly) equal width, one key array each."""
    parts = max_distance + 1
    widths = [HASH_BITS // parts + (k < HASH_BITS % parts) for k in range(parts)]
    keys, shift = [], 0
    for width in widths:
        keys.append(hashes if width == HASH_BITS else (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1))
        shift += width
    return keys


def _pairs_within(sizes: np.ndarray, window: int | None) -> int:
    """Comparisons of each member of buckets of ``sizes`` with its next ``window`` (None: all)."""
    sizes = sizes.astype(np.int64)
    full = sizes * (sizes - 1) // 2
    if window is None:
        return int(full.sum())
    capped = window * sizes - window * (window + 1) // 2
    return int(np.where(sizes - 1 <= window, full, capped).sum())


def near_pairs(
    hashes: np.ndarray, max_distance: int, budget: int = SEARCH_BUDGET, max_pairs: int = MAX_PAIRS
) -> HashPairs:
    """Every index pair (i < j) of ``hashes`` (uint64) that differ in at most ``max_distance`` bits.

    Multi-index search instead of comparing all n²/2 pairs: the 64 bits are cut into
    ``max_distance + 1`` chunks, and by the pigeonhole principle two hashes within
    ``max_distance`` bits agree exactly on at least one chunk. So for each chunk the hashes are
    sorted by (chunk, hash), and each is compared (popcount of the XOR) with the following ones
    of its bucket (the hashes with the same chunk): in small buckets all at once by offset, in
    large ones by blocks of a dense comparison. Random hashes make buckets of ~1 and the
    search linear (70,000 take ~0.1 s at distance 2).

    Uneven hashes or a large ``max_distance`` (short chunks) make large buckets. When the search
    would take more than ``budget`` comparisons, all pairs are compared instead if that fits
    the budget (small sets); otherwise each hash is compared with only as many of the following
    hashes of its bucket (the nearest in value) as the budget allows (``capped="window"``).
    Of more than ``max_pairs`` pairs (a distance so large it matches unrelated images), the
    ``max_pairs`` nearest are returned (``capped="pairs"``; among equally near ones, those
    found first), kept as the search goes so its memory does not grow with the pairs found.
    """
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(h)
    if n < 2:
        return _no_pairs()
    buckets = []
    chunk_keys = _chunk_keys(h, max_distance)
    for key in chunk_keys:
        order = np.lexsort((h, key))
        k = key[order]
        bounds = np.flatnonzero(np.r_[True, k[1:] != k[:-1], True])
        buckets.append((order, bounds, np.diff(bounds)))
    window: int | None = None
    if sum(_pairs_within(sizes, None) for _, _, sizes in buckets) > budget:
        if n * (n - 1) // 2 <= budget:
            return _all_pairs(h, max_distance)
        low, high = 1, max(int(sizes.max()) for _, _, sizes in buckets)
        while low < high:  # the widest window within the budget (at least 1)
            mid = (low + high + 1) // 2
            if sum(_pairs_within(sizes, mid) for _, _, sizes in buckets) <= budget:
                low = mid
            else:
                high = mid - 1
        window = low
    # Each pair is kept as one int64, lo * n + hi, and its distance as a byte; a pair whose hashes
    # agree on an earlier chunk was looked for there, so each pair is kept once, without a sort.
    # (Under a window the earlier chunk may have passed it by: one more pair the capped search misses.)
    nearest = _NearestPairs(max_pairs)

    def keep(i: np.ndarray, j: np.ndarray, dist: np.ndarray, chunk: int) -> None:
        new = np.ones(len(i), dtype=bool)
        for earlier in chunk_keys[:chunk]:
            new &= earlier[i] != earlier[j]
        i, j = i[new], j[new]
        nearest.add(np.minimum(i, j) * n + np.maximum(i, j), dist[new].astype(np.uint8))

    for chunk, (order, bounds, sizes) in enumerate(buckets):
        sorted_h = h[order]
        # Small buckets: every hash against the one `step` places on, for all buckets at once.
        end = np.repeat(bounds[1:], sizes)  # where each sorted position's bucket ends
        active = np.flatnonzero((end - np.arange(n) >= 2) & (np.repeat(sizes, sizes) <= SMALL_BUCKET))
        step = 1
        while active.size and (window is None or step <= window):
            active = active[active + step < end[active]]
            dist = _popcount(sorted_h[active] ^ sorted_h[active + step])
            hit = active[dist <= max_distance]
            keep(order[hit], order[hit + step], dist[dist <= max_distance], chunk)
            step += 1
        # Large buckets: dense blocks.
        for start, size in zip(bounds[:-1][sizes > SMALL_BUCKET], sizes[sizes > SMALL_BUCKET], strict=True):
            i, j, dist = _band_pairs(sorted_h[start : start + size], max_distance, window)
            keep(order[start + i], order[start + j], dist, chunk)
    keys, dist, capped = nearest.result()
    return HashPairs(keys // n, keys % n, dist, capped or ("" if window is None else "window"))


class _NearestPairs:
    """The ``limit`` nearest pairs (int64 keys, uint8 distances) of those added (ranked by distance,
    then by the order added), in memory bounded by ``limit``: what is added is held until it
    passes 1.5 ``limit``, then only the ``limit`` nearest stay and a pair added later has to be
    nearer than the farthest of them. (Keeping every pair found and sorting them at the end
    took 75 MB at 100,000 clustered hashes and grew with the pairs found.)"""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.keys: list[np.ndarray] = []
        self.dist: list[np.ndarray] = []
        self.held = 0
        self.below: int | None = None  # once over the limit: only pairs nearer than this are taken

    def add(self, keys: np.ndarray, dist: np.ndarray) -> None:
        """Take the pairs ``keys`` at ``dist`` bits."""
        if self.below is not None:
            nearer = dist < self.below
            keys, dist = keys[nearer], dist[nearer]
        if not len(keys):
            return
        self.keys.append(keys)
        self.dist.append(dist)
        self.held += len(keys)
        if self.held > self.limit + self.limit // 2:
            self._keep_nearest()

    def _keep_nearest(self) -> None:
        keys, dist = np.concatenate(self.keys), np.concatenate(self.dist)
        self.keys, self.dist = [], []  # (the pieces go before the selection is made)
        if len(keys) > self.limit:
            cumulative = np.cumsum(np.bincount(dist))
            farthest = int(np.searchsorted(cumulative, self.limit))  # the distance the limit falls on
            room = self.limit - (int(cumulative[farthest - 1]) if farthest else 0)
            kept = dist < farthest
            kept[np.flatnonzero(dist == farthest)[:room]] = True  # of the equally far: the first added
            keys, dist = keys[kept], dist[kept]
            self.below = farthest
        self.keys, self.dist, self.held = [keys], [dist], len(keys)

    def result(self) -> tuple[np.ndarray, np.ndarray, str]:
        """The pairs kept, sorted by key, and "pairs" when more than ``limit`` were added."""
        if not self.keys:
            return np.zeros(0, np.int64), np.zeros(0, np.uint8), ""
        self._keep_nearest()
        order = np.argsort(self.keys[0], kind="stable")
        return self.keys[0][order], self.dist[0][order], "" if self.below is None else "pairs"


def _no_pairs() -> HashPairs:
    none = np.zeros(0, dtype=np.int64)
    return HashPairs(none, none, np.zeros(0, dtype=np.uint8))


def _band_pairs(h: np.ndarray, max_distance: int, window: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j <= i + window) of ``h`` within ``max_distance`` bits, by dense blocks of
    at most :data:`BAND_ROWS` rows (a block computes a little of the lower triangle too)."""
    n = len(h)
    window = n if window is None else min(window, n)
    rows = max(1, min(BAND_ROWS, BLOCK_CELLS // (window + BAND_ROWS)))
    firsts, seconds, distances = [], [], []
    for start in range(0, n - 1, rows):
        stop = min(n - 1, start + rows)
        dist = _popcount(h[start:stop, None] ^ h[None, start + 1 : min(n, stop + window)])
        hit = dist <= max_distance
        if not hit.any():
            continue
        r, c = np.divmod(np.flatnonzero(hit), hit.shape[1])  # column c is hash start + 1 + c
        i, j = start + r, start + 1 + c
        keep = (j > i) & (j - i <= window)
        firsts.append(i[keep])
        seconds.append(j[keep])
        distances.append(dist[r[keep], c[keep]])
    if not firsts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8)
    return np.concatenate(firsts), np.concatenate(seconds), np.concatenate(distances)


def _all_pairs(h: np.ndarray, max_distance: int) -> HashPairs:
    """Compare every pair (for small sets with a large distance)."""
    i, j, dist = _band_pairs(h, max_distance, None)
    return HashPairs(i.astype(np.int64), j.astype(np.int64), dist.astype(np.uint8))


@dataclass
class _NearDuplicates:
    """What the near-duplicate search found (images are rows of the analysed frame)."""

    counts: pd.DataFrame  # split_a, split_b, pairs, conflicting (every pair counted)
    listed: pd.DataFrame  # the near_duplicates.csv columns + source_a, source_b, conflicting
    leaky: np.ndarray  # bool per image: it has a near duplicate in a later split (train < val < test)
    searched: int  # images searched (decoded, not blank, with a valid hash)
    distinct: int  # distinct hashes among them
    blank: int  # blank images left out
    unhashed: int  # images without a valid hash, left out
    capped: str  # why some pairs may be missing: "" (none are), "window" or "pairs" (see HashPairs)
    all_listed: bool  # False: not every pair is in ``listed``
    seconds: float = 0.0


def _label_key(text: str) -> str:
    """A label set in a canonical form: "b|a" and "a|b" are the same labels."""
    return "|".join(sorted(set(split_labels(text))))


def _label_codes(labels: pd.Series) -> np.ndarray:
    """An integer code per image for its label set (:func:`_label_key`; -1: missing), numbered
    in order of first appearance; computed on the few distinct cells, not on every image's text."""
    codes, cells = pd.factorize(labels.astype(str))
    per_cell = pd.factorize(pd.Series([_label_key(cell) for cell in cells], dtype=object))[0]
    return np.where(codes >= 0, per_cell[np.maximum(codes, 0)], -1) if len(cells) else codes


def _find_near_duplicates(images: pd.DataFrame, split_code: np.ndarray, max_distance: int) -> _NearDuplicates:
    """Near-duplicate pairs of ``images``: counted exactly by split pair, listed up to a cap."""
    started = time.perf_counter()
    hashes, valid = parse_hashes(images["phash"])
    blank = images["blank"].to_numpy(dtype=bool)
    rows = np.flatnonzero(valid & ~blank)
    unique, inverse = np.unique(hashes[rows], return_inverse=True)
    inverse = inverse.reshape(-1)
    found = near_pairs(unique, max_distance)

    # Pairs of distinct hashes, plus each hash shared by several images paired with itself.
    per_hash = np.bincount(inverse, minlength=len(unique))
    shared = np.flatnonzero(per_hash >= 2)
    hash_pairs = pd.DataFrame(
        {
            "a": np.r_[found.first, shared],
            "b": np.r_[found.second, shared],
            "distance": np.r_[found.distance, np.zeros(len(shared), np.uint8)].astype(int),
        }
    )
    capped = found.capped
    del found, shared  # (the pairs are in hash_pairs now)
    first, second = hash_pairs["a"].to_numpy(), hash_pairs["b"].to_numpy()  # (a hash with itself adds nothing)
    label_code = _label_codes(images["labels"])

    # An image is leaky when an image of a later split has its hash or a near one.
    split_rows = split_code[rows]
    present = np.zeros((len(unique), len(SPLITS)), dtype=bool)
    present[inverse, split_rows] = True
    near = present.copy()
    for k in range(len(SPLITS)):  # near[i] |= present[j] for every pair (i, j), both ways
        near[:, k] |= np.bincount(first, weights=present[second, k], minlength=len(unique)) > 0
        near[:, k] |= np.bincount(second, weights=present[first, k], minlength=len(unique)) > 0
    later = np.fliplr(np.cumsum(np.fliplr(near), axis=1) > 0)  # a copy in this split or a later one
    later = np.c_[later[:, 1:], np.zeros(len(unique), dtype=bool)]  # ... in a later one only
    leaky = np.zeros(len(images), dtype=bool)
    leaky[rows] = later[inverse, split_rows]
    del present, near, later

    # Only the images whose hash is in a pair matter from here on.
    paired = np.zeros(len(unique), dtype=bool)
    paired[first] = True
    paired[second] = True
    del first, second
    inside = paired[inverse]
    members = pd.DataFrame(
        {"row": rows[inside], "u": inverse[inside], "s": split_rows[inside], "l": label_code[rows[inside]]}
    )

    # Exact counts from groups of images with the same (hash, split, labels): a group pair
    # holds c1 * c2 image pairs (c * (c - 1) / 2 within one group). The hash pairs are joined
    # with their groups (and images) a block at a time, so the memory this takes does not grow
    # with the number of pairs (up to MAX_PAIRS of them, each joined with several groups).
    groups = members.groupby(["u", "s", "l"]).size().rename("c").reset_index()
    # The listed pairs: up to LISTED_PER_HASH images per (hash, split), different labels first.
    rank = members.groupby(["u", "s", "l"]).cumcount()  # members are in row order
    members = members.assign(rank=rank).sort_values(["u", "s", "rank", "row"])
    keep = members.groupby(["u", "s"]).cumcount() < LISTED_PER_HASH
    all_listed = bool(keep.all())
    m = members.loc[keep, ["row", "u"]]
    del members, rank, keep
    path_rank = np.empty(len(images), dtype=np.int64)  # sorted in pandas' (Arrow) text, not as Python strings
    path_rank[images["path"].argsort(kind="stable").to_numpy()] = np.arange(len(images))
    per_block = [_no_counts()]
    best = _PairKeys.none()
    candidates = 0
    for start in range(0, len(hash_pairs), PAIR_BLOCK):
        block = hash_pairs.iloc[start : start + PAIR_BLOCK]
        per_block.append(_pair_counts(block, groups))  # a row per split pair
        p = block.merge(m, left_on="a", right_on="u").merge(m, left_on="b", right_on="u", suffixes=("1", "2"))
        p = p[(p["a"] != p["b"]) | (p["row1"] < p["row2"])]
        candidates += len(p)
        found_keys = _PairKeys.of(
            split_code, label_code, path_rank, p["row1"].to_numpy(), p["row2"].to_numpy(), p["distance"].to_numpy()
        )
        best = best.join(found_keys).first(LISTED_MAX)
    counts = pd.concat([c for c in per_block if len(c)] or per_block)
    counts = counts.groupby(["split_a", "split_b"], as_index=False).sum()
    counts = counts[counts["pairs"] > 0].reset_index(drop=True)
    del hash_pairs, groups, m, path_rank, per_block  # what listing the pairs needs: `best` and the images
    listed = best.table(images)
    all_listed = all_listed and candidates <= LISTED_MAX
    return _NearDuplicates(
        counts=counts,
        listed=listed,
        leaky=leaky,
        searched=len(rows),
        distinct=len(unique),
        blank=int(blank.sum()),
        unhashed=int((~valid & ~blank).sum()),
        capped=capped,
        all_listed=all_listed,
        seconds=time.perf_counter() - started,
    )


def _no_counts() -> pd.DataFrame:
    """An empty table of image pairs by split pair (the columns of :attr:`_NearDuplicates.counts`)."""
    return pd.DataFrame({c: pd.Series(dtype=np.int64) for c in ("split_a", "split_b", "pairs", "conflicting")})


def _pair_counts(hash_pairs: pd.DataFrame, groups: pd.DataFrame) -> pd.DataFrame:
    """Image pairs (and those with different labels) by split pair, for some ``hash_pairs``
    (``a``, ``b``; ``a == b``: images sharing a hash) and the ``groups`` of images with the same
    hash ``u``, split ``s`` and labels ``l`` (``c`` images each)."""
    g = hash_pairs.merge(groups, left_on="a", right_on="u").merge(
        groups, left_on="b", right_on="u", suffixes=("1", "2")
    )
    same_hash = (g["a"] == g["b"]).to_numpy()
    s1, s2, l1, l2 = (g[c].to_numpy() for c in ("s1", "s2", "l1", "l2"))
    c1, c2 = g["c1"].to_numpy(dtype=np.int64), g["c2"].to_numpy(dtype=np.int64)
    same_group = same_hash & (s1 == s2) & (l1 == l2)
    ordered = (s1 < s2) | ((s1 == s2) & (l1 < l2))
    pairs = np.where(same_group, c1 * (c1 - 1) // 2, c1 * c2)
    use = ~same_hash | same_group | ordered  # a pair of groups of one hash: once
    table = pd.DataFrame(
        {
            "split_a": np.minimum(s1, s2)[use],
            "split_b": np.maximum(s1, s2)[use],
            "pairs": pairs[use],
            "conflicting": np.where(l1 != l2, pairs, 0)[use],
        }
    )
    return table.groupby(["split_a", "split_b"], as_index=False).sum()


@dataclass
class _PairKeys:
    """Image pairs (rows ``a``, ``b`` of the analysed frame), oriented so that ``a`` is the copy a
    drop removes (the earlier split: train before val before test), with the sort key of the
    listing: cross-split pairs first, then those with different labels, the nearest first, then
    by paths."""

    a: np.ndarray
    b: np.ndarray
    distance: np.ndarray
    conflicting: np.ndarray
    key: np.ndarray

    @classmethod
    def none(cls) -> _PairKeys:
        empty = np.zeros(0, dtype=np.int64)
        return cls(empty, empty, np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=bool), empty)

    @classmethod
    def of(
        cls,
        split_code: np.ndarray,
        label_code: np.ndarray,
        path_rank: np.ndarray,
        first: np.ndarray,
        second: np.ndarray,
        distance: np.ndarray,
    ) -> _PairKeys:
        """The pairs ``first[k]``, ``second[k]`` (``path_rank``: each image's place in path order)."""
        swap = (split_code[first] > split_code[second]) | (
            (split_code[first] == split_code[second]) & (path_rank[first] > path_rank[second])
        )
        a, b = np.where(swap, second, first), np.where(swap, first, second)
        cross, conflicting = split_code[a] != split_code[b], label_code[a] != label_code[b]
        # One int64 sort key (cross-split, different labels, distance, paths: < 2**27 images).
        key = (
            ((~cross).astype(np.int64) << 62)
            | ((~conflicting).astype(np.int64) << 61)
            | (distance.astype(np.int64) << 54)
            | (path_rank[a] << 27)
            | path_rank[b]
        )
        return cls(a, b, distance.astype(np.uint8), conflicting, key)

    def join(self, other: _PairKeys) -> _PairKeys:
        """These pairs and ``other``'s."""
        return _PairKeys(*(np.concatenate([x, y]) for x, y in zip(astuple(self), astuple(other), strict=True)))

    def first(self, limit: int) -> _PairKeys:
        """The ``limit`` pairs of the smallest keys, in key order (only those are sorted)."""
        if len(self.key) > limit:
            part = np.argpartition(self.key, limit - 1)[:limit]
            order = part[np.argsort(self.key[part])]
        else:
            order = np.argsort(self.key)
        return _PairKeys(*(x[order] for x in astuple(self)))

    def table(self, images: pd.DataFrame) -> pd.DataFrame:
        """The pairs as rows: the near_duplicates.csv columns + source_a, source_b, conflicting."""
        col = {
            c: (images[c].take(self.a).to_numpy(), images[c].take(self.b).to_numpy())
            for c in ("path", "split", "labels", "source_id")
        }
        return pd.DataFrame(
            {
                "path_a": col["path"][0],
                "path_b": col["path"][1],
                "split_a": col["split"][0],
                "split_b": col["split"][1],
                "labels_a": col["labels"][0],
                "labels_b": col["labels"][1],
                "distance": self.distance.astype(int),
                "action": "",
                "source_a": col["source_id"][0],
                "source_b": col["source_id"][1],
                "conflicting": self.conflicting,
            }
        )


# ---------------------------------------------------------------------------- the other checks


def similar_class_names(classes: Iterable[str]) -> list[list[str]]:
    """Groups of class names that differ only by case or spaces ("Dog" and "dog ", "sea lion"
    and "Sea  Lion"): names are compared case-folded, without whitespace, after Unicode NFKC
    normalisation (so a non-breaking or full-width space is a space). Each group is sorted,
    the groups by their first name; names that are identical count once."""
    by_key: dict[str, set[str]] = {}
    for name in classes:
        key = "".join(unicodedata.normalize("NFKC", str(name)).casefold().split())
        by_key.setdefault(key, set()).add(str(name))
    return sorted(sorted(names) for names in by_key.values() if len(names) > 1)


def _class_counts(images: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Images per class (rows, most frequent in train first) and split (columns), and the
    number of images without labels."""
    per = images.groupby(["labels", "split"]).size().rename("images").reset_index()  # few distinct label sets
    per["class"] = per["labels"].astype(str).map(split_labels)
    per = per.explode("class")
    unlabelled = int(per.loc[per["class"].isna(), "images"].sum())
    table = (
        per.dropna(subset=["class"])
        .groupby(["class", "split"])["images"]
        .sum()
        .unstack(fill_value=0)
        .reindex(columns=list(SPLITS), fill_value=0)
        .astype(int)
    )
    table = table.assign(_total=table.sum(axis=1)).sort_values(["train", "_total"], ascending=False, kind="stable")
    return table.drop(columns="_total"), unlabelled


def _tiny(images: pd.DataFrame) -> np.ndarray:
    """The tiny rule of :data:`TINY_SIDE` and :data:`TINY_AREA_FRACTION`."""
    if images.empty:
        return np.zeros(0, dtype=bool)
    width, height = images["width"].to_numpy(dtype=np.int64), images["height"].to_numpy(dtype=np.int64)
    short, area = np.minimum(width, height), width * height
    small = (short < TINY_SIDE) & (short < np.median(short))
    return small | (area < TINY_AREA_FRACTION * np.median(area))


def _check_columns(frame: pd.DataFrame, columns: Iterable[str], name: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{name} lacks column(s) {missing}")  # a caller's bug, not the user's data


# ---------------------------------------------------------------------------- the result


@dataclass
class Health:
    """The health of a data set: :attr:`summary` (JSON), :attr:`drop` and :meth:`write`."""

    summary: dict[str, Any]
    drop: list[str]
    max_distance: int
    action: str
    class_counts: pd.DataFrame  # index class, columns train/val/test (after the drop)
    sizes: pd.DataFrame  # path, split, width, height, mode (+ gray)
    pair_counts: pd.DataFrame  # splits, pairs, conflicting
    pairs: pd.DataFrame  # the listed near-duplicate pairs
    flagged: pd.DataFrame  # blank and tiny images
    duplicates: pd.DataFrame
    quarantined: pd.DataFrame

    @property
    def warnings(self) -> list[str]:
        """One line per problem, most important first."""
        return list(self.summary["warnings"])

    def shown_paths(self) -> list[str]:
        """The images :meth:`write` asks ``thumbnail`` for: both sides of the example pairs."""
        shown = self.pairs.head(GRID_PAIRS)
        return [*shown["path_a"].astype(str), *shown["path_b"].astype(str)]

    def write(self, out_dir: Path, thumbnail: Thumbnail | None = None) -> list[Path]:
        """Write ``health.md``, its PNGs and CSVs into ``out_dir``; return the paths written.

        ``thumbnail(path)`` returns an image's pixels ((H, W, C) uint8) for the grid of example
        near-duplicate pairs (``near_duplicates.png``), which is left out without it.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        long = self.class_counts.rename_axis(index="class", columns="split").stack().rename("images").reset_index()
        written = [
            atomic_write_text(out_dir / "class_counts.csv", long.to_csv(index=False)),
            atomic_write_csv(
                out_dir / "near_duplicates.csv",
                self.pairs[["path_a", "path_b", "split_a", "split_b", "labels_a", "labels_b", "distance", "action"]],
            ),
            atomic_write_csv(out_dir / "image_sizes.csv", self.sizes[["path", "split", "width", "height", "mode"]]),
            _save(_plot_class_counts(self.class_counts), out_dir / "class_counts.png"),
            _save(_plot_short_sides(self.sizes), out_dir / "sizes.png"),
            _save(_plot_aspect_ratios(self.sizes), out_dir / "aspect_ratios.png"),
            _save(_plot_modes(self.sizes), out_dir / "modes.png"),
        ]
        grid = None
        if thumbnail is not None and len(self.pairs):
            grid = _save(_plot_pairs(self.pairs.head(GRID_PAIRS), thumbnail), out_dir / "near_duplicates.png")
            written.append(grid)
        written.append(atomic_write_text(out_dir / "health.md", self._page(grid is not None)))
        return written

    def _page(self, grid: bool) -> str:
        """The Markdown page."""
        s = self.summary
        warnings = s["warnings"]
        lines = ["# Data set health", ""]
        lines.append(f"**{_count(len(warnings), 'warning')}**" if warnings else "**No warnings.**")
        lines += ["", *[f"- {w}" for w in warnings], ""] if warnings else [""]
        per_split = " · ".join(f"{k} {v:,}" for k, v in s["per_split"].items())
        removed = [
            _count(s["exact_duplicates"] + s["conflicting_duplicates"], "exact duplicate"),
            _count(s["quarantined"], "undecodable image"),
        ]
        lines.append(
            f"{_count(s['images'], 'image')} ({per_split}) in {_count(s['classes'], 'class', 'classes')}; "
            f"preprocess removed {removed[0]} and {removed[1]} before this report"
            + (f", and {_count(s['near_duplicates']['dropped'], 'near duplicate')} here." if self.drop else ".")
        )
        sections = (
            self._classes(),
            self._sizes(),
            self._near(grid),
            self._flagged(),
            self._duplicates(),
            self._names(),
        )
        for section in sections:
            lines += ["", *section]
        return "\n".join(lines).rstrip() + "\n"

    def _classes(self) -> list[str]:
        s = self.summary
        lines = ["## Classes", ""]
        if s["imbalance_ratio"] is not None:
            lines.append(
                f"Train imbalance: the largest class ({_md_text(s['largest_class'])}, "
                f"{s['largest_class_images']:,}) has {s['imbalance_ratio']:,.1f}x the images of the smallest "
                f"({_md_text(s['smallest_class'])}, {s['smallest_class_images']:,})."
            )
            if s["imbalance_ratio"] > IMBALANCE_WARN:
                lines.append(
                    f"That is above {IMBALANCE_WARN:.0f}x: consider `task.class_weights=balanced` or "
                    "`task.balanced_sampling=true`."
                )
            lines.append("")
        if s["unlabelled"]:
            lines += [f"{_count(s['unlabelled'], 'image')} without labels.", ""]
        table = self.class_counts.copy()
        total = table.sum(axis=1)
        shown = _head_tail(table.assign(total=total, share=total / max(int(total.sum()), 1)), SHOWN * 2)
        if len(shown) < len(table):
            lines += [
                f"The {SHOWN} most and {SHOWN} least frequent of {len(table):,} classes (all in `class_counts.csv`):",
                "",
            ]
        shown = shown.reset_index().rename(columns={"index": "class"})
        shown["share"] = shown["share"].map(lambda v: f"{v:.1%}")
        lines += [_md_table(shown), "", "![Images per class and split](class_counts.png)"]
        return lines

    def _sizes(self) -> list[str]:
        z = self.summary["sizes"]
        lines = ["## Image sizes and modes", ""]
        if not z:
            return [*lines, "No images."]
        lines.append(
            f"Median size {z['median_width']:,} x {z['median_height']:,} px "
            f"(short side {z['median_short_side']:,} px); "
            f"widths {z['width_range'][0]:,}-{z['width_range'][1]:,} px, heights "
            f"{z['height_range'][0]:,}-{z['height_range'][1]:,} px, aspect ratios (w/h) "
            f"{z['aspect_ratio_range'][0]:.2f}-{z['aspect_ratio_range'][1]:.2f}."
        )
        n = max(self.summary["images"], 1)
        gray = self.summary["gray"]
        lines.append(f"{gray:,} images ({gray / n:.1%}) are gray (all channels equal).")
        modes = pd.DataFrame(
            [(m, f"{c:,}", f"{c / n:.1%}") for m, c in self.summary["modes"].items()],
            columns=["mode", "images", "share"],
        )
        lines += ["", _md_table(modes), ""]
        lines.append("![Short side](sizes.png) ![Aspect ratio](aspect_ratios.png) ![Modes](modes.png)")
        lines += ["", "Every image's size and mode: `image_sizes.csv`."]
        return lines

    def _near(self, grid: bool) -> list[str]:
        nd = self.summary["near_duplicates"]
        lines = ["## Near duplicates", ""]
        lines.append(
            f"Two images are near duplicates when their perceptual hashes (64-bit pHash) differ in at most "
            f"{_count(self.max_distance, 'bit')}. {_count(nd['searched'], 'image')} searched "
            f"({nd['distinct_hashes']:,} distinct hashes)"
            + (f"; {_count(nd['blank_skipped'], 'blank image')} left out (listed below)" if nd["blank_skipped"] else "")
            + (
                f"; {_count(nd['unhashed'], 'image')} without a hash left out (preprocess hashes no image under "
                f"{PHASH_SIDE} px: pHash scales it up and compares outlines, not content)"
                if nd["unhashed"]
                else ""
            )
            + "."
        )
        if nd["capped"] == "window":
            lines += [
                "",
                "*The search was capped: some hashes share a chunk of their bits with so many others that each was "
                "compared with only its nearest ones in value, so a few pairs may be missing.*",
            ]
        elif nd["capped"] == "pairs":
            lines += [
                "",
                f"*The search stopped at {MAX_PAIRS:,} pairs of distinct hashes (the nearest are counted): at "
                f"{_count(self.max_distance, 'bit')} unrelated images match; a lower "
                "`preprocess.near_duplicate_distance` finds the real near duplicates.*",
            ]
        short = self.summary["sizes"].get("median_short_side", PHASH_SIDE)
        if nd["pairs"] and short < PHASH_SIDE:
            lines += [
                "",
                f"*The images are small (median short side {short:,} px): pHash scales them up to {PHASH_SIDE} px, "
                "so similar images (two shoes of one shape) can hash alike. Check the examples before dropping.*",
            ]
        lines.append("")
        if not nd["pairs"]:
            return [*lines, "No near duplicates found."]
        counts = self.pair_counts.assign(
            pairs=self.pair_counts["pairs"].map("{:,}".format),
            conflicting=self.pair_counts["conflicting"].map("{:,}".format),
        ).rename(columns={"conflicting": "with different labels"})
        lines += [_md_table(counts), ""]
        pairs = self.pairs.sort_values(["distance", "path_a", "path_b"], kind="stable")
        cross = pairs[pairs["split_a"] != pairs["split_b"]]
        if nd["cross_split"]:
            verb = {
                "warn": "kept (`preprocess.near_duplicates=warn`): evaluation images leak into training",
                "drop": f"{_count(nd['dropped'], 'image')} dropped (`preprocess.near_duplicates=drop`): the train "
                "copy of each pair, the val copy of a val-test pair",
                "fail": "preprocess stops (`preprocess.near_duplicates=fail`)",
            }[self.action]
            lines += [f"**Across splits**: {_count(nd['cross_split'], 'pair')}, {verb}.", ""]
            lines += [_pair_rows(cross.head(SHOWN)), ""]
        conflicting = pairs[pairs["conflicting"]]
        if nd["conflicting"]:
            lines += [
                f"**With different labels** (likely label noise): {_count(nd['conflicting'], 'pair')}.",
                "",
                _pair_rows(conflicting.head(SHOWN)),
                "",
            ]
        if grid:
            lines += ["![Example near-duplicate pairs](near_duplicates.png)", ""]
        lines.append(
            "All listed pairs: `near_duplicates.csv`"
            + ("." if nd["all_listed"] else f" (up to {LISTED_PER_HASH} images per hash and split; all are counted).")
        )
        return lines

    def _flagged(self) -> list[str]:
        lines = ["## Blank and tiny images", ""]
        lines.append(
            f"Blank: (nearly) one flat colour. Tiny: under {TINY_SIDE} px on the short side while the median "
            f"image is larger, or under 1/{round(1 / TINY_AREA_FRACTION)} of the median area."
        )
        lines.append("")
        if self.flagged.empty:
            return [*lines, "None."]
        n_blank, n_tiny = self.summary["blank"], self.summary["tiny"]
        lines += [f"{_count(n_blank, 'blank image')}, {_count(n_tiny, 'tiny image')}:", ""]
        lines.append(_md_table(self.flagged.head(SHOWN)[["source_id", "split", "labels", "size", "problem"]]))
        if len(self.flagged) > SHOWN:
            lines += ["", f"... and {len(self.flagged) - SHOWN:,} more."]
        return lines

    def _duplicates(self) -> list[str]:
        s = self.summary
        lines = ["## Exact duplicates and undecodable images", ""]
        lines.append(
            f"{_count(s['exact_duplicates'], 'exact copy', 'exact copies')} of another image dropped; "
            f"{_count(s['conflicting_duplicates'], 'identical image')} dropped because their copies have "
            "different labels (listed in `duplicates.csv`)."
        )
        if len(self.duplicates):
            rows = self.duplicates.head(SHOWN)
            cols = [c for c in ("source_id", "split", "labels", "reason", "duplicate_of") if c in rows]
            lines += ["", _md_table(rows[cols])]
        lines += ["", f"{_count(s['quarantined'], 'image')} did not decode (quarantined, `quarantine.csv`)."]
        if len(self.quarantined):
            reasons = self.quarantined["reason"].astype(str).value_counts().head(SHOWN)
            table = pd.DataFrame({"reason": reasons.index, "images": [f"{v:,}" for v in reasons]})
            lines += ["", _md_table(table)]
        return lines

    def _names(self) -> list[str]:
        lines = ["## Class names that differ only by case or spaces", ""]
        groups = self.summary["similar_class_names"]
        if not groups:
            return [*lines, "None."]
        return lines + ["- " + ", ".join(f"`{_md_text(repr(name))}`" for name in group) for group in groups]


def analyse(
    images: pd.DataFrame,
    duplicates: pd.DataFrame,
    quarantined: pd.DataFrame,
    max_distance: int,
    action: str,
) -> Health:
    """The health of the images preprocess kept.

    ``images``: one row per image kept after exact de-duplication, with columns ``path``,
    ``labels`` (joined with "|"), ``split``, ``source_id``, ``width``, ``height`` (px),
    ``mode`` (the file's PIL mode), ``gray``, ``blank`` (bools) and ``phash`` (16 hex digits);
    ``duplicates``: the exact duplicates preprocess dropped (``reason`` "duplicate" or
    "conflicting labels for identical images"); ``quarantined``: the images that did not decode
    (``source_id``, ``reason``).

    ``max_distance``: pHash bits two near duplicates may differ in
    (``preprocess.near_duplicate_distance``); ``action``: what to do with near duplicates
    across splits (``preprocess.near_duplicates``): "warn" logs and lists them, "drop" returns
    the train copy of each pair (the val copy of a val-test pair) in :attr:`Health.drop`
    (the rest of the report describes the images left), "fail" raises
    :class:`~taxonomist.errors.DataError`. Each warning is logged once.
    """
    if action not in ACTIONS:
        raise ConfigError(f"preprocess.near_duplicates={action!r}; use one of {ACTIONS}")
    if not 0 <= int(max_distance) < HASH_BITS:
        raise ConfigError(f"preprocess.near_duplicate_distance must be in [0, {HASH_BITS - 1}], got {max_distance}")
    max_distance = int(max_distance)
    _check_columns(images, IMAGE_COLUMNS, "images")
    images = images.reset_index(drop=True)
    split_code = pd.Categorical(images["split"], categories=list(SPLITS)).codes.astype(np.int64)
    if (split_code < 0).any():
        unknown = sorted(set(images["split"][split_code < 0].astype(str)))
        raise DataError(f"images with an unknown split {unknown}: use {list(SPLITS)}")

    near = _find_near_duplicates(images, split_code, max_distance)
    log.info("near-duplicate search: %d images, %d distinct hashes, %.2f s", near.searched, near.distinct, near.seconds)
    by_pair = {
        f"{SPLITS[a]}-{SPLITS[b]}": int(n)
        for a, b, n in near.counts[["split_a", "split_b", "pairs"]].itertuples(index=False)
    }
    cross = {k: n for k, n in by_pair.items() if k.split("-")[0] != k.split("-")[1]}
    listed = near.listed
    is_cross = (listed["split_a"] != listed["split_b"]).to_numpy()
    if action == "fail" and cross:
        examples = listed[is_cross].sort_values(["distance", "path_a", "path_b"], kind="stable").head(3)
        shown = "; ".join(
            f"{r.source_a} ~ {r.source_b} ({_count(r.distance, 'bit')} apart)" for r in examples.itertuples()
        )
        raise DataError(
            f"{_count(sum(cross.values()), 'near-duplicate image pair')} across splits (pHash distance <= "
            f"{max_distance}: {_join_counts(cross)}), e.g. {shown}: use preprocess.near_duplicates=warn to keep "
            "and list them, or preprocess.near_duplicates=drop to drop the train copy (the val copy of a val-test pair)"
        )
    drop = sorted(images.loc[near.leaky, "path"]) if action == "drop" else []
    verb = {"warn": "warned", "drop": "dropped path_a", "fail": "failed"}[action]
    listed = listed.assign(action=np.where(is_cross, verb, "kept (same split)"))

    kept = images[~images["path"].isin(set(drop))] if drop else images
    counts, unlabelled = _class_counts(kept)
    train = counts["train"][counts["train"] > 0]
    tiny, blank = _tiny(kept), kept["blank"].to_numpy(dtype=bool)
    flagged = kept[blank | tiny].assign(
        size=lambda f: f["width"].astype(str) + " x " + f["height"].astype(str),
        problem=[
            ", ".join(p for p, on in (("blank", b), ("tiny", t)) if on)
            for b, t in zip(blank, tiny, strict=True)
            if b or t
        ],
    )
    reasons = duplicates["reason"].astype(str) if "reason" in duplicates else pd.Series(dtype=str)
    summary: dict[str, Any] = {
        "images": len(kept),
        "per_split": {s: int((kept["split"] == s).sum()) for s in SPLITS},
        "classes": len(counts),
        "unlabelled": unlabelled,
        "imbalance_ratio": round(float(train.max() / train.min()), 3) if len(train) else None,
        "largest_class": str(train.idxmax()) if len(train) else None,
        "largest_class_images": int(train.max()) if len(train) else 0,
        "smallest_class": str(train.idxmin()) if len(train) else None,
        "smallest_class_images": int(train.min()) if len(train) else 0,
        "classes_without_train_images": sorted(counts.index[counts["train"] == 0]) if len(train) else [],
        "sizes": _size_summary(kept),
        "modes": {str(k): int(v) for k, v in kept["mode"].astype(str).value_counts().items()},
        "gray": int(kept["gray"].astype(bool).sum()),
        "blank": int(blank.sum()),
        "tiny": int(tiny.sum()),
        "exact_duplicates": int((reasons == "duplicate").sum()),
        "conflicting_duplicates": int((reasons != "duplicate").sum()),
        "quarantined": len(quarantined),
        "near_duplicates": {
            "max_distance": max_distance,
            "action": action,
            "searched": near.searched,
            "distinct_hashes": near.distinct,
            "blank_skipped": near.blank,
            "unhashed": near.unhashed,
            "pairs": int(near.counts["pairs"].sum()),
            "by_split_pair": by_pair,
            "cross_split": sum(cross.values()),
            "conflicting": int(near.counts["conflicting"].sum()),
            "dropped": len(drop),
            "capped": near.capped,
            "all_listed": near.all_listed,
        },
        "similar_class_names": similar_class_names(counts.index),
    }
    summary["warnings"] = _warnings(summary, cross)
    for line in summary["warnings"]:
        log.warning("data health: %s", line)
    return Health(
        summary=summary,
        drop=drop,
        max_distance=max_distance,
        action=action,
        class_counts=counts,
        sizes=_sizes_table(kept),
        pair_counts=near.counts.assign(splits=[k.replace("-", "–") for k in by_pair])[
            ["splits", "pairs", "conflicting"]
        ],
        pairs=listed,
        flagged=flagged[["path", "split", "labels", "source_id", "size", "problem"]].reset_index(drop=True),
        duplicates=duplicates.reset_index(drop=True),
        quarantined=quarantined.reset_index(drop=True),
    )


def _sizes_table(images: pd.DataFrame) -> pd.DataFrame:
    """Every image's path, split, size, mode and gray flag, as :attr:`Health.sizes` keeps them
    until the report is written: the split and mode (a few distinct values) as categories and
    the sizes as 32-bit numbers, a few bytes per image."""
    sizes = images[["path", "split", "width", "height", "mode", "gray"]].reset_index(drop=True)
    return sizes.astype({"split": "category", "mode": "category", "width": np.int32, "height": np.int32})


def _size_summary(images: pd.DataFrame) -> dict[str, Any]:
    """Median size and the ranges of width, height and aspect ratio (empty without images)."""
    if images.empty:
        return {}
    width, height = images["width"].astype(int), images["height"].astype(int)
    aspect = width / height.clip(lower=1)
    return {
        "median_width": int(width.median()),
        "median_height": int(height.median()),
        "median_short_side": int(np.minimum(width, height).median()),
        "width_range": [int(width.min()), int(width.max())],
        "height_range": [int(height.min()), int(height.max())],
        "aspect_ratio_range": [round(float(aspect.min()), 3), round(float(aspect.max()), 3)],
    }


def _warnings(s: dict[str, Any], cross: dict[str, int]) -> list[str]:
    """The one-line warnings of a summary, the most important first."""
    nd, warnings = s["near_duplicates"], []
    if cross:
        what = {
            "warn": "kept (preprocess.near_duplicates=warn)",
            "drop": f"dropped {_count(nd['dropped'], 'train/val copy', 'train/val copies')}",
            "fail": "",
        }[nd["action"]]
        warnings.append(
            f"{_count(nd['cross_split'], 'near-duplicate pair')} across splits ({_join_counts(cross)}): {what}"
        )
    if nd["conflicting"]:
        warnings.append(
            f"{_count(nd['conflicting'], 'near-duplicate pair')} with different labels (likely label noise)"
        )
    if s["similar_class_names"]:
        groups = s["similar_class_names"]
        shown = "; ".join(" / ".join(repr(n) for n in group) for group in groups[:3])
        warnings.append(f"{_count(len(groups), 'group')} of class names differ only by case or spaces: {shown}")
    if s["imbalance_ratio"] is not None and s["imbalance_ratio"] > IMBALANCE_WARN:
        warnings.append(
            f"classes are imbalanced {s['imbalance_ratio']:,.0f}x in train ({s['largest_class']} "
            f"{s['largest_class_images']:,} vs {s['smallest_class']} {s['smallest_class_images']:,}): consider "
            "task.class_weights=balanced or task.balanced_sampling=true"
        )
    if s["classes_without_train_images"]:
        names = s["classes_without_train_images"]
        warnings.append(f"{_count(len(names), 'class', 'classes')} without training images: {', '.join(names[:5])}")
    if s["conflicting_duplicates"]:
        warnings.append(f"{_count(s['conflicting_duplicates'], 'identical image')} with conflicting labels dropped")
    if s["quarantined"]:
        warnings.append(f"{_count(s['quarantined'], 'image')} did not decode (quarantined)")
    if s["blank"]:
        warnings.append(f"{_count(s['blank'], 'blank image')} (one flat colour)")
    if s["tiny"]:
        warnings.append(f"{_count(s['tiny'], 'tiny image')} (much smaller than the rest)")
    if nd["capped"] == "window":
        warnings.append("the near-duplicate search was capped (uneven hashes): a few pairs may be missing")
    elif nd["capped"] == "pairs":
        warnings.append(
            f"the near-duplicate search stopped at {MAX_PAIRS:,} pairs: lower preprocess.near_duplicate_distance "
            f"(now {nd['max_distance']})"
        )
    return warnings


# ---------------------------------------------------------------------------- formatting


def _count(n: int, noun: str, plural: str | None = None) -> str:
    """``1 image``, ``1,234 images``."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def _join_counts(counts: dict[str, int]) -> str:
    """``train-test 10, train-val 2``."""
    return ", ".join(f"{k} {n:,}" for k, n in counts.items())


def _md_text(text: object) -> str:
    """Text safe in a Markdown table cell (a ``|`` would end the cell)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(frame: pd.DataFrame) -> str:
    """A Markdown table of ``frame`` (numbers with thousands separators)."""
    cells = frame.map(
        lambda v: f"{v:,}" if isinstance(v, int | np.integer) and not isinstance(v, bool) else _md_text(v)
    )
    return cells.to_markdown(index=False, disable_numparse=True)


def _labels_text(text: str) -> str:
    return ", ".join(split_labels(text)) or NO_LABEL


def _pair_rows(pairs: pd.DataFrame) -> str:
    """Near-duplicate pairs as a Markdown table named by source id."""
    return _md_table(
        pd.DataFrame(
            {
                "image": pairs["source_a"],
                "split": pairs["split_a"],
                "labels": pairs["labels_a"].map(_labels_text),
                "near duplicate": pairs["source_b"],
                "its split": pairs["split_b"],
                "its labels": pairs["labels_b"].map(_labels_text),
                "bits apart": pairs["distance"],
            }
        )
    )


def _head_tail(frame: pd.DataFrame, n: int) -> pd.DataFrame:
    """All rows, or the first and last ``n / 2``."""
    return frame if len(frame) <= n else pd.concat([frame.head(n // 2), frame.tail(n - n // 2)])


def _short(text: str, width: int = 24) -> str:
    """Keep plot titles readable: long names are cut with an ellipsis."""
    return text if len(text) <= width else text[: width - 1] + "…"


# ---------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (imported when a report is written)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Save a figure as PNG atomically and close it."""
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def _plot_class_counts(counts: pd.DataFrame) -> Any:
    """Horizontal bars of images per class, one panel per split."""
    plt = _pyplot()
    shown = _head_tail(counts, PLOTTED_CLASSES)
    n = max(len(shown), 1)
    fig, axes = plt.subplots(1, len(SPLITS), figsize=(3.2 * len(SPLITS) + 2, max(3.0, 0.25 * n + 1.2)), sharey=True)
    y = np.arange(len(shown))
    for ax, split in zip(axes, SPLITS, strict=True):
        ax.barh(y, shown[split] if len(shown) else [], color="tab:blue")
        ax.set_title(split, fontsize=9)
        ax.set_xlabel("images")
    axes[0].set_yticks(y, [_short(str(c), 28) for c in shown.index], fontsize=7)
    axes[0].invert_yaxis()
    title = "Images per class and split"
    if len(shown) < len(counts):
        title += f" (the {PLOTTED_CLASSES // 2} most and least frequent of {len(counts):,} classes)"
    fig.suptitle(title, fontsize=10)
    return fig


def _log_bins(values: np.ndarray, n: int = 40) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        lo, hi = lo / 1.1, hi * 1.1
    return np.geomspace(lo, hi, n + 1)


def _plot_short_sides(sizes: pd.DataFrame) -> Any:
    """Histogram of the short side in px, on a log axis, with the median marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    short = np.minimum(sizes["width"].to_numpy(dtype=float), sizes["height"].to_numpy(dtype=float))
    if len(short):
        ax.hist(short, bins=_log_bins(short), color="tab:blue")
        median = float(np.median(short))
        ax.axvline(median, color="black", linestyle="--", linewidth=1, label=f"median {median:,.0f} px")
        ax.axvline(TINY_SIDE, color="tab:red", linestyle=":", linewidth=1, label=f"{TINY_SIDE} px")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("short side (px)")
    ax.set_ylabel("images")
    ax.set_title("Image size (short side)")
    return fig


def _plot_aspect_ratios(sizes: pd.DataFrame) -> Any:
    """Histogram of the aspect ratio w/h on a log axis (1:2 and 2:1 equally far from square)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ratio = sizes["width"].to_numpy(dtype=float) / np.maximum(sizes["height"].to_numpy(dtype=float), 1)
    if len(ratio):
        ax.hist(ratio, bins=_log_bins(ratio), color="tab:green")
    ax.set_xscale("log")
    ticks = [
        t for t in (0.25, 0.5, 0.75, 1.0, 4 / 3, 2.0, 4.0) if len(ratio) and ratio.min() / 1.5 <= t <= ratio.max() * 1.5
    ]
    ax.set_xticks(ticks, [f"{t:.2g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("aspect ratio (width / height)")
    ax.set_ylabel("images")
    ax.set_title("Aspect ratio")
    return fig


def _plot_modes(sizes: pd.DataFrame) -> Any:
    """Bar chart of the files' PIL modes."""
    plt = _pyplot()
    counts = sizes["mode"].astype(str).value_counts()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(counts) + 2), 3.2))
    bars = ax.bar(counts.index, counts.to_numpy(), color="tab:purple")
    ax.bar_label(bars, labels=[f"{v:,}" for v in counts], fontsize=8)
    ax.set_ylabel("images")
    ax.set_title("Image modes (as stored)")
    return fig


def _plot_pairs(pairs: pd.DataFrame, thumbnail: Thumbnail) -> Any:
    """Example near-duplicate pairs side by side, titled with split, labels and source."""
    plt = _pyplot()
    per_row = 2  # pairs per row: four images
    rows = max(1, int(np.ceil(len(pairs) / per_row)))
    fig, axes = plt.subplots(rows, 2 * per_row, figsize=(2.3 * 2 * per_row, 3.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, pair in enumerate(pairs.itertuples(index=False)):
        for side, (path, split, labels, source) in enumerate(
            (
                (pair.path_a, pair.split_a, pair.labels_a, pair.source_a),
                (pair.path_b, pair.split_b, pair.labels_b, pair.source_b),
            )
        ):
            ax = axes[k // per_row, 2 * (k % per_row) + side]
            try:
                img = np.asarray(thumbnail(path))
                img = img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img
                ax.imshow(img, cmap="gray", vmin=0, vmax=255) if img.ndim == 2 else ax.imshow(img)
            except Exception as err:  # a thumbnail the caller cannot make: say so in its place
                log.debug("no thumbnail for %s: %s", path, err)
                ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=8)
            head = f"{split}: {_short(_labels_text(labels), 20)}\n{_short(str(source), 26)}\n"
            if side:
                head += f"{pair.distance} bits apart" + (", labels differ" if pair.conflicting else "")
            ax.set_title(head, fontsize=7)
    fig.suptitle("Near-duplicate pairs (left: the copy a drop removes)", fontsize=9)
    return fig
