"""ORB single-scale keypoints: OpenCV on the host vs torch (features/orb_torch.py) on the CPU and on CUDA.

    python benchmarks/orb_torch.py --device cpu --out benchmarks/results/orb_torch_cpu.md
    python benchmarks/orb_torch.py --device cuda --out benchmarks/results/orb_torch_gpu.md

Images: graf1/graf3 (resource/samples) and scikit-image photos, resized to 640x480. Per image and backend it
times detection of ``--keypoints`` keypoints (median over ``--repeats`` runs after ``--warmup``; CUDA timings
synchronise the device before and after each run), and measures agreement with the OpenCV backend:
candidates before NMS (fraction of OpenCV's ORB candidates found by torch at the same pixel), final
keypoints (fraction of OpenCV's with a torch keypoint within 1 px) and the median orientation difference.
When ALIKED weights are installed it also times whole extraction (keypoints + ALIKED descriptors) with
each backend, and ALIKED alone, on ``--device``. Needs torch, OpenCV, kornia and scikit-image only.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from feature_matching_ros.config import FeatureConfig
from feature_matching_ros.devdata import keypoint_agreement, load_graf
from feature_matching_ros.features import FeatureExtractor
from feature_matching_ros.features.classic import OrbSingleScale, single_scale_orb
from feature_matching_ros.features.orb_torch import OrbTorch
from feature_matching_ros.image import prepare_image

SIZE = (640, 480)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "brick")


def load_images() -> dict[str, np.ndarray]:
    from skimage import data

    graf = load_graf()
    images = {"graf1": graf.image0, "graf3": graf.image1}
    for name in PHOTOS:
        image = getattr(data, name)()
        images[name] = np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3]
    return {name: cv2.resize(image, SIZE, interpolation=cv2.INTER_AREA) for name, image in images.items()}


def median_ms(run, device: torch.device, warmup: int, repeats: int) -> float:
    def synchronise() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        synchronise()
        start = time.perf_counter()
        run()
        synchronise()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def count_synchronisations(run) -> int:
    """How many times ``run`` makes the host wait for the GPU (torch's sync debug mode warns at each)."""
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for warning in caught:
        print("synchronisation:", str(warning.message).splitlines()[0], flush=True)
    return sum("synchroniz" in str(warning.message) for warning in caught)


def machine(device: torch.device) -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{model}, {os.cpu_count()} logical cores, torch {torch.__version__} ({torch.get_num_threads()} threads), " \
           f"OpenCV {cv2.__version__}"
    if device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    if hasattr(os, "getloadavg"):
        text += f"; load average {os.getloadavg()[0]:.1f} at the end of the run (other processes share the cores)"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--keypoints", type=int, default=1024)
    parser.add_argument("--nms-radius", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--extraction-images", type=int, default=3, help="images for the ALIKED extraction rows")
    parser.add_argument("--extraction-repeats", type=int, default=0, help="runs per image there (0: --repeats)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", help="write the results as markdown here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device")
    images = load_images()
    count = args.keypoints
    opencv = OrbSingleScale(nms_radius=args.nms_radius)
    ours = OrbTorch(nms_radius=args.nms_radius)
    devices = [torch.device("cpu")] + ([device] if device.type == "cuda" else [])

    rows = []
    for name, image in images.items():
        host = prepare_image(image, 0, torch.device("cpu"))
        row = {"image": name, "opencv": median_ms(lambda: opencv.detect(host, count, False), host.device,
                                                  args.warmup, args.repeats)}
        reference = opencv.detect(host, count, False)
        for target in devices:
            prepared = prepare_image(image, 0, target)
            row[f"torch {target.type}"] = median_ms(lambda: ours.detect(prepared, count, False), target,
                                                    args.warmup, args.repeats)
        # Agreement of what the timed device computed with OpenCV.
        prepared = prepare_image(image, 0, device)
        gray = torch.from_numpy(prepared.gray).to(device)
        xy, _, valid = ours.candidate_sets(gray, (count * opencv.candidate_factor,))
        candidates = cv2.KeyPoint_convert(single_scale_orb(count * opencv.candidate_factor).detect(host.gray, None))
        row["candidates"] = keypoint_agreement(candidates, xy[0][valid[0]].cpu().numpy(), tolerance_px=0.0)[0]
        detected = ours.detect(prepared, count, False)
        row["keypoints"], row["angle"] = keypoint_agreement(
            reference.xy.numpy(), detected.xy.cpu().numpy(), reference.orientations.numpy(),
            detected.orientations.cpu().numpy())
        row["count"] = f"{len(reference)} / {len(detected)}"
        if device.type == "cuda":
            row["syncs"] = count_synchronisations(lambda: ours.detect(prepared, count, False))
        rows.append(row)
        print(row, flush=True)

    extraction = {}
    try:
        for label, config in (("ORB (opencv) + ALIKED", FeatureConfig(orb_backend="opencv")),
                              ("ORB (torch) + ALIKED", FeatureConfig(orb_backend="torch")),
                              ("ALIKED alone", FeatureConfig(detector="aliked"))):
            config = FeatureConfig(**{**vars(config), "max_keypoints": count, "resize_max": 0})
            precision = "fp16" if device.type == "cuda" else "fp32"
            extractor = FeatureExtractor(config, device, precision)
            extraction[label] = statistics.median(
                median_ms(lambda: extractor(image), device, args.warmup, args.extraction_repeats or args.repeats)
                for image in list(images.values())[:args.extraction_images])
    except Exception as error:  # noqa: BLE001 - the weights are optional here; say why the rows are missing
        print(f"extraction with ALIKED not timed: {error}", flush=True)

    columns = ["opencv"] + [f"torch {target.type}" for target in devices]
    lines = [f"# ORB single-scale keypoints: OpenCV vs torch ({args.device})", "",
             f"Command: `python benchmarks/orb_torch.py {' '.join(sys.argv[1:])}`", "",
             f"Machine: {machine(device)}.", "",
             f"{SIZE[0]}x{SIZE[1]} images, {count} keypoints, NMS radius {args.nms_radius}; median ms per image over "
             f"{args.repeats} runs after {args.warmup} warm-up runs. `opencv` = OpenCV ORB on the host + NMS + grid "
             "(the opencv backend); `torch` = features/orb_torch.py, including the upload of the gray image. "
             "Agreement with the opencv backend: `candidates` = fraction of OpenCV's ORB candidates (before NMS) "
             "found by torch at the same pixel; `keypoints` = fraction of the final OpenCV keypoints with a torch "
             "keypoint within 1 px; `angle` = median orientation difference in degrees; `count` = keypoints "
             "opencv / torch.", "",
             "| image | " + " | ".join(f"{c} ms" for c in columns) + " | candidates | keypoints | angle deg | count |",
             "|---|" + "---:|" * (len(columns) + 3) + "---:|"]
    for row in rows:
        lines.append(f"| {row['image']} | " + " | ".join(f"{row[c]:.2f}" for c in columns)
                     + f" | {row['candidates']:.4f} | {row['keypoints']:.4f} | {row['angle']:.3f} | {row['count']} |")
    lines.append("| **median** | " + " | ".join(f"**{statistics.median(r[c] for r in rows):.2f}**" for c in columns)
                 + f" | {min(r['candidates'] for r in rows):.4f} (min) | {min(r['keypoints'] for r in rows):.4f} (min)"
                 + f" | {max(r['angle'] for r in rows):.3f} (max) | |")
    if device.type == "cuda":
        lines += ["", "Host synchronisations per torch detection (torch.cuda sync debug mode): "
                  + ", ".join(sorted({str(row["syncs"]) for row in rows})) + "."]
    if extraction:
        lines += ["", f"Whole extraction on {args.device} (keypoints + ALIKED descriptors, "
                  f"{'fp16' if device.type == 'cuda' else 'fp32'}), median ms per image:", "",
                  "| extraction | ms |", "|---|---:|"]
        lines += [f"| {label} | {ms:.2f} |" for label, ms in extraction.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
