"""Reading user media: images with Pillow, videos with PyAV, failures as one readable MediaError.

RGB conversion and frame decoding follow transformers' loaders (image_utils.load_image,
image_transforms.convert_to_rgb, video_utils.read_video_pyav), so pixels reach the processor as
they reach the reference's.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import av
from PIL import Image, ImageOps

ImageSource = str | os.PathLike | Image.Image


class MediaError(ValueError):
    """A file or image the processor cannot use; the message is meant for the end user."""


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers converts PIL inputs: transparent pixels (an alpha band or a
    `transparency` entry) are composited onto white, every other mode uses Pillow's convert."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: ImageSource) -> Image.Image:
    """An RGB image from a PIL image or a file path (first frame of animations).

    Files are read as transformers reads paths (EXIF orientation applied, then a plain
    convert("RGB"), so transparent areas keep their hidden colour); PIL images go through `to_rgb`."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    name = os.path.basename(os.fspath(source))
    try:
        with Image.open(source) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except FileNotFoundError:
        raise MediaError(f"Image file {name!r} was not found.") from None
    except Image.DecompressionBombError:
        raise MediaError(f"Image {name!r} is too large to open safely.") from None
    except (OSError, SyntaxError, ValueError):  # UnidentifiedImageError is an OSError; its text names server paths
        raise MediaError(f"{name!r} is not a readable image file (PNG, JPEG, WebP, GIF, ...).") from None


@dataclass
class VideoInfo:
    total_frames: int
    fps: float
    width: int
    height: int


# transformers' fallback when a stream declares no frame rate.
DEFAULT_SOURCE_FPS = 24.0


def read_video(
    path: str | os.PathLike, select: Callable[[VideoInfo], Sequence[int]]
) -> tuple[VideoInfo, list[int], list[Image.Image]]:
    """Decode the frames `select(info)` picks (ascending indices into the decoded order).

    Frame count and rate are the stream's (`frames`, `average_rate`) as in transformers; when the
    container does not record a frame count it is counted from the packets. Returns the info, the
    indices actually decoded (a stream may hold fewer frames than it declares) and RGB frames."""
    name = os.path.basename(os.fspath(path))
    if not os.path.isfile(path):
        raise MediaError(f"Video file {name!r} was not found.")
    if os.path.getsize(path) == 0:
        raise MediaError(f"Video file {name!r} is empty.")
    try:
        with av.open(os.fspath(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{name!r} has no video stream.")
            if container.format.name == "image2" or container.format.name.endswith("_pipe"):  # still-image demuxers
                raise MediaError(f"{name!r} is a still image, not a video.")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # decoding threads change speed, not pixels
            total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
            if total <= 0:
                raise MediaError(f"Video {name!r} has no frames.")
            fps = float(stream.average_rate) if stream.average_rate else DEFAULT_SOURCE_FPS
            info = VideoInfo(int(total), fps, stream.width, stream.height)
            wanted = list(select(info))
            container.seek(0)
            chosen, frames = [], []
            targets = set(wanted)
            for index, frame in enumerate(container.decode(stream)):
                if index > wanted[-1]:
                    break
                if index in targets:
                    chosen.append(index)
                    frames.append(frame.to_image())
    except av.FFmpegError as error:
        raise MediaError(f"{name!r} is not a readable video ({error.strerror or error}).") from None
    if not frames:
        raise MediaError(f"No frame of video {name!r} could be decoded.")
    return info, chosen, frames
