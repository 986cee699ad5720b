"""Make or import a dataset folder (``data/``) for the pipeline.

    python -m pipeline.datasets digits --out data            # scikit-learn's 1,797 8x8 digits
    python -m pipeline.datasets idx --images train-images-idx3-ubyte.gz t10k-images-idx3-ubyte.gz \\
        --labels train-labels-idx1-ubyte.gz t10k-labels-idx1-ubyte.gz --classes classes.txt --out data
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.common.errors import run_command
from pipeline.lib.dataset_folders import SPLIT_FOLDERS, import_idx, write_digits

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    digits = sub.add_parser("digits", help="write scikit-learn's digits (no download)")
    idx = sub.add_parser("idx", help="import MNIST-format IDX files")
    idx.add_argument("--images", nargs="+", required=True, help="*-images-idx3-ubyte[.gz] files")
    idx.add_argument("--labels", nargs="+", required=True, help="matching *-labels-idx1-ubyte[.gz] files")
    idx.add_argument("--classes", help="names of labels 0, 1, ...: a file with one per line, or a comma-separated "
                     "list (written to <out>/classes.txt, the label order downstream)")
    idx.add_argument("--splits", nargs="+", choices=SPLIT_FOLDERS,
                     help="split of each --images file (default: from the names: train, t10k/test)")
    for p in (digits, idx):
        p.add_argument("--out", default="data", help="dataset folder (default: data)")
        p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def body() -> None:
        if args.command == "digits":
            count = write_digits(args.out, force=args.force)
        else:
            names = None
            if args.classes:
                source = Path(args.classes)
                text = source.read_text() if source.is_file() else args.classes.replace(",", "\n")
                names = [line.strip() for line in text.splitlines() if line.strip()]
            count = import_idx(args.images, args.labels, args.out, names, force=args.force, splits=args.splits)
        log.info("wrote %d images to %s/", count, args.out)

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
