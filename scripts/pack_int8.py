#!/usr/bin/env python3
"""Pack trained weights for shipping: fp16 safetensors shards (a training export) -> one int8 safetensors file.

    python scripts/pack_int8.py EXPORT/eloftr_synthetic.json resource/eloftr/eloftr_synthetic.int8.safetensors

The JSON is the {shard file: sha256} list a training export writes next to its shards; every shard is checked
against it. Prints the packed file's sha256 to pin in feature_matching_ros/weights.py, and the largest relative
rounding error of any tensor. Why int8: half the download and install size of fp16 at measured equal
accuracy (feature_matching_ros/weights.py and the model cards).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from feature_matching_ros.weights import load_int8_safetensors, load_sharded_safetensors, save_int8_safetensors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", type=Path, help="STEM.json written by the training export")
    parser.add_argument("out", type=Path, help="the int8 .safetensors file to write")
    parser.add_argument("--source", default="", help="free text stored in the file's metadata")
    args = parser.parse_args()
    state = load_sharded_safetensors(args.shards.parent, json.loads(args.shards.read_text()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sha = save_int8_safetensors(state, args.out, {"format": "feature_matching_ros int8 per-output-channel",
                                                  "source": args.source})
    packed = load_int8_safetensors(args.out, sha)
    error = max(float((packed[k] - v).abs().max() / v.abs().max().clamp_min(1e-12))
                for k, v in state.items() if v.is_floating_point())
    print(f"{args.out}: {args.out.stat().st_size / 1e6:.1f} MB, sha256 {sha}, max relative rounding error {error:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
