"""tokred.zoo: the tiny offline checkpoints load with the Auto classes, process images and videos
with the expected number of placeholder tokens, and generate on CPU."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin
from transformers.video_utils import VideoMetadata

import tokred.zoo.builders as builders
from tokred.zoo import FAMILIES, build
from tokred.zoo.datasets import ANSWERS

MODEL_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
VIDEO_FAMILIES = ("llava_onevision", *QWEN)
QUESTION = "what colour is the circle?"

SQUARE = (112, 112)  # PIL (width, height)
TALL = (56, 84)
# Image tokens per image, worked out from each family's geometry (see tokred/zoo/families/):
# LLaVA always 16; OneVision AnyRes 16 base + tiles + newlines; Qwen2 one token per 28x28 px,
# Qwen3 one per 32x32 px (112 -> 128 px after rounding, 56x84 -> 64x96 px).
IMAGE_TOKENS = {
    "llava": {SQUARE: 16, TALL: 16},
    "llava_onevision": {SQUARE: 16 + 8 * 8 + 8, TALL: 16 + 6 * 4 + 6},
    "qwen2_vl": {SQUARE: 16, TALL: 6},
    "qwen2_5_vl": {SQUARE: 16, TALL: 6},
    "qwen3_vl": {SQUARE: 16, TALL: 6},
}
N_FRAMES = 8
# 8 frames of 112x112: OneVision pools 4 tokens per frame + 1 newline; Qwen merges frame pairs.
VIDEO_TOKENS = {"llava_onevision": 4 * N_FRAMES + 1, "qwen2_vl": 64, "qwen2_5_vl": 64, "qwen3_vl": 64}


@dataclass
class Zoo:
    family: str
    model: PreTrainedModel
    processor: ProcessorMixin

    def prompt(self, *items: str, text: str = QUESTION) -> str:
        content = [{"type": item} for item in items] + [{"type": "text", "text": text}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def count(self, input_ids: torch.Tensor, token_id: int) -> list[int]:
        return (input_ids == token_id).sum(-1).tolist()

    def generate(self, inputs: dict, **kwargs) -> torch.Tensor:
        """Greedy 4-token generation; checks the prompt is kept and at most 4 tokens were added."""
        out = self.model.generate(**inputs, max_new_tokens=4, do_sample=False, **kwargs)
        length = inputs["input_ids"].shape[1]
        assert out.shape[0] == inputs["input_ids"].shape[0]
        assert length < out.shape[1] <= length + 4
        assert torch.equal(out[:, :length], inputs["input_ids"])
        assert all(isinstance(s, str) for s in self.processor.batch_decode(out, skip_special_tokens=True))
        return out


def image(size: tuple[int, int], colour: str = "white") -> Image.Image:
    return Image.new("RGB", size, colour)


def frames(n: int = N_FRAMES) -> list[Image.Image]:
    return [Image.new("RGB", SQUARE, (30 * i, 60, 90)) for i in range(n)]


@pytest.fixture(scope="module", params=FAMILIES)
def zoo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    path = build(request.param, tmp_path_factory.mktemp(request.param))
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    return Zoo(request.param, model, AutoProcessor.from_pretrained(path))


def test_model_and_config(zoo: Zoo) -> None:
    model, tok = zoo.model, zoo.processor.tokenizer
    config, text = model.config, model.config.text_config
    assert type(model).__name__ == MODEL_CLASSES[zoo.family]
    assert next(model.parameters()).dtype == torch.float32
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (4, 4, 2)
    assert text.vocab_size == len(tok)
    assert tok.pad_token is not None and tok.padding_side == "left"
    assert config.image_token_id == tok.convert_tokens_to_ids("<image>" if "llava" in zoo.family else "<|image_pad|>")
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    if zoo.family == "llava_onevision":
        assert config.video_token_id == tok.convert_tokens_to_ids("<video>")
    if zoo.family in QWEN:
        assert config.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
        assert config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
        assert config.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    vision = config.vision_config
    if zoo.family == "qwen2_5_vl":
        assert max(vision.fullatt_block_indexes) < vision.depth
        assert vision.window_size % (vision.patch_size * vision.spatial_merge_size) == 0
    if zoo.family == "qwen3_vl":
        assert vision.deepstack_visual_indexes == [0, 1] and vision.depth == 3


def test_tokenizer_round_trip(zoo: Zoo) -> None:
    tok = zoo.processor.tokenizer
    for text in (QUESTION, "Describe the 3 objects: shape, colour & size (zebra!) ünïcode"):
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    prompt = zoo.prompt()
    assert zoo.processor.decode(tok(prompt).input_ids, skip_special_tokens=False) == (tok.bos_token or "") + prompt


def test_chat_template(zoo: Zoo) -> None:
    expected = {
        "llava": f"USER: <image>\n{QUESTION} ASSISTANT:",
        "llava_onevision": f"<|im_start|>user\n<image>\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n",
    }
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    qwen = f"<|im_start|>user\n{vision}{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    assert zoo.prompt("image") == expected.get(zoo.family, qwen)
    chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a circle"}]},
        {"role": "user", "content": "and the colour?"},
    ]
    text = zoo.processor.apply_chat_template(chat, add_generation_prompt=False)
    assert text.index("what shape?") < text.index("a circle") < text.index("and the colour?")
    assert not text.rstrip().endswith(("ASSISTANT:", "<|im_start|>assistant"))


def test_single_image_generate(zoo: Zoo) -> None:
    inputs = zoo.processor(images=[image(SQUARE)], text=[zoo.prompt("image")], return_tensors="pt")
    n_tokens = IMAGE_TOKENS[zoo.family][SQUARE]
    assert zoo.count(inputs["input_ids"], zoo.model.config.image_token_id) == [n_tokens]
    if zoo.family in QWEN:
        merge = zoo.processor.image_processor.merge_size
        assert inputs["image_grid_thw"].prod(-1).tolist() == [n_tokens * merge**2]
    out = zoo.generate(inputs, min_new_tokens=4)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert QUESTION in zoo.processor.batch_decode(out, skip_special_tokens=True)[0]


def test_batch_left_padding(zoo: Zoo) -> None:
    texts = [zoo.prompt("image"), zoo.prompt("image", text="describe the big red square on the left, briefly please")]
    inputs = zoo.processor(images=[image(SQUARE), image(TALL, "red")], text=texts, return_tensors="pt", padding=True)
    assert zoo.count(inputs["input_ids"], zoo.model.config.image_token_id) == [
        IMAGE_TOKENS[zoo.family][SQUARE],
        IMAGE_TOKENS[zoo.family][TALL],
    ]
    mask = inputs["attention_mask"]
    short = int(mask.sum(-1).argmin())
    assert mask[short, 0] == 0 and mask[:, -1].all()
    assert inputs["input_ids"][short, 0] == zoo.processor.tokenizer.pad_token_id
    zoo.generate(inputs)


def test_two_images_in_one_prompt(zoo: Zoo) -> None:
    inputs = zoo.processor(
        images=[[image(SQUARE), image(TALL, "red")]], text=[zoo.prompt("image", "image")], return_tensors="pt"
    )
    # OneVision falls back to the 16 base tokens + 1 newline per image when a prompt has several.
    per_image = {"llava_onevision": [17, 17]}.get(zoo.family, list(IMAGE_TOKENS[zoo.family].values()))
    assert zoo.count(inputs["input_ids"], zoo.model.config.image_token_id) == [sum(per_image)]
    zoo.generate(inputs)


@pytest.mark.parametrize("zoo", VIDEO_FAMILIES, indirect=True)
def test_video(zoo: Zoo) -> None:
    inputs = zoo.processor(videos=[frames()], text=[zoo.prompt("video")], return_tensors="pt")
    n_tokens = VIDEO_TOKENS[zoo.family]
    assert zoo.count(inputs["input_ids"], zoo.model.config.video_token_id) == [n_tokens]
    if zoo.family in QWEN:
        grid = inputs["video_grid_thw"]
        assert grid.tolist() == [[N_FRAMES // 2, 8, 8]]
        assert grid.prod(-1).tolist() == [n_tokens * zoo.processor.video_processor.merge_size**2]
    zoo.generate(inputs)


@pytest.mark.parametrize("zoo", ["qwen3_vl"], indirect=True)
def test_qwen3_video_timestamps(zoo: Zoo) -> None:
    metadata = VideoMetadata(total_num_frames=N_FRAMES, fps=4.0, frames_indices=list(range(N_FRAMES)))
    inputs = zoo.processor(
        videos=[frames()], video_metadata=[metadata], text=[zoo.prompt("video")], return_tensors="pt"
    )
    text = zoo.processor.decode(inputs["input_ids"][0])
    # one "<t seconds>" marker per frame pair, at the pair's mean time, opening that pair's vision tokens (5.25
    # dropped the template's own outer <|vision_start|>, so only the markers' count is fixed)
    markers = [f"<{t} seconds><|vision_start|>" for t in ("0.1", "0.6", "1.1", "1.6")]
    assert [text.count(m) for m in markers] == [1] * (N_FRAMES // 2)
    zoo.generate(inputs)


def test_unknown_family() -> None:
    with pytest.raises(ValueError, match="llava_onevision.*qwen3_vl"):
        build("blip2")


def test_seed_is_deterministic(tmp_path) -> None:
    weights = [
        load_file(build("qwen2_vl", tmp_path / name, seed=seed) / "model.safetensors")
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_cache_reuse_and_rebuild(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKRED_CACHE", str(tmp_path))
    path = build("qwen3_vl", seed=3)
    assert path == tmp_path / "zoo" / "qwen3_vl-s3"
    marker = json.loads((path / builders.MARKER).read_text())
    assert (marker["family"], marker["seed"]) == ("qwen3_vl", 3)

    def fail(*args, **kwargs):
        raise AssertionError("a complete cached build must be reused")

    with monkeypatch.context() as m:
        m.setattr(builders, "_write", fail)
        assert build("qwen3_vl", seed=3) == path

    marker["transformers"] = "0.0.0"  # as if built by another transformers version
    (path / builders.MARKER).write_text(json.dumps(marker))
    assert build("qwen3_vl", seed=3) == path
    assert json.loads((path / builders.MARKER).read_text())["transformers"] != "0.0.0"

    deeper = build("qwen3_vl", seed=3, num_hidden_layers=6)
    assert deeper != path and deeper.parent == path.parent
    config = AutoModelForImageTextToText.from_pretrained(deeper).config
    assert config.text_config.num_hidden_layers == 6


@pytest.mark.parametrize(
    ("family", "vision"),
    [("qwen2_5_vl", {"depth": 4, "fullatt_block_indexes": [3]}), ("llava", {"patch_size": 28, "num_hidden_layers": 3})],
)
def test_vision_and_image_size_overrides(tmp_path, family, vision) -> None:
    """A 448 px image becomes 16x16 LLM tokens with the trained checkpoints' tower settings, and runs."""
    path = build(family, tmp_path / family, vision=vision, image_size=448)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    tower = model.config.vision_config
    assert all(getattr(tower, key) == value for key, value in vision.items())
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True,
    )
    inputs = processor(text=[prompt], images=[image((448, 448))], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 256
    with torch.inference_mode():
        assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape


def test_image_size_lets_qwen_take_half_size_frames_whole(tmp_path) -> None:
    """With 448 px images, 224 px clips (MotionVQA) keep their size: 16 frames -> 8 x 8 x 8 tokens; default 112."""
    frames = [image((224, 224)) for _ in range(16)]
    for size, tokens in ((448, 8 * 64), (None, 8 * 16)):
        processor = AutoProcessor.from_pretrained(build("qwen2_5_vl", tmp_path / str(size), image_size=size))
        inputs = processor(text=["<|vision_start|><|video_pad|><|vision_end|>"], videos=[frames], return_tensors="pt")
        assert int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")).sum()) == tokens


def test_every_task_answer_is_one_token(zoo: Zoo) -> None:
    """An answer's first token decides it: the model makes one choice per answer, and the eval's answer KL
    (over the first answer token) compares whole answers."""
    tok = zoo.processor.tokenizer
    for answer in sorted({a for answers in ANSWERS.values() for a in answers}):
        for text in (answer, " " + answer):
            assert len(tok(text, add_special_tokens=False).input_ids) == 1, text
