"""Make the just-eval slice shipped in src/steerable/resources/just_eval (run once; output committed).

python scripts/make_just_eval_slice.py ../shared/data/just-eval --prompts 300 --seed 0
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
from pathlib import Path

from steerable.text.just_eval import SLICE_DIR, _rows_from_folder, load_just_eval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    table = load_just_eval(args.folder, max_prompts=args.prompts, seed=args.seed)
    keep = {info["id"] for info in table.response_info}
    rows = [r for r in _rows_from_folder(args.folder) if r["id"] in keep]
    SLICE_DIR.mkdir(parents=True, exist_ok=True)
    with gzip.open(SLICE_DIR / "slice.jsonl.gz", "wt", encoding="utf-8", compresslevel=9) as handle:
        for row in sorted(rows, key=lambda r: (r["id"], r["model"])):
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    shutil.copy(args.folder / "LICENSE", SLICE_DIR / "LICENSE")
    commit = (args.folder / "SOURCE_COMMIT").read_text().strip()
    (SLICE_DIR / "README.md").write_text(
        "# just-eval slice\n\n"
        f"{len(keep)} instructions ({args.prompts} requested, seed {args.seed}, stratified by category) "
        "and all "
        f"answers of 13 LLMs to them, with the judge's safety ratings, from Re-Align/just-eval "
        f"(MIT, see LICENSE) at commit {commit}. Made by `scripts/make_just_eval_slice.py`; unchanged text.\n"
    )
    print(f"wrote {len(rows)} answers to {len(keep)} instructions into {SLICE_DIR}")


if __name__ == "__main__":
    main()
