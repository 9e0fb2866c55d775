"""Cost of the ERNIE 4.5 VL processor on CPU: a 1280x720 image and a 30 s 720p video.

    python bench/bench_vl_processor.py [--repeat 3] [--threads N]

Each case runs in a fresh process so its peak RSS (minus the RSS before the case) is its own;
times are the best of --repeat runs, the video's peak RSS is exact only with --repeat 1 (later
repeats start after the step-by-step pass, which holds extra frame copies).
The video is written once (H.264, 30 fps) to a temporary folder; sampling is the default 2 fps.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_inputs(folder: Path) -> tuple[Path, Path]:
    import av
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:720, 0:1280]
    base = np.stack([x * 255 // 1279, y * 255 // 719, (x + y) % 256], -1).astype(np.uint8)
    image = folder / "image.png"
    Image.fromarray(base).save(image)
    video = folder / "video.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        for i in range(30 * 30):
            frame = av.VideoFrame.from_ndarray(np.roll(base, i * 4, axis=1), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return image, video


def run_case(case: str, path: str, repeat: int, threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from models.ernie4_5_vl_processor import (
        Ernie45VLProcessor, draw_timestamp, image_tensor, resize_uint8, sample_frame_indices, smart_resize, timestamp_text,
    )
    from models.media import read_video

    sys.path.insert(0, str(ROOT / "tests"))
    from vl_helpers import write_vl_tokenizer  # the tiny VL tokenizer: prompt cost is not measured here

    folder = Path(tempfile.mkdtemp())
    write_vl_tokenizer(folder)
    from models import load_tokenizer

    processor = Ernie45VLProcessor(load_tokenizer(folder))
    before = peak = rss_mib()
    timings: dict[str, list[float]] = {}

    def timed(name, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        timings.setdefault(name, []).append((time.perf_counter() - start) * 1000)
        return result

    for _ in range(repeat):
        if case == "image":
            out = timed("total", processor.process_images, [path])
            shape, peak = list(out["pixel_values"].shape), rss_mib()
        else:
            out = timed("total (sample_video + process_video)", lambda: processor.process_video(processor.sample_video(path)))
            peak = rss_mib()  # before the step-by-step pass below, which holds extra copies
            config = processor.video
            info, indices, frames = timed("decode+sample", read_video, path, lambda i: sample_frame_indices(i, config.fps, config.min_frames, config.max_frames))
            size = smart_resize(info.height, info.width, 28, config.min_pixels, config.max_pixels)
            timed("timestamps", lambda: [draw_timestamp(f, timestamp_text(i / info.fps), config.font) for f, i in zip(frames, indices)])
            timed("resize", lambda: [resize_uint8(image_tensor(f), size) for f in frames])
            timed("normalise+patches", processor.process_video, processor.sample_video(path))
            del info, indices, frames
            shape = list(out["pixel_values_videos"].shape)
    return {
        "case": case, "output": shape, "ms": {k: round(min(v), 1) for k, v in timings.items()},
        "peak_rss_delta_mib": round(peak - before, 1), "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.path, args.repeat, args.threads)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        image, video = write_inputs(Path(tmp))
        for case, path in (("image", image), ("video", video)):
            command = [sys.executable, __file__, "--case", case, "--path", str(path), "--repeat", str(args.repeat)]
            if args.threads:
                command += ["--threads", str(args.threads)]
            print(subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip())


if __name__ == "__main__":
    main()
