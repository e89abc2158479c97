"""Retrieval recall@k of global-descriptor codebooks on real sequences: is a true loop among the candidates?

    python benchmarks/retrieval_recall.py --cache ~/.cache/feature_matching_ros/real [--split dev] \
        [--presets cpu orb_bow_nn] [--codebook NAME=PATH ...] [--out benchmarks/results/retrieval_real.md]

Retrieval alone, without verification: for each sequence, every keyframe is described by the preset's
pipeline once, then each codebook (the shipped one, "shipped", plus any ``--codebook NAME=PATH`` of the same
kind) turns the features into a global descriptor, and keyframes are queried and inserted in order through
the engine's own KeyframeDatabase with the preset's exclusion window. Recall@k: over queries with a GT loop
(loops.json) among the eligible keyframes, the share whose top k hold one (a backend only verifies the top k).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from feature_matching_ros.bag import SequenceTopics, read_sequence
from feature_matching_ros.engine import build_engine
from feature_matching_ros.engine.engine import _numpy_descriptors
from feature_matching_ros.retrieval.database import Keyframe, KeyframeDatabase
from feature_matching_ros.retrieval.global_descriptors import load_codebook

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_closure import machine  # noqa: E402

RANKS = (1, 3, 5, 10)


def sequence_recall(frames: list, features: list, codebook, engine, gt: set[tuple[int, int]]) -> dict:
    """Recall@RANKS of one codebook over one sequence (frames and their features in order)."""
    database = KeyframeDatabase(engine.database.kind, codebook.dim, engine.config.retrieval)
    hits = {k: 0 for k in RANKS}
    queries = 0
    for frame, feature in zip(frames, features):
        descriptor = codebook(_numpy_descriptors(feature)) if len(feature) else np.zeros(codebook.dim, np.float32)
        eligible = database.eligible_mask(frame.stamp_ns) if len(database) else np.zeros(0, bool)
        eligible_ids = {database.keyframes[p].id for p in np.flatnonzero(eligible)}
        if any((frame.index, m) in gt for m in eligible_ids):
            queries += 1
            ranked = [c.keyframe_id for c in database.query(descriptor, frame.stamp_ns, top_k=max(RANKS))]
            for k in RANKS:
                hits[k] += any((frame.index, m) in gt for m in ranked[:k])
        database.add(Keyframe.from_features(frame.index, frame.stamp_ns, feature, frame.K, descriptor))
    return {"queries": queries, **{f"R@{k}": hits[k] / queries if queries else None for k in RANKS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/feature_matching_ros/real")
    parser.add_argument("--split", default="dev", help="dev | heldout | all")
    parser.add_argument("--sequences", nargs="*")
    parser.add_argument("--presets", nargs="+", default=["cpu", "orb_bow_nn"])
    parser.add_argument("--codebook", nargs="*", default=[], metavar="NAME=PATH",
                        help="extra codebooks (each used with the presets whose descriptor it fits)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    started = time.perf_counter()
    extra = dict(item.split("=", 1) for item in args.codebook)
    sequences = [d for d in sorted(args.cache.iterdir()) if (d / "sequence.json").exists() and (d / "bag").exists()
                 and (args.sequences and d.name in args.sequences
                      or not args.sequences and args.split in ("all", json.loads((d / "sequence.json").read_text())
                                                             .get("split")))]
    rows = []
    for preset in args.presets:
        engine = build_engine(preset, device=args.device)
        codebooks = {"shipped": engine.codebook}
        for name, path in extra.items():
            codebook = load_codebook(Path(path))
            if codebook.kind == engine.codebook.kind and codebook.descriptor_type == engine.codebook.descriptor_type:
                codebooks[name] = codebook
        for directory in sequences:
            frames = list(read_sequence(directory / "bag", SequenceTopics()))
            gt = {tuple(p) for p in json.loads((directory / "loops.json").read_text())}
            gt |= {(m, q) for q, m in gt}
            features = [engine.pipeline.extract(frame.image) for frame in frames]
            for name, codebook in codebooks.items():
                result = sequence_recall(frames, features, codebook, engine, gt)
                rows.append({"sequence": directory.name, "preset": preset, "codebook": name, **result})
                print(rows[-1], flush=True)
    if args.out:
        lines = ["# Retrieval recall on real sequences: shipped vs candidate codebooks", "",
                 f"Machine: {machine()}.", "",
                 "Command: `python benchmarks/retrieval_recall.py " + " ".join(
                     a.replace(str(Path.home()), "~") for a in sys.argv[1:]) + "`", "",
                 f"Wall time: {time.perf_counter() - started:.0f} s.", "",
                 "| sequence | preset | codebook | queries | " + " | ".join(f"R@{k}" for k in RANKS) + " |",
                 "|" + "---|" * (4 + len(RANKS))]
        for row in rows:
            lines.append(f"| {row['sequence']} | {row['preset']} | {row['codebook']} | {row['queries']} | " + " | ".join(
                "-" if row[f"R@{k}"] is None else f"{row[f'R@{k}']:.3f}" for k in RANKS) + " |")
        args.out.write_text("\n".join(lines) + "\n")
        print(args.out)


if __name__ == "__main__":
    main()
