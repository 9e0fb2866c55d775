"""ERNIE 4.5 VL processor against transformers 5.23's Ernie4_5_VLMoe processor.

What runs where (torchvision does not import here, architecture.md §8.19):
- Images: transformers' PIL backend is the oracle. We reproduce its default torchvision backend,
  which resizes with torch's uint8 bicubic antialias kernel; that kernel and PIL's differ by one
  level on a small share of values, hence PIXEL_TOLERANCE (one uint8 level after normalisation)
  and a cap on how many values may use it. Layout and grids must match exactly.
- The torchvision-backend reproduction is checked exactly against torch.nn.functional.interpolate
  on uint8 (what torchvision 0.28 `resize_image` calls on CPU for uint8 bicubic).
- Videos: transformers' own PyAV reader (video_utils.read_video_pyav) and its video processor's
  `sample_frames`, `_convert_timestamp`, `_render_image_with_timestamp` and `_preprocess` (run
  with resizing and normalisation off, i.e. the patch layout) are called directly, loaded as
  vl_helpers.reference_video_processor explains. Frame indices, timestamps and stamped frames must
  match exactly; per-frame resizing is the image path's, checked above.
- Prompts: transformers' processor expands and tokenizes (video tensors handed to it by a stub
  video processor, since its own does not import); ids and both type-id tensors must be equal.
"""
from __future__ import annotations

import dataclasses
import functools
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import (
    Ernie4_5_VLMoeImageProcessorPil,
    smart_resize as reference_smart_resize,
)
from transformers.models.ernie4_5_vl_moe.processing_ernie4_5_vl_moe import Ernie4_5_VLMoeProcessor
from transformers.video_utils import read_video_pyav

from models.ernie4_5_vl_processor import (
    CLIP_STD,
    SampledVideo,
    load_processor,
    resize_uint8,
    smart_resize,
)
from models.media import MediaError
from vl_helpers import (
    FONT_NAME,
    reference_video_processor,
    write_audio_only,
    write_video,
    write_vl_processor_checkpoint,
)

# torch's uint8 bicubic antialias kernel vs PIL's (measured on these images): at most 2 levels
# apart; 0.2-0.6 % of values differ (1.1 % on a 64-colour palette image), < 0.001 % by 2 levels. One level after normalisation is
# largest in the channel with the smallest std.
LEVEL = 1 / (255 * min(CLIP_STD))
MAX_LEVELS = 2
MAX_DIFFERING_SHARE = 0.02  # values differing at all (beyond float rounding)
MAX_TWO_LEVEL_SHARE = 1e-4  # values differing by more than one level


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_vl_processor_checkpoint(tmp_path_factory.mktemp("vl"))


@pytest.fixture(scope="module")
def processor(folder):
    return load_processor(folder)


@pytest.fixture(scope="module")
def reference_video(folder):
    return reference_video_processor(str(folder / FONT_NAME))


class StubVideoProcessor:
    """Hands given video tensors to transformers' processor, which then expands and tokenizes."""

    merge_size, temporal_patch_size = 2, 2

    def __init__(self, outputs: dict) -> None:
        self.outputs = outputs

    def __call__(self, videos, **kwargs) -> BatchFeature:
        return BatchFeature(self.outputs)


class ReferenceProcessor(Ernie4_5_VLMoeProcessor):
    def check_argument_for_proper_class(self, name, argument):  # accept the stub video processor
        return type(argument)


def reference_processor(folder, video_outputs: dict | None = None) -> ReferenceProcessor:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return ReferenceProcessor(
        image_processor=Ernie4_5_VLMoeImageProcessorPil(), tokenizer=tokenizer,
        video_processor=StubVideoProcessor(video_outputs or {}), chat_template=tokenizer.chat_template,
    )


