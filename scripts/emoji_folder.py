"""Write the Google emoji as a folder-per-class tree: ``<out>/<category>/<hexcode>.png``.

A colour data set in the shape a user's own images come in (9 classes, 1,906 RGBA PNGs of
64x64), for trying ``data=folder`` offline: ``bash scripts/setup.sh`` installs the emoji npm
package into ``node_modules/``.

Usage: ``.venv/bin/python scripts/emoji_folder.py /tmp/emoji``
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from taxonomist.data.sources.emoji import read_emoji

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="the folder to write (must not exist)")
    parser.add_argument("--npm-root", type=Path, default=ROOT / "node_modules", help="where the npm packages are")
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} exists")
    emoji = read_emoji(args.npm_root)
    for item in emoji:
        folder = args.out / item.category.replace(" & ", " and ")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(item.image, folder / f"{item.unified.lower()}.png")
    classes = sorted(p.name for p in args.out.iterdir())
    print(f"wrote {len(emoji)} images in {len(classes)} class folders under {args.out}: {', '.join(classes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
