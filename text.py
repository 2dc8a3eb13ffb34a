"""The text side of the text-to-image model: a frozen pretrained text encoder, and the CLIP score.

The paper does not name its text encoder: ours is T5-XXL's (google/t5-v1_1-xxl, as in FLUX),
over at most 128 tokens (`--max_length`); `--text_encoder` takes any that `transformers` loads.
"""

import warnings

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from baselines import from_pretrained
from common import UserError

DEFAULT_TEXT_ENCODER = "google/t5-v1_1-xxl"
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def load_tokenizer(name: str, what: str):
    """AutoTokenizer.from_pretrained(name), refused if it maps different words to the same ids:
    without its vocabulary files every word is unknown: captions of a length get the same states."""
    tokenizer = from_pretrained(transformers.AutoTokenizer, name, what)
    words = ["red", "blue", "disc", "ring", "left"]
    if len({tuple(ids) for ids in tokenizer(words)["input_ids"]}) < len(words):
        raise UserError(f"the {what} in {name} maps different words to the same tokens: its files "
                        "(tokenizer.json, spiece.model, vocab.json...) are missing or damaged")
    return tokenizer


def read_prompts(path: str) -> list[str]:
    """The non-empty lines of a prompt file, stripped (utf-8-sig: no Windows byte-order mark)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:  # missing, a folder, or not UTF-8 text
        raise UserError(f"cannot read the prompt file {path} ({e})") from None
    if not prompts:
        raise UserError(f"the prompt file {path} holds no prompts")
    return prompts


class TextEncoder:
    """Captions -> (states (B, max_length, D), mask (B, max_length) bool) of a frozen encoder:
    padded to max_length (every batch one shape), longer ones cut there."""

    def __init__(self, name: str = DEFAULT_TEXT_ENCODER, max_length: int = 128, device="cpu",
                 dtype=torch.float32):
        self.name, self.max_length, self.device = name, max_length, torch.device(device)
        config = from_pretrained(transformers.AutoConfig, name, "text encoder")
        self.tokenizer = load_tokenizer(name, "text encoder's tokenizer")
        # No limit from T5's relative positions or ByT5's tokenizer (1e30): T5's training length.
        pos = getattr(getattr(config, "text_config", config), "max_position_embeddings", None)
        limit = min([v for v in (pos, self.tokenizer.model_max_length) if v and v < 1e6] or [512])
        if max_length > limit:
            raise UserError(f"--max_length {max_length} is more than the {limit} tokens of {name}")
        # AutoModel would give T5's encoder-decoder and the whole CLIP
        cls = {"t5": transformers.T5EncoderModel, "umt5": transformers.UMT5EncoderModel,
               "clip": transformers.CLIPTextModel}.get(config.model_type, transformers.AutoModel)
        model = from_pretrained(cls, name, "text encoder", dtype=dtype)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.dim = getattr(self.model.config, "d_model", None) or self.model.config.hidden_size

    @torch.no_grad()
    def __call__(self, captions: list[str], warn: bool = False):
        if warn:  # sampling: say which prompts are cut, once each
            for caption, ids in dict(zip(captions, self.tokenizer(captions)["input_ids"])).items():
                if len(ids) > self.max_length:
                    warnings.warn(f"prompt longer than the text encoder's {self.max_length} "
                                  f"tokens, cut there: {caption[:80]!r}")
        tokens = self.tokenizer(captions, padding="max_length", max_length=self.max_length,
                                truncation=True, return_tensors="pt").to(self.device)
        out = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        return out.last_hidden_state, tokens.attention_mask.bool()


@torch.no_grad()
def clip_score(images, prompts: list[str], name: str = "openai/clip-vit-large-patch14",
               device="cpu", batch_size: int = 64) -> float:
    """100 * mean of max(cos(image embedding, prompt embedding), 0), as torchmetrics' CLIPScore,
    after CLIP's preprocessing (short side resized, centre crop); images: uint8 (N, H, W, 3)."""
    model = from_pretrained(transformers.CLIPModel, name, "CLIP model").to(device).eval()
    tokenizer = load_tokenizer(name, "CLIP tokenizer")
    size = model.config.vision_config.image_size
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    scores = []
    for i in range(0, len(prompts), batch_size):
        x = torch.from_numpy(images[i: i + batch_size]).to(device).permute(0, 3, 1, 2).float() / 255
        H, W = (round(side * size / min(x.shape[2:])) for side in x.shape[2:])
        x = F.interpolate(x, size=(H, W), mode="bicubic", antialias=True)  # short side: size
        top, left = (H - size) // 2, (W - size) // 2
        x = (x[:, :, top: top + size, left: left + size].clamp(0, 1) - mean) / std  # centre crop
        text = tokenizer(prompts[i: i + batch_size], padding=True, truncation=True,
                         max_length=model.config.text_config.max_position_embeddings,
                         return_tensors="pt").to(device)
        out = model(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=x)
        scores.append(100 * F.cosine_similarity(out.image_embeds, out.text_embeds, -1).clamp(min=0))
    return torch.cat(scores).mean().item()


def clip_score_npz(samples: str, prompts_file: str, name: str, device) -> dict:
    """CLIP score of sample_t2i.py's .npz, whose arr_1 is each sample's line in the prompt file."""
    if not samples.endswith(".npz"):  # a missing file or a folder: np.load says so below
        raise UserError(f"the CLIP score needs sample_t2i.py's .npz (--npz), not {samples}")
    try:
        with np.load(samples) as data:
            images, lines = data["arr_0"], data["arr_1"]  # arr_1: each sample's prompt line
    except Exception as e:  # missing, a folder, not a zip, no arr_1, pickled objects...
        pickled = "pickle" in str(e)  # numpy's message would advise the unsafe allow_pickle
        why = "it holds Python objects" if pickled else str(e).split(". ")[0]
        raise UserError(f"could not read {samples} as sample_t2i.py's .npz ({why})") from None
    prompts = read_prompts(prompts_file)
    low, high = (lines.min(), lines.max()) if lines.size else (0, 0)
    # A float, missing, negative (Python counts from the end) or too large line: another prompt.
    if (lines.dtype.kind not in "iu" or lines.shape != images.shape[:1]
            or not 0 <= low <= high < len(prompts)):
        raise UserError(f"{samples}: arr_1 must hold {len(images)} integers from 0 to "
                        f"{len(prompts) - 1} (lines of {prompts_file}: pass the one it was sampled "
                        f"from), not {lines.dtype} {lines.shape} from {low} to {high}")
    score = clip_score(images, [prompts[i] for i in lines], name, device)
    return {"clip_score": score, "clip_model": name, "prompts": prompts_file}


def save_random_text_encoder(folder: str, dim: int = 64, layers: int = 2, seed: int = 0) -> str:
    """A small RANDOMLY initialised T5 encoder with ByT5's byte-level tokenizer (no vocabulary
    file) for `--text_encoder`: the offline demo's and the tests'. Its states differ by caption."""
    transformers.utils.logging.disable_progress_bar()
    config = transformers.T5Config(vocab_size=384, d_model=dim, d_kv=dim // 4, d_ff=2 * dim,
                                   num_layers=layers, num_heads=4)
    with torch.random.fork_rng():  # seeded, and the caller's random state untouched
        torch.manual_seed(seed)
        transformers.T5EncoderModel(config).save_pretrained(folder)
    transformers.ByT5Tokenizer().save_pretrained(folder)
    return folder
