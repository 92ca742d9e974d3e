#!/usr/bin/env python3
"""Compare `lepton-agent infer --format jsonl` outputs of two machines (scripts/test-arm64: x86_64 vs arm64).

    arm64_compare.py photos DIR          write the BlazeFace acceptance photos (scripts/face_photos.py) as PNGs
    arm64_compare.py compare REF OTHER   compare every *.jsonl in REF with the same file in OTHER

Detections must match one to one: same count and labels, box corners within BOX_TOL, scores within
SCORE_TOL. Wake word decisions must be identical: the same (recording, wake word, time) events. Prints one
line per file and a summary; exits 1 on any difference, 2 on bad input (a missing or unreadable file).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# Normalised box coordinates: 0.005 is about 3 pixels on a 640-pixel frame. x86_64 and arm64 run
# different XNNPACK kernels (AVX vs NEON), so int8 requantization may differ by one step, never by more.
BOX_TOL = 0.005
SCORE_TOL = 0.01


def _key(source: str) -> str:
    """The input as both machines name it: its folder and file name (their roots differ)."""
    path = Path(source)
    return f"{path.parent.name}/{path.name}"


def _read(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Records of one jsonl, grouped by input."""
    by_source: dict[str, list[dict[str, Any]]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_source.setdefault(_key(record["source"]), []).append(record)
    return by_source


def _compare_detections(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> tuple[str | None, float, float]:
    """None when equal within tolerance, else why; plus the largest box and score differences."""
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} detections", 0.0, 0.0
    box_diff = score_diff = 0.0
    # Both lists come out of the same NMS ordered by score; a near tie could swap two, so pair by box.
    unmatched = list(b)
    for det in sorted(a, key=lambda d: -d["score"]):
        best = min(unmatched, key=lambda d: max(abs(x - y) for x, y in zip(det["box"], d["box"], strict=True)))
        unmatched.remove(best)
        if best["label"] != det["label"]:
            return f"label {det['label']!r} vs {best['label']!r}", box_diff, score_diff
        box_diff = max(box_diff, *(abs(x - y) for x, y in zip(det["box"], best["box"], strict=True)))
        score_diff = max(score_diff, abs(det["score"] - best["score"]))
    if box_diff > BOX_TOL or score_diff > SCORE_TOL:
        return f"box diff {box_diff:.4f} (tolerance {BOX_TOL}), score diff {score_diff:.4f}", box_diff, score_diff
    return None, box_diff, score_diff


def compare_file(ref: Path, other: Path) -> tuple[bool, str]:
    a, b = _read(ref), _read(other)
    name = ref.stem
    if "detections" in next((r for rs in a.values() for r in rs), {}):
        problems, box, score, faces = [], 0.0, 0.0, 0
        for source in sorted(set(a) | set(b)):
            da = [d for r in a.get(source, []) for d in r["detections"]]
            db = [d for r in b.get(source, []) for d in r["detections"]]
            why, bd, sd = _compare_detections(da, db)
            box, score, faces = max(box, bd), max(score, sd), faces + len(da)
            if why:
                problems.append(f"{source}: {why}")
        summary = f"{len(a)} photos, {faces} detections, max box diff {box:.4f}, max score diff {score:.4f}"
    else:
        def events(records: dict[str, list[dict[str, Any]]]) -> set[tuple[str, str, str, float]]:
            return {(s, r["event"], r["label"], r["t"]) for s, rs in records.items() for r in rs}

        ea, eb = events(a), events(b)
        scores = {(s, r["t"]): r["score"] for s, rs in a.items() for r in rs}
        diff = max((abs(scores.get((s, r["t"]), r["score"]) - r["score"]) for s, rs in b.items() for r in rs),
                   default=0.0)
        problems = [f"only on the reference: {e}" for e in sorted(ea - eb)]
        problems += [f"only on the other: {e}" for e in sorted(eb - ea)]
        heard = ", ".join(sorted({s for s, *_ in ea})) or "nothing"
        summary = f"{len(ea)} detections ({heard}), max score diff {diff:.4f}"
    print(f"{'same' if not problems else 'DIFFERENT'}  {name}: {summary}")
    for problem in problems:
        print(f"      {problem}")
    return not problems, summary


def write_photos(folder: Path) -> None:
    import cv2

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from face_photos import PHOTOS

    folder.mkdir(parents=True, exist_ok=True)
    for name, make in PHOTOS.items():
        cv2.imwrite(str(folder / f"{name}.png"), make()[:, :, ::-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("photos").add_argument("folder", type=Path)
    cmp = sub.add_parser("compare")
    cmp.add_argument("ref", type=Path)
    cmp.add_argument("other", type=Path)
    args = parser.parse_args()
    if args.command == "photos":
        write_photos(args.folder)
        return 0
    files = sorted(args.ref.glob("*.jsonl"))
    if not files:
        print(f"arm64_compare: no .jsonl files in {args.ref}", file=sys.stderr)
        return 2
    ok = True
    for ref in files:
        other = args.other / ref.name
        try:
            same, _ = compare_file(ref, other)
        except (OSError, ValueError, KeyError) as e:
            print(f"arm64_compare: {other}: {e}", file=sys.stderr)
            return 2
        ok = ok and same
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