def gradient(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Smooth content plus noise: both resampling paths see edges and flat areas."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], -1)
    rgb = np.clip(rgb + rng.normal(0, 20, rgb.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb)
    if mode == "RGBA":
        alpha = Image.fromarray((x * 255 // max(width - 1, 1)).astype(np.uint8))
        image.putalpha(alpha)
        return image
    if mode == "P_transparent":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        image.info["transparency"] = 3
        return image
    if mode == "I;16":
        return Image.fromarray((np.asarray(image.convert("L"), dtype=np.uint16) * 200).astype(np.uint16), mode="I;16")
    return image.convert(mode)


def assert_pixels_close(ours: torch.Tensor, reference) -> None:
    reference = torch.as_tensor(np.asarray(reference), dtype=torch.float32)
    assert ours.shape == reference.shape and ours.dtype == torch.float32
    levels = (ours - reference).abs() / LEVEL
    assert levels.max().item() <= MAX_LEVELS + 1e-3
    assert (levels > 1e-3).float().mean().item() <= MAX_DIFFERING_SHARE
    assert (levels > 1 + 1e-3).float().mean().item() <= MAX_TWO_LEVEL_SHARE


SIZES = [(1280, 720), (640, 480), (224, 224), (50, 50), (1, 1), (10, 3), (5000, 30), (30, 2000), (3840, 2160), (6000, 4000)]


def test_smart_resize_matches_reference_and_refuses_extreme_strips():
    examples = {(720, 1280): (728, 1288), (1080, 1920): (1092, 1932), (480, 640): (476, 644), (50, 50): (56, 56), (2160, 3840): (1624, 2912)}
    for (h, w), expected in examples.items():
        assert smart_resize(h, w, 28, 3136, 4842768) == expected
    rng = np.random.default_rng(0)
    shapes = [(h, w) for w, h in SIZES] + [tuple(rng.integers(1, 9000, 2)) for _ in range(300)]
    for h, w in shapes:
        if max(h, w) > 200 * min(h, w):
            continue
        for limits in ((3136, 4842768), (234416, 937664)):
            assert smart_resize(int(h), int(w), 28, *limits) == reference_smart_resize(int(h), int(w), 28, *limits)
    with pytest.raises(MediaError, match="200 times"):
        smart_resize(3, 10000, 28, 3136, 4842768)
    with pytest.raises(ValueError):
        reference_smart_resize(3, 10000, 28, 3136, 4842768)


@pytest.mark.parametrize("size", [(97, 61), (1280, 720), (1, 1), (700, 30)])
def test_resize_is_torch_uint8_bicubic_antialias(size):
    """Our torchvision-backend resize is exactly interpolate on uint8; one level from PIL's."""
    image = gradient(*size)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()[None]
    target = smart_resize(size[1], size[0], 28, 3136, 4842768)
    ours = resize_uint8(pixels, target)
    expected = torch.nn.functional.interpolate(pixels, size=target, mode="bicubic", antialias=True, align_corners=False)
    assert ours.dtype == torch.uint8 and torch.equal(ours, expected)
    pil = np.asarray(image.resize(target[::-1], Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    diff = (ours[0].int() - torch.from_numpy(pil.copy()).int()).abs()
    assert diff.max() <= MAX_LEVELS and (diff > 0).float().mean() <= MAX_DIFFERING_SHARE
    assert (diff > 1).float().mean() <= MAX_TWO_LEVEL_SHARE


def test_normalisation_and_layout_equal_reference_on_the_same_resized_pixels(processor):
    """Without the resampler difference (input already at its target size), pixel_values equal the
    reference's up to float rounding: fused torchvision-style vs PIL-backend normalisation."""
    image = gradient(84, 56)
    ours = processor.process_images([image])
    reference = Ernie4_5_VLMoeImageProcessorPil()(images=[image], return_tensors="np")
    torch.testing.assert_close(ours["pixel_values"], torch.from_numpy(reference["pixel_values"]), atol=2e-6, rtol=0)
    assert ours["image_grid_thw"].tolist() == reference["image_grid_thw"].tolist() == [[1, 4, 6]]


@pytest.mark.parametrize("size", SIZES)
def test_images_match_reference(processor, size):
    if max(size) > 200 * min(size):
        pytest.skip("refused by both, see the smart_resize test")
    image = gradient(*size)
    ours = processor.process_images([image])
    reference = Ernie4_5_VLMoeImageProcessorPil()(images=[image], return_tensors="np")
    assert ours["image_grid_thw"].tolist() == reference["image_grid_thw"].tolist()
    assert_pixels_close(ours["pixel_values"], reference["pixel_values"])
    h, w = ours["image_grid_thw"][0, 1:].tolist()
    assert 3136 <= h * w * 196 <= 6177 * 28 * 28 and h % 2 == w % 2 == 0


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P_transparent", "P", "CMYK", "L", "1", "I;16", "YCbCr"])
def test_image_modes_match_reference(processor, mode):
    image = gradient(150, 90, mode)
    ours = processor.process_images([image])
    reference = Ernie4_5_VLMoeImageProcessorPil()(images=[image], return_tensors="np")
    assert ours["image_grid_thw"].tolist() == reference["image_grid_thw"].tolist()
    assert_pixels_close(ours["pixel_values"], reference["pixel_values"])


def test_image_files_match_reference(processor, folder, tmp_path):
    """Paths load as transformers loads them (EXIF orientation, convert("RGB")); GIFs: frame one."""
    png, gif = tmp_path / "alpha.png", tmp_path / "anim.gif"
    gradient(120, 80, "RGBA").save(png)
    frames = [gradient(90, 70, seed=i) for i in range(3)]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°
    gradient(160, 60).save(rotated, exif=exif)
    paths = [str(png), str(gif), str(rotated)]
    ours = processor.process_images(paths)
    reference = reference_processor(folder).image_processor(images=reference_processor(folder).image_processor.fetch_images(paths), return_tensors="np")
    assert ours["image_grid_thw"].tolist() == reference["image_grid_thw"].tolist()
    assert ours["image_grid_thw"][2, 1] > ours["image_grid_thw"][2, 2]  # portrait after EXIF rotation
    assert_pixels_close(ours["pixel_values"], reference["pixel_values"])


CONVERSATIONS = {
    "image_then_text": lambda media: [{"role": "user", "content": [media["image"], {"type": "text", "text": "What is this?"}]}],
    "system_two_images_video": lambda media: [
        {"role": "system", "content": "You are ERNIE."},
        {"role": "user", "content": [{"type": "text", "text": "Compare"}, media["image"], media["wide"], media["video"]]},
    ],
    "multi_turn": lambda media: [
        {"role": "user", "content": [media["image"], {"type": "text", "text": "Describe."}]},
        {"role": "assistant", "content": "A gradient."},
        {"role": "user", "content": [media["video"], {"type": "text", "text": "And this video?"}]},
    ],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("enable_thinking", [False, True])
def test_prompts_match_reference(processor, folder, tmp_path, name, enable_thinking):
    path = write_video(tmp_path / "clip.mp4", 1, 8)
    media = {
        "image": {"type": "image", "image": gradient(200, 120)},
        "wide": {"type": "image", "image": gradient(900, 100, seed=1)},
        "video": {"type": "video", "video": str(path)},
    }
    messages = CONVERSATIONS[name](media)
    ours = processor.apply_chat_template(messages, enable_thinking=enable_thinking)
    video_outputs = processor.process_video(processor.sample_video(path)) if ours.videos else {}
    reference = reference_processor(folder, video_outputs).apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=True, enable_thinking=enable_thinking, return_tensors="pt"
    )
    assert set(ours) == set(reference)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "moe_mm_token_type_ids", "image_grid_thw", "video_grid_thw"):
        if key in reference:
            assert torch.equal(ours[key], torch.as_tensor(reference[key]).long()), key
    assert_pixels_close(ours["pixel_values"], reference["pixel_values"])
    prompt = processor.tokenizer.decode(ours["input_ids"][0].tolist())
    assert prompt.endswith("<think>" if enable_thinking else "<think>\n\n</think>\n\n")
    assert "Picture 1:<|IMAGE_START|><|IMAGE_PLACEHOLDER|>" in prompt
    image_tokens = (ours["input_ids"] == processor.token_ids["image_token"]).sum().item()
    assert image_tokens == (ours["image_grid_thw"].prod(-1) // 4).sum().item()
    if "video_grid_thw" in ours:
        assert "Video 1:<|VIDEO_START|><|VIDEO_PLACEHOLDER|>" in prompt
        assert torch.equal(ours["pixel_values_videos"], video_outputs["pixel_values_videos"])
        assert len(ours.videos[0].frames) == 8 and ours.videos[0].timestamps[1] == 1 / 8


# (seconds, source fps, fps override, max_frames override); the last ones check sampling only.
VIDEOS = [
    (1, 10, None, None),  # 10 frames < 16: all of them
    (5, 24, None, None),  # 10 at 2 fps -> 16 (min) out of 120
    (5, Fraction(30000, 1001), None, None),  # NTSC rate
    (3, 5, None, None),  # 15 frames: odd, the last is repeated
    (12, 6, 1.0, None),  # overrides
    (8, 10, None, 20),
    (90, 5, None, None),  # 180 frames at 2 fps: the cap
    (100, 4, None, None),  # 200 at 2 fps -> 180
    (40, 6, "none", None),  # no fps: every frame up to 180 (transformers' default)
]


@pytest.mark.parametrize("seconds, rate, fps, max_frames", VIDEOS)
def test_video_sampling_and_stamps_match_reference(processor, reference_video, tmp_path, seconds, rate, fps, max_frames):
    path = write_video(tmp_path / "clip.mp4", seconds, rate, size=(64, 48) if seconds < 30 else (32, 24))
    cls, ref = reference_video
    sample_fps = None if fps == "none" else (fps or 2.0)
    sample = functools.partial(cls.sample_frames, ref, fps=sample_fps, max_frames=max_frames)
    frames, metadata = read_video_pyav(str(path), sample_indices_fn=sample)
    if fps == "none":
        processor = dataclasses.replace(processor, video=dataclasses.replace(processor.video, fps=None))
    ours = processor.sample_video(path, fps=None if fps == "none" else fps, max_frames=max_frames)
    assert ours.indices == metadata.frames_indices.tolist()
    assert ours.timestamps == metadata.timestamps
    assert ours.source.total_frames == metadata.total_num_frames and ours.source.fps == metadata.fps
    size = ours.frames[0].size[::-1]
    for frame, ours_frame, seconds_at in zip(frames, ours.frames, metadata.timestamps):
        stamped = cls._render_image_with_timestamp(ref, torch.from_numpy(frame).permute(2, 0, 1).contiguous(), cls._convert_timestamp(ref, seconds_at))
        expected = resize_uint8(stamped[None], size)[0].permute(1, 2, 0).numpy()
        assert np.array_equal(np.asarray(ours_frame), expected)


@pytest.mark.parametrize("seconds, rate", [(1, 10), (3, 5)])
def test_video_patches_match_reference_layout(processor, reference_video, tmp_path, seconds, rate):
    cls, ref = reference_video
    video = processor.sample_video(write_video(tmp_path / "clip.mp4", seconds, rate))
    ours = processor.process_video(video)
    frames = torch.stack([torch.from_numpy(np.array(f)).permute(2, 0, 1) for f in video.frames])
    if len(frames) % 2:
        frames = torch.cat([frames, frames[-1:]])
    # transformers' fused rescale + normalise (torchvision backend), then its layout code.
    mean = torch.tensor(processor.video.mean) * 255.0
    std = torch.tensor(processor.video.std) * 255.0
    normalised = (frames.float() - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
    reference = cls._preprocess(ref, [normalised], do_resize=False, do_rescale=False, do_normalize=False, patch_size=14, merge_size=2)
    assert torch.equal(ours["video_grid_thw"], reference["video_grid_thw"])
    assert torch.equal(ours["pixel_values_videos"], reference["pixel_values_videos"])
    t, gh, gw = ours["video_grid_thw"][0].tolist()
    assert t % 2 == 0 and 299 * 784 <= gh * gw * 196 <= 1196 * 784
    # Each frame through the image path with the video limits gives the same rows (PIL-backend check).
    per_frame = Ernie4_5_VLMoeImageProcessorPil(size={"shortest_edge": 299 * 784, "longest_edge": 1196 * 784})
    first = per_frame(images=[video.frames[0]], return_tensors="np")["pixel_values"]
    assert_pixels_close(ours["pixel_values_videos"][: gh * gw], first)


def test_huge_video_frames_are_downsized(processor, tmp_path):
    video = processor.sample_video(write_video(tmp_path / "big.mp4", 0.5, 4, size=(1920, 1080)))
    assert len(video.frames) == 2 and video.frames[0].size == (1288, 700)
    assert processor.process_video(video)["video_grid_thw"].tolist() == [[2, 50, 92]]


def test_bad_media_raise_readable_errors(processor, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not media at all\n" * 20)
    fake_video, fake_image = tmp_path / "fake.mp4", tmp_path / "fake.png"
    fake_video.write_bytes(text.read_bytes())
    fake_image.write_bytes(text.read_bytes())
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    good = write_video(tmp_path / "good.mp4", 2, 10)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    no_frames = write_video(tmp_path / "no_frames.mkv", 0, 10)  # a header and no frame
    audio = write_audio_only(tmp_path / "sound.wav")
    still = tmp_path / "still.mp4"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(still, format="PNG")
    cases = {
        fake_video: "not a readable video", empty: "is empty", truncated: "not a readable video",
        no_frames: "not a readable video", audio: "no video stream", tmp_path / "missing.mp4": "not found",
        still: "still image, not a video",
    }
    for path, message in cases.items():
        with pytest.raises(MediaError, match=message):
            processor.sample_video(path)
    with pytest.raises(MediaError, match="not a readable image"):
        processor.process_images([str(fake_image)])
    with pytest.raises(MediaError, match="not found"):
        processor.process_images([str(tmp_path / "missing.png")])
    with pytest.raises(MediaError, match="200 times"):
        processor.process_images([Image.new("RGB", (10000, 3))])
    assert issubclass(MediaError, ValueError)
    assert processor.process_images([Image.new("RGB", (1, 1))])["image_grid_thw"].tolist() == [[1, 4, 4]]


def test_placeholder_count_must_match_media(processor):
    with pytest.raises(ValueError, match="placeholders"):
        processor("<|IMAGE_PLACEHOLDER|> twice <|IMAGE_PLACEHOLDER|>", images=[gradient(60, 60)])


def test_load_processor_reads_nested_config_and_falls_back_without_font(tmp_path):
    folder = write_vl_processor_checkpoint(tmp_path / "nested", nested=True)
    (folder / FONT_NAME).unlink()
    processor = load_processor(folder)
    assert processor.video.font is None and processor.video.fps == 2.0
    assert (processor.image.min_pixels, processor.image.max_pixels) == (3136, 6177 * 784)
    assert (processor.video.min_pixels, processor.video.max_pixels) == (299 * 784, 1196 * 784)
    video = processor.sample_video(write_video(tmp_path / "clip.mp4", 1, 4))
    assert isinstance(video, SampledVideo) and len(video.frames) == 4
    processor.video.draw_on_frames = False
    plain = processor.sample_video(tmp_path / "clip.mp4").frames[0]
    corner = (slice(0, 40), slice(0, 200))  # the stamp, drawn with Pillow's own font
    assert not np.array_equal(np.asarray(video.frames[0])[corner], np.asarray(plain)[corner])
