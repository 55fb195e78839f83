"""
MSD: Momentum Self-Distillation for medical vision-language pretraining, in one file.

Paper: P. Pham, N. Pham, N. Q. Ly, "Boosting Medical Vision-Language Pretraining via Momentum
Self-Distillation under Limited Computing Resources", WACV 2026 (arXiv 2512.02438).
The authors released no code; this is an independent implementation. README.md says which
choices are the paper's and which are ours.

What the method does, in one breath: a student image/text dual encoder is trained CLIP-style, but
every student feature is compared only with features of an EMA ("momentum") copy of the model,
the teacher, and with queues of older teacher features. The teacher's own similarity
distributions are mixed into the one-hot target (self-distillation), and because every key is a
stop-gradient teacher feature, the loss is a plain mean of independent per-pair terms: an
effective batch of B = N * b pairs can be processed as N micro-batches of b with EXACTLY the
gradient of one batch of B.

Read top to bottom, with the paper (and ../shared/PAPER.md) beside it:
  1. Config                 every knob, its default and its meaning
  2. Encoders               Attention, MLP, Block, VisionTransformer, TextTransformer,
                            PostLNBlock, BertTextTransformer (text_arch "bert"), DualEncoder
  2b. Pretrained weights    read_safetensors, read_weights, the BERT and timm-ViT name maps
  3. Momentum teacher       copy_params, momentum_update
  4. Queues                 FeatureQueue: a ring buffer of teacher features and their pair ids
  5. Losses                 msd_loss (PAPER.md section 3) and clip_loss (the end-to-end baseline)
  6. The model              MSD = student + teacher + queues + temperature
  7. Training               get_lr, get_alpha, train_step (PAPER.md section 5), train
  8. Checkpoints and CLI
"""

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data

# -----------------------------------------------------------------------------
# 1. Config
# -----------------------------------------------------------------------------


@dataclass
class Config:
    # data
    data: str = "synth"               # "synth" = the built-in SynthCXR set, else a manifest CSV path
    synth_dir: str = "datasets/synthcxr"  # where the synthetic set is generated on first use
    synth_n: int = 4000               # synthetic studies (train/valid/test = 80/10/10 %)
    synth_size: int = 128             # synthetic image side in pixels
    synth_seed: int = 0               # the synthetic data's seed (independent of `seed`)
    synth_per_class_5x: int = 100     # studies per class in the synthetic 5xN zero-shot set
    image_size: int = 64              # side of the square crop fed to the ViT
    max_len: int = 64                 # tokens per report, [CLS] and [SEP] included
    min_freq: int = 2                 # a word needs this many training occurrences for the vocabulary
    num_workers: int = 0              # DataLoader worker processes (0 = load in the main process)
    cache_images: bool = True         # keep decoded images in memory (fine for small data)
    # model (ViT + BERT-lite from scratch, or published pretrained towers: README "Training on MIMIC-CXR")
    patch_size: int = 8               # ViT patch side; image_size must be a multiple
    vision_width: int = 128           # ViT hidden size
    vision_layers: int = 4            # ViT blocks
    vision_heads: int = 4             # ViT attention heads
    text_width: int = 128             # text encoder hidden size
    text_layers: int = 4              # text encoder blocks
    text_heads: int = 4               # text encoder attention heads
    mlp_ratio: int = 4                # MLP hidden size = mlp_ratio * width
    embed_dim: int = 128              # shared embedding size d (256 at paper scale)
    dropout: float = 0.1              # student dropout; the teacher never uses dropout
    attn_impl: str = "sdpa"           # "sdpa" (fast, fused) or "manual" (softmax(QK^T/sqrt(d))V written out)
    text_arch: str = "lite"           # "lite" (BERT-lite, word vocabulary) or "bert" (text_weights' BERT + WordPiece)
    text_weights: str = ""            # text_arch "bert": folder with config.json, vocab.txt, model.safetensors / pytorch_model.bin
    vision_weights: str = ""          # a timm ViT file (.safetensors / .bin / .pth) to start f_v from; "" = CLIP init
    # method
    method: str = "msd"               # "msd" (momentum teacher + queue + distillation) or "clip" (end to end)
    momentum: float = 0.995           # EMA momentum m per optimizer step
    alpha: float = 0.4                # weight of the teacher's soft target in the mix
    alpha_ramp_steps: int = -1        # optimizer steps over which alpha ramps from 0; -1 = one epoch
    queue_size: int = 1024            # K teacher features per modality (0 = no queue)
    temperature: float = 0.07         # initial tau; learnable, stored as log(1/tau)
    ema_per_micro_batch: bool = False  # reproduce the common bug (EMA per micro-batch = momentum m^N)
    # optimisation
    batch_size: int = 32              # micro-batch b: pairs per forward/backward
    accum_steps: int = 4              # N micro-batches per optimizer step; effective batch B = N * b
    epochs: int = 10                  # passes over the training split
    max_steps: int = 0                # optimizer steps; 0 = run the configured epochs
    lr: float = 3e-4                  # peak learning rate (AdamW)
    min_lr: float = 3e-5              # floor of the cosine schedule
    warmup_steps: int = 50            # linear warm-up, in optimizer steps
    weight_decay: float = 0.02        # on weight matrices only (not biases, norms, temperature)
    grad_clip: float = 1.0            # max gradient norm (0 = no clipping)
    # run
    seed: int = 0                     # model init, data order, augmentation, dropout
    out_dir: str = "runs/small"       # ckpt.pt and log.jsonl go here
    device: str = "auto"              # "auto" (cuda > mps > cpu), "cuda", "mps" or "cpu"
    amp: bool = True                  # bf16 autocast on CUDA (ignored elsewhere)
    log_every: int = 10               # optimizer steps between log.jsonl records
    ckpt_every: int = 0               # optimizer steps between checkpoints (0 = only at the end)
    progress: bool = True             # show the tqdm progress bar


def _coerce(key, value, default, from_cli):
    """Check `value` against the type of `default`; command-line values arrive as strings."""
    kind = type(default)
    if from_cli and kind is not str:
        text = value.strip().lower()
        try:
            if kind is bool:
                if text not in ("true", "false", "1", "0"):
                    raise ValueError
                value = text in ("true", "1")
            else:
                value = kind(text)
        except ValueError:
            raise ValueError(f"config key '{key}': expected {kind.__name__}, got {value!r}") from None
    if kind is float and type(value) is int:
        value = float(value)  # JSON writes 1.0 as 1
    if type(value) is not kind:
        raise TypeError(f"config key '{key}': expected {kind.__name__}, got "
                        f"{type(value).__name__} {value!r}")
    return value


def load_config(path=None, overrides=()):
    """Defaults, then the JSON file at `path`, then `--key=value` overrides; every key type-checked."""
    defaults = Config()
    valid = {f.name for f in fields(Config)}
    values, sources = {}, {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            from_file = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        values.update(from_file)
        sources.update({key: f" in {path}" for key in from_file})
    for item in overrides:
        if not item.startswith("--") or "=" not in item:
            raise ValueError(f"override {item!r}: expected --key=value")
        key, value = item[2:].split("=", 1)
        values[key], sources[key] = value, " on the command line"
    for key, value in values.items():
        if key not in valid:
            raise KeyError(f"unknown config key '{key}'{sources[key]}; "
                           f"valid keys: {', '.join(sorted(valid))}")
        values[key] = _coerce(key, value, getattr(defaults, key),
                              from_cli=sources[key] == " on the command line")
    cfg = Config(**values)
    check_config(cfg)
    return cfg


def check_config(cfg):
    """Values that are the right type but make no sense."""
    if cfg.method not in ("msd", "clip"):
        raise ValueError(f"config key 'method': expected 'msd' or 'clip', got {cfg.method!r}")
    if cfg.attn_impl not in ("sdpa", "manual"):
        raise ValueError(f"config key 'attn_impl': expected 'sdpa' or 'manual', got {cfg.attn_impl!r}")
    if cfg.text_arch not in ("lite", "bert"):
        raise ValueError(f"config key 'text_arch': expected 'lite' or 'bert', got {cfg.text_arch!r}")
    if cfg.text_arch == "bert" and not cfg.text_weights:
        raise ValueError("text_arch 'bert' needs config key 'text_weights': the folder of a BERT-family "
                         "checkpoint (config.json, vocab.txt, model.safetensors or pytorch_model.bin)")
    if cfg.text_arch == "lite" and cfg.text_weights:
        raise ValueError(f"config key 'text_weights' ({cfg.text_weights!r}) is only read with "
                         f"text_arch 'bert'; set --text_arch=bert or leave it empty")
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
    for key in ("batch_size", "accum_steps", "embed_dim", "max_len"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"config key '{key}' must be >= 1, got {getattr(cfg, key)}")
    if not 0.0 <= cfg.momentum <= 1.0 or not 0.0 <= cfg.alpha <= 1.0:
        raise ValueError("config keys 'momentum' and 'alpha' must lie in [0, 1]")
    if cfg.queue_size < 0 or cfg.temperature <= 0:
        raise ValueError("config keys 'queue_size' >= 0 and 'temperature' > 0 are required")


# -----------------------------------------------------------------------------
# 2. Encoders: a ViT for images, a BERT-lite for reports (PAPER.md section 2)
# LayerNorm only, never BatchNorm: every operation is per sample, which is what makes the
# accumulation of section 7 exact.
# -----------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention, shared by both encoders (bidirectional: no causal mask)."""

    def __init__(self, width, heads, dropout, impl="sdpa"):
        super().__init__()
        assert width % heads == 0, f"width {width} must be divisible by heads {heads}"
        self.heads, self.dropout, self.impl = heads, dropout, impl
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.attn_drop = nn.Dropout(dropout)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x, mask=None):
        # x: (B, T, C); mask: (B, T) with 1 for real tokens, 0 for padding (or None)
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        keep = None if mask is None else mask.bool()[:, None, None, :]  # (B, 1, 1, T): over heads, queries
        if self.impl == "sdpa":
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0)
        else:  # the same computation written out
            att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, nh, T, T)
            if keep is not None:
                att = att.masked_fill(~keep, float("-inf"))  # padding keys get zero weight
            att = self.attn_drop(att.softmax(dim=-1))
            y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, width, ratio, dropout, hidden=None):
        super().__init__()
        hidden = hidden or ratio * width  # a checkpoint's own size (BERT's intermediate_size) if given
        self.fc = nn.Linear(width, hidden)
        self.proj = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width, heads, mlp_ratio, dropout, impl, eps=1e-5):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads, dropout, impl)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_ratio, dropout)

    def forward(self, x, mask=None):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    """f_v: patchify (conv, stride = patch), class token, learned positions, blocks, final LN.
    The same layout as timm's ViT, so that its weights load (section 2b); eps 1e-6 is timm's."""

    def __init__(self, image_size, patch_size, width, layers, heads, mlp_ratio, dropout, impl, eps=1e-5):
        super().__init__()
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(1, width, kernel_size=patch_size, stride=patch_size)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(num_patches + 1, width))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout, impl, eps) for _ in range(layers))
        self.ln_post = nn.LayerNorm(width, eps=eps)

    def forward(self, images):
        # images: (B, 1, H, W), grayscale
        x = self.patch_embed(images)                   # (B, C, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)               # (B, P, C): one token per patch
        cls = self.class_embedding.expand(x.size(0), 1, -1)  # (B, 1, C)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding  # (B, 1 + P, C)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x[:, 0])                   # (B, C): the class token


class TextTransformer(nn.Module):
    """f_t: token + position embeddings, bidirectional blocks with the padding mask, final LN, [CLS]."""

    def __init__(self, vocab_size, max_len, width, layers, heads, mlp_ratio, dropout, impl):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.zeros(max_len, width))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout, impl) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)

    def forward(self, input_ids, attention_mask):
        # input_ids, attention_mask: (B, L), L <= max_len; position 0 holds [CLS]
        L = input_ids.size(1)
        x = self.token_embedding(input_ids) + self.positional_embedding[:L]  # (B, L, C)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, attention_mask)
        return self.ln_final(x[:, 0])                  # (B, C): the [CLS] token


class PostLNBlock(nn.Module):
    """BERT's post-LayerNorm block: x = ln(x + attn(x)), then x = ln(x + mlp(x))."""

    def __init__(self, width, heads, hidden, dropout, impl, eps):
        super().__init__()
        self.attn = Attention(width, heads, dropout, impl)
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, None, dropout, hidden=hidden)
        self.ln_2 = nn.LayerNorm(width, eps=eps)

    def forward(self, x, mask=None):
        x = self.ln_1(x + self.attn(x, mask))
        return self.ln_2(x + self.mlp(x))


class BertTextTransformer(nn.Module):
    """f_t for text_arch "bert": a BERT-family encoder whose shape comes from the checkpoint's
    config.json (`bert_config`, section 2b). Token + position + token-type embeddings (every token
    is of type 0, so only row 0 of BERT's type table is kept), LayerNorm, post-LN blocks with exact
    GELU, and the last hidden state of [CLS]. BERT's pooler (dense + tanh, trained for next-
    sentence prediction) is not used; ALBEF also takes the [CLS] state."""

    def __init__(self, bert_config, vocab_size, max_len, dropout, impl):
        super().__init__()
        c, source = bert_config, bert_config["source"]
        if vocab_size > c["vocab_size"]:
            raise ValueError(f"the tokenizer has {vocab_size} ids, {source} says vocab_size "
                             f"{c['vocab_size']}: vocab.txt does not belong to these weights")
        if max_len > c["max_position_embeddings"]:
            raise ValueError(f"config key 'max_len' = {max_len} exceeds max_position_embeddings "
                             f"{c['max_position_embeddings']} of {source}; use --max_len="
                             f"{c['max_position_embeddings']} or less")
        width = c["hidden_size"]
        self.token_embedding = nn.Embedding(c["vocab_size"], width)
        self.positional_embedding = nn.Parameter(torch.zeros(c["max_position_embeddings"], width))
        self.token_type_embedding = nn.Parameter(torch.zeros(width))
        self.ln_embed = nn.LayerNorm(width, eps=c["layer_norm_eps"])
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            PostLNBlock(width, c["num_attention_heads"], c["intermediate_size"], dropout, impl,
                        c["layer_norm_eps"]) for _ in range(c["num_hidden_layers"]))

    def hidden_states(self, input_ids, attention_mask):
        # input_ids, attention_mask: (B, L), L <= max_position_embeddings; position 0 holds [CLS]
        L = input_ids.size(1)
        x = self.token_embedding(input_ids) + self.positional_embedding[:L] + self.token_type_embedding
        x = self.drop(self.ln_embed(x))                # (B, L, C)
        for block in self.blocks:
            x = block(x, attention_mask)
        return x                                       # (B, L, C): BERT's last_hidden_state

    def forward(self, input_ids, attention_mask):
        return self.hidden_states(input_ids, attention_mask)[:, 0]  # (B, C): the [CLS] token


class DualEncoder(nn.Module):
    """f_v, g_v, f_t, g_t: the student, and (as a copy) the teacher. forward-only, no state updates.

    With text_arch "bert" / vision_weights, the towers start from published weights (section 2b),
    loaded here, before MSD copies the student into the teacher. `bert_config` and
    pretrained=False rebuild a saved model without the weights files (load_checkpoint)."""

    def __init__(self, cfg, vocab_size, bert_config=None, pretrained=True):
        super().__init__()
        self.visual = VisionTransformer(cfg.image_size, cfg.patch_size, cfg.vision_width,
                                        cfg.vision_layers, cfg.vision_heads, cfg.mlp_ratio,
                                        cfg.dropout, cfg.attn_impl,
                                        eps=TIMM_VIT_LN_EPS if cfg.vision_weights else 1e-5)
        self.bert_config = None  # the text tower's shape, stored in our checkpoints (text_arch "bert")
        if cfg.text_arch == "bert":
            self.bert_config = bert_config or read_bert_config(cfg.text_weights)
            self.text = BertTextTransformer(self.bert_config, vocab_size, cfg.max_len, cfg.dropout,
                                            cfg.attn_impl)
            text_width = self.bert_config["hidden_size"]
        else:
            self.text = TextTransformer(vocab_size, cfg.max_len, cfg.text_width, cfg.text_layers,
                                        cfg.text_heads, cfg.mlp_ratio, cfg.dropout, cfg.attn_impl)
            text_width = cfg.text_width
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim, bias=False)  # g_v
        self.text_proj = nn.Linear(text_width, cfg.embed_dim, bias=False)          # g_t
        self._init_weights(cfg)
        if pretrained and cfg.text_arch == "bert":
            load_bert_weights(self.text, find_bert_weights(cfg.text_weights))
        if pretrained and cfg.vision_weights:
            load_vit_weights(self.visual, cfg.vision_weights)

    def _init_weights(self, cfg):
        """openai/CLIP's explicit formulas, with w = width and L = layers of each encoder:
        attention in-projection N(0, w^-1/2); residual out-projections N(0, w^-1/2 (2L)^-1/2);
        MLP in N(0, (2w)^-1/2); class token N(0, w^-1/2); positions N(0, 0.01); token and patch
        embeddings N(0, 0.02); projections g N(0, w^-1/2); LayerNorm 1 and 0; biases 0.
        These keep features of different inputs far apart at step 0. With the GPT-2 style
        N(0, 0.02) everywhere, every [CLS] output starts as nearly the same vector (cosine 0.99),
        a drifting common direction that a queue of older teacher features turns into a
        shortcut ("fresh keys score higher") instead of a signal."""
        towers = [("visual.", cfg.vision_width, cfg.vision_layers)]
        if cfg.text_arch == "lite":  # a BERT tower is always overwritten by its checkpoint
            towers.append(("text.", cfg.text_width, cfg.text_layers))
        for prefix, w, layers in towers:
            for name, p in self.named_parameters():
                if not name.startswith(prefix):
                    continue
                if name.endswith("bias"):
                    nn.init.zeros_(p)
                elif "ln_" in name:
                    nn.init.ones_(p)
                elif name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                    nn.init.normal_(p, std=w ** -0.5 * (2 * layers) ** -0.5)
                elif name.endswith("attn.qkv.weight"):
                    nn.init.normal_(p, std=w ** -0.5)
                elif name.endswith("mlp.fc.weight"):
                    nn.init.normal_(p, std=(2 * w) ** -0.5)
                elif name.endswith("class_embedding"):
                    nn.init.normal_(p, std=w ** -0.5)
                elif name.endswith("positional_embedding"):
                    nn.init.normal_(p, std=0.01)
                else:  # token_embedding, patch_embed
                    nn.init.normal_(p, std=0.02)
        nn.init.normal_(self.vision_proj.weight, std=cfg.vision_width ** -0.5)
        nn.init.normal_(self.text_proj.weight, std=self.text_proj.in_features ** -0.5)

    def image_features(self, images):
        """(B, 1, H, W) -> (B, vision_width): the class token before projection (for linear probes)."""
        return self.visual(images)

    def encode_image(self, images):
        """(B, 1, H, W) -> (B, embed_dim), L2-normalised: v = g_v(f_v(x)) / |.|."""
        return F.normalize(self.vision_proj(self.visual(images)), dim=-1)

    def encode_text(self, input_ids, attention_mask):
        """(B, L), (B, L) -> (B, embed_dim), L2-normalised: t = g_t(f_t(w)) / |.|."""
        return F.normalize(self.text_proj(self.text(input_ids, attention_mask)), dim=-1)


# -----------------------------------------------------------------------------
# 2b. Pretrained weights: a safetensors reader, and the BERT and ViT name maps
# At paper scale f_t starts from Bio_ClinicalBERT and f_v from an ImageNet ViT-B/16. Their
# published files are read here without transformers, timm or safetensors: each name map below
# says once which tensor of theirs becomes which parameter of ours, and a file that does not fit
# is refused with one error listing every missing, unexpected and mis-shaped tensor. Nothing is
# ever downloaded (README, "Training on MIMIC-CXR", says which files to fetch by hand).
# tests/test_pretrained.py checks all of it against the reference libraries' own outputs.
# -----------------------------------------------------------------------------

TIMM_VIT_LN_EPS = 1e-6  # timm's ViTs use LayerNorm(eps=1e-6); PyTorch's default (from scratch) is 1e-5

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """A .safetensors file -> {name: tensor}. The format: 8 bytes (little-endian) giving the header
    length n; n bytes of JSON, {name: {"dtype", "shape", "data_offsets": [begin, end]}} plus an
    optional "__metadata__"; then the tensors' raw little-endian bytes, offsets counted from the
    end of the header."""
    path = Path(path)
    if sys.byteorder != "little":
        raise ValueError(f"{path}: this safetensors reader assumes a little-endian machine")
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little") if len(raw) >= 8 else None
    if n is None or 8 + n > len(raw):
        raise ValueError(f"{path}: truncated or not a safetensors file ({len(raw)} bytes, header "
                         f"length {n})")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a safetensors file (its header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    data = memoryview(raw)[8 + n:]
    tensors = {}
    for name, info in header.items():
        try:
            kind, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            shape = None
        if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"{path}: tensor {name!r}: bad header entry {info!r} (expected dtype, "
                             f"shape, data_offsets)")
        if kind not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {kind}, which this reader does not "
                             f"read (it reads {', '.join(SAFETENSORS_DTYPES)})")
        dtype = SAFETENSORS_DTYPES[kind]
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= len(data)
                and end - begin == size):
            raise ValueError(f"{path}: tensor {name!r} ({kind} {shape}, {size} bytes) has "
                             f"data_offsets [{begin}, {end}] in a data section of {len(data)} bytes: "
                             f"the file is truncated or corrupt")
        tensors[name] = (torch.frombuffer(bytearray(data[begin:end]), dtype=dtype).reshape(shape)
                         if size else torch.zeros(shape, dtype=dtype))
    return tensors


def read_weights(path):
    """A weights file -> {name: tensor}: .safetensors by the reader above; .bin / .pth / .pt
    (PyTorch's pickle format) by torch.load(weights_only=True), which refuses arbitrary objects."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix not in (".bin", ".pth", ".pt"):
        raise ValueError(f"{path}: unknown weights format {path.suffix!r}; expected .safetensors, "
                         f".bin, .pth or .pt")
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors share no base class
        raise ValueError(f"{path}: torch.load(weights_only=True) cannot read it: {e}") from e
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        keys = list(weights)[:6] if isinstance(weights, dict) else []
        raise ValueError(f"{path}: expected a flat {{name: tensor}} state dict, got "
                         f"{type(weights).__name__} {keys}; if it wraps one (e.g. under 'model' or "
                         f"'state_dict'), save that inner dict to its own file")
    return dict(weights)


def load_mapped(module, weights, name_map, transforms, ignored, source):
    """Copy `weights` (their names) into `module` (our names, through name_map: ours -> theirs, a
    tuple of theirs being concatenated along dim 0), after transforms[ours] where given. Tensors
    whose names start with one of `ignored` are allowed to stay unused; every other problem is
    collected and raised as ONE error. Returns the names of the ignored tensors."""
    target = module.state_dict()
    assert set(name_map) == set(target), "the name map must cover exactly the module's parameters"
    converted, missing, wrong = {}, [], []
    for ours, theirs in name_map.items():
        theirs = (theirs,) if isinstance(theirs, str) else theirs
        if any(t not in weights for t in theirs):
            missing += [t for t in theirs if t not in weights]
            continue
        try:
            raw = torch.cat([weights[t] for t in theirs]) if len(theirs) > 1 else weights[theirs[0]]
            value = transforms[ours](raw) if ours in transforms else raw
        except (ValueError, RuntimeError) as e:
            wrong.append(f"{' + '.join(theirs)}: {e}")
            continue
        if value.shape != target[ours].shape:
            wrong.append(f"{' + '.join(theirs)} {tuple(raw.shape)} -> {ours} needs "
                         f"{tuple(target[ours].shape)}")
            continue
        converted[ours] = value.to(target[ours].dtype)
    used = {t for theirs in name_map.values() for t in ((theirs,) if isinstance(theirs, str) else theirs)}
    unexpected = sorted(k for k in weights if k not in used and not k.startswith(ignored))
    if missing or unexpected or wrong:
        problems = [f"{what} ({len(names)}): {', '.join(names)}" for what, names in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if names]
        raise ValueError(f"{source} does not fit the model:\n  " + "\n  ".join(problems))
    module.load_state_dict(converted)
    return sorted(k for k in weights if k not in used)


def expand_name_map(names, per_layer, layers, ours_prefix, theirs_prefix):
    """The whole-model name map: `names`, plus `per_layer` repeated for layers 0 .. layers-1 with
    weight and bias each."""
    names = dict(names)
    for i in range(layers):
        for ours, theirs in per_layer:
            for p in ("weight", "bias"):
                names[f"{ours_prefix.format(i)}{ours}.{p}"] = (
                    f"{theirs_prefix.format(i)}{theirs}.{p}" if isinstance(theirs, str) else
                    tuple(f"{theirs_prefix.format(i)}{t}.{p}" for t in theirs))
    return names


# BERT (HF's BertModel names) -> BertTextTransformer.
BERT_NAMES = {
    "token_embedding.weight": "embeddings.word_embeddings.weight",
    "positional_embedding": "embeddings.position_embeddings.weight",
    "token_type_embedding": "embeddings.token_type_embeddings.weight",  # row 0 only (transform)
    "ln_embed.weight": "embeddings.LayerNorm.weight",
    "ln_embed.bias": "embeddings.LayerNorm.bias",
}
BERT_LAYER_NAMES = [  # ours under blocks.{i}.  <-  theirs under encoder.layer.{i}.
    ("attn.qkv", ("attention.self.query", "attention.self.key", "attention.self.value")),  # [q; k; v]
    ("attn.proj", "attention.output.dense"),
    ("ln_1", "attention.output.LayerNorm"),
    ("mlp.fc", "intermediate.dense"),
    ("mlp.proj", "output.dense"),
    ("ln_2", "output.LayerNorm"),
]
BERT_UNUSED = ("pooler.", "cls.", "embeddings.position_ids")  # NSP pooler, pretraining heads, a buffer
BERT_CONFIG_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "max_position_embeddings")


def read_bert_config(folder):
    """The shape of a BERT-family checkpoint, from its config.json -> a plain dict (stored in our
    checkpoints, so that a trained model is rebuilt without the folder)."""
    folder, help_ = Path(folder), 'see README, "Training on MIMIC-CXR"'
    if not folder.is_dir():
        raise FileNotFoundError(f"config key 'text_weights': folder not found: {folder} ({help_}: "
                                f"it needs config.json, vocab.txt and model.safetensors or "
                                f"pytorch_model.bin)")
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"config key 'text_weights': no config.json in {folder} ({help_})")
    try:
        c = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    missing = [k for k in BERT_CONFIG_KEYS if not isinstance(c.get(k), int) or c[k] < 1]
    if missing:
        raise ValueError(f"{path}: needs positive integers for {missing}")
    for key, allowed in (("model_type", "bert"), ("hidden_act", "gelu"),
                         ("position_embedding_type", "absolute")):
        if c.get(key, allowed) != allowed:
            raise ValueError(f"{path}: {key} {c[key]!r} is not supported; the BERT tower is "
                             f"{key} {allowed!r} (BERT, BioBERT, Bio_ClinicalBERT, PubMedBERT, ...)")
    if c["hidden_size"] % c["num_attention_heads"]:
        raise ValueError(f"{path}: hidden_size {c['hidden_size']} is not divisible by "
                         f"num_attention_heads {c['num_attention_heads']}")
    return {**{k: c[k] for k in BERT_CONFIG_KEYS},
            "layer_norm_eps": float(c.get("layer_norm_eps", 1e-12)),  # BERT's, if not written
            "source": str(path)}


def find_bert_weights(folder):
    """model.safetensors, else pytorch_model.bin, in a BERT checkpoint folder."""
    folder = Path(folder)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    there = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise FileNotFoundError(f"config key 'text_weights': no model.safetensors or pytorch_model.bin "
                            f"in {folder} (it holds {there}; a sharded checkpoint is not supported)")


def load_bert_weights(text, path):
    """A BERT checkpoint file -> BertTextTransformer `text`, through BERT_NAMES / BERT_LAYER_NAMES.
    Published files name things in two more ways, both read: BertForPreTraining / MaskedLM files
    (Bio_ClinicalBERT's) put the encoder under "bert.", and TF-converted ones call LayerNorm's
    weight and bias gamma and beta."""
    weights = {}
    for name, value in read_weights(path).items():
        name = name[len("bert."):] if name.startswith("bert.") else name
        weights[name.replace("LayerNorm.gamma", "LayerNorm.weight")
                    .replace("LayerNorm.beta", "LayerNorm.bias")] = value
    name_map = expand_name_map(BERT_NAMES, BERT_LAYER_NAMES, len(text.blocks), "blocks.{}.",
                               "encoder.layer.{}.")
    unused = load_mapped(text, weights, name_map, {"token_type_embedding": lambda t: t[0]},
                         BERT_UNUSED, path)
    print(f"text tower: BERT, {len(text.blocks)} layers, width {text.ln_embed.normalized_shape[0]}, "
          f"{len(weights) - len(unused)} tensors from {path} (unused: {len(unused)} pooler / "
          f"pretraining-head tensors)")


# timm's VisionTransformer (vit_base_patch16_224 and its relatives) -> VisionTransformer.
VIT_NAMES = {
    "class_embedding": "cls_token",                # (1, 1, C) -> (C,)
    "positional_embedding": "pos_embed",           # (1, 1 + G*G, C) -> (1 + g*g, C), resampled
    "patch_embed.weight": "patch_embed.proj.weight",  # (C, 3, p, p) -> (C, 1, p, p): RGB summed
    "patch_embed.bias": "patch_embed.proj.bias",
    "ln_post.weight": "norm.weight",
    "ln_post.bias": "norm.bias",
}
VIT_BLOCK_NAMES = [("ln_1", "norm1"), ("attn.qkv", "attn.qkv"), ("attn.proj", "attn.proj"),
                   ("ln_2", "norm2"), ("mlp.fc", "mlp.fc1"), ("mlp.proj", "mlp.fc2")]
VIT_UNUSED = ("head.",)  # the ImageNet classifier


def resample_pos_embed(pos, grid):
    """Position embeddings of a G x G patch grid (1 + G*G, C) -> (1 + grid*grid, C): the class
    token's row is kept, the grid is resized like a C-channel image, bicubic with antialiasing
    (what timm's resample_abs_pos_embed does when it loads a ViT at another image size)."""
    G = math.isqrt(pos.shape[0] - 1)
    if G * G != pos.shape[0] - 1:
        raise ValueError(f"{pos.shape[0] - 1} position rows after the class token are not a square grid")
    if G == grid:
        return pos
    cls_pos, grid_pos = pos[:1], pos[1:]
    grid_pos = grid_pos.reshape(1, G, G, -1).permute(0, 3, 1, 2)   # (1, C, G, G)
    grid_pos = F.interpolate(grid_pos.float(), size=(grid, grid), mode="bicubic", antialias=True,
                             align_corners=False)
    grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(grid * grid, -1)  # (grid*grid, C)
    return torch.cat([cls_pos, grid_pos.to(pos.dtype)])


def load_vit_weights(visual, path):
    """A timm ViT file -> VisionTransformer `visual`, through VIT_NAMES / VIT_BLOCK_NAMES.
    Width, depth and patch size must be the config's (vision_width, vision_layers, patch_size;
    mlp_ratio): timm's files do not record the number of heads, so the config's vision_heads
    is used as given (12 for ViT-B). image_size may differ from the checkpoint's: the position
    embeddings are then resampled. The RGB patch embedding is summed over its three input
    channels, which is exact for a grey image fed as R = G = B with the same normalisation on
    every channel (mean = std = 0.5 for timm's augreg ViTs, as in data.ImageTransform)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config key 'vision_weights': file not found: {path} (see README, "
                                f'"Training on MIMIC-CXR")')
    weights = read_weights(path)
    grid = math.isqrt(visual.positional_embedding.shape[0] - 1)
    transforms = {"class_embedding": lambda t: t.reshape(t.shape[-1]),
                  "positional_embedding": lambda t: resample_pos_embed(t.reshape(-1, t.shape[-1]), grid),
                  "patch_embed.weight": lambda t: t.sum(dim=1, keepdim=True)}
    name_map = expand_name_map(VIT_NAMES, VIT_BLOCK_NAMES, len(visual.blocks), "blocks.{}.", "blocks.{}.")
    width, patch = visual.patch_embed.weight.shape[0], visual.patch_embed.weight.shape[-1]
    try:
        load_mapped(visual, weights, name_map, transforms, VIT_UNUSED, path)
    except ValueError as e:  # say what the file holds beside what the config asks for
        proj = weights.get("patch_embed.proj.weight")
        depth = len({k.split(".")[1] for k in weights if k.startswith("blocks.")})
        holds = (f"width {proj.shape[0]}, {depth} blocks, patch {proj.shape[-1]}"
                 if proj is not None and proj.dim() == 4 else f"{depth} blocks")
        raise ValueError(f"{e}\n  the config asks for vision_width {width}, vision_layers "
                         f"{len(visual.blocks)}, patch_size {patch}, MLP hidden "
                         f"{visual.blocks[0].mlp.fc.out_features} (mlp_ratio); the file holds "
                         f"{holds}") from None
    old = math.isqrt(weights["pos_embed"].shape[-2] - 1)
    print(f"vision tower: ViT, {len(visual.blocks)} blocks, width {width}, {len(name_map)} "
          f"tensors from {path}; patch embedding RGB -> grey; positions {old}x{old}"
          + (f" resampled to {grid}x{grid}" if old != grid else ""))


# -----------------------------------------------------------------------------
# 3. Momentum teacher (ALBEF's copy_params / momentum_update)
# -----------------------------------------------------------------------------


def copy_params(student):
    """The teacher starts as an exact copy of the student, never receives gradients, never drops out."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def momentum_update(teacher, student, m):
    """theta' <- m * theta' + (1 - m) * theta, for all parameters in one fused call.
    lerp(theta', theta, 1 - m) = theta' + (1 - m)(theta - theta') is the same formula."""
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_lerp_(t_params, s_params, 1.0 - m)


# -----------------------------------------------------------------------------
# 4. Queues: ring buffers of teacher features (MoCo / ALBEF's dequeue_and_enqueue)
# -----------------------------------------------------------------------------


class FeatureQueue(nn.Module):
    """The last K teacher features of one modality, each with the pair id it came from.

    Buffers (so they move with .to() and live in the checkpoint):
      feats (K, d)  the features;  ids (K,)  their pair ids;
      ptr ()        the next slot to write;  filled ()  how many slots hold a real feature.
    Slots never written are not keys: `keys()` returns only the first `filled` slots (writes start
    at slot 0, so until the buffer is full the written slots are exactly 0 .. filled-1).
    """

    def __init__(self, size, dim):
        super().__init__()
        self.size = size
        self.register_buffer("feats", torch.zeros(size, dim))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def keys(self):
        """(filled, d) features and (filled,) ids of the written slots."""
        n = int(self.filled)
        return self.feats[:n], self.ids[:n]

    @torch.no_grad()
    def enqueue(self, feats, ids):
        """Write a batch of any size at the pointer, wrapping around; the oldest entries go first."""
        if self.size == 0:
            return
        feats, ids = feats[-self.size:], ids[-self.size:]  # a batch larger than K keeps its last K
        n = feats.size(0)
        slots = (int(self.ptr) + torch.arange(n, device=self.ids.device)) % self.size  # wraps
        self.feats[slots] = feats.detach().to(self.feats.dtype)
        self.ids[slots] = ids
        self.ptr.fill_((int(self.ptr) + n) % self.size)
        self.filled.fill_(min(int(self.filled) + n, self.size))


# -----------------------------------------------------------------------------
# 5. Losses
# -----------------------------------------------------------------------------


def positive_targets(row_ids, key_ids):
    """y: the one-hot positive of each row; columns that carry the same pair id share the mass.
    row_ids (b,), key_ids (M,) -> (b, M), rows sum to 1."""
    y = (row_ids[:, None] == key_ids[None, :]).float()  # (b, M)
    return y / y.sum(dim=1, keepdim=True)


def soft_targets(sim_m, y, alpha):
    """y~_i = alpha * q_i + (1 - alpha) * y_i, with q_i = softmax(teacher logits). Rows sum to 1."""
    return alpha * sim_m.softmax(dim=1) + (1 - alpha) * y


def soft_cross_entropy(logits, target):
    """- mean_i sum_j target_ij log softmax(logits)_ij; equals KL(target || p) up to a constant."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def msd_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_keys, text_keys,
             row_ids, key_ids, logit_scale, alpha):
    """The MSD loss of PAPER.md section 3 for b rows of the effective batch.

    image_feat, text_feat      (b, d) student features v_i, t_i (with gradient)
    image_feat_m, text_feat_m  (b, d) teacher features v'_i, t'_i of the same rows
    image_keys, text_keys      (M, d) K_v = [V'; Q_v], K_t = [T'; Q_t]: teacher features of the
                               whole effective batch, then the queue (no gradient)
    row_ids (b,), key_ids (M,) pair ids of the rows and of the key columns
    logit_scale                log(1/tau), a learnable scalar
    alpha                      weight of the teacher's distribution in the target
    """
    image_keys, text_keys = image_keys.detach(), text_keys.detach()  # keys are stop-gradient
    scale = logit_scale.exp()
    sim_i2t = scale * image_feat @ text_keys.t()   # (b, M): logits of p_i (student prediction)
    sim_t2i = scale * text_feat @ image_keys.t()   # (b, M)
    with torch.no_grad():  # everything the targets are made of is stop-gradient
        y = positive_targets(row_ids, key_ids)     # y_i: the positive is the row's own pair
        sim_i2t_m = scale * image_feat_m @ text_keys.t()  # logits of q_i (teacher prediction), same tau
        sim_t2i_m = scale * text_feat_m @ image_keys.t()
        target_i2t = soft_targets(sim_i2t_m, y, alpha)
        target_t2i = soft_targets(sim_t2i_m, y, alpha)
    loss_i2t = soft_cross_entropy(sim_i2t, target_i2t)  # L_i2t = - mean_i sum_j y~_ij log p_ij
    loss_t2i = soft_cross_entropy(sim_t2i, target_t2i)  # L_t2i, symmetric
    return (loss_i2t + loss_t2i) / 2                    # L = (L_i2t + L_t2i) / 2


def clip_loss(image_feat, text_feat, row_ids, logit_scale):
    """End-to-end CLIP baseline: symmetric InfoNCE over in-batch STUDENT features, no teacher, no
    queue. Rows share negatives, so the loss of a batch is not a sum of per-row terms."""
    scale = logit_scale.exp()
    sim_i2t = scale * image_feat @ text_feat.t()   # (b, b)
    y = positive_targets(row_ids, row_ids)         # the positive is column i (and repeats of its pair)
    return (soft_cross_entropy(sim_i2t, y) + soft_cross_entropy(sim_i2t.t(), y)) / 2


# -----------------------------------------------------------------------------
# 6. The model: student, teacher, queues and the temperature in one module
# -----------------------------------------------------------------------------


class MSD(nn.Module):
    """Holds the state of the method; forward() is deliberately absent: the training step
    (section 7) owns every state update (EMA, enqueue, temperature clamp), so none of them can
    silently run once per micro-batch."""

    def __init__(self, cfg, vocab_size, bert_config=None, pretrained=True):
        super().__init__()
        self.student = DualEncoder(cfg, vocab_size, bert_config, pretrained)  # pretrained weights loaded
        # tau is stored as log(1/tau), CLIP's logit_scale; clamped after each optimizer step
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature)))
        self.teacher = None
        if cfg.method == "msd":
            self.teacher = copy_params(self.student)
            self.image_queue = FeatureQueue(cfg.queue_size, cfg.embed_dim)  # Q_v
            self.text_queue = FeatureQueue(cfg.queue_size, cfg.embed_dim)   # Q_t

    def train(self, mode=True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher never uses dropout, even while the student trains
        return self

    def momentum_update(self, m):
        momentum_update(self.teacher, self.student, m)

    def dequeue_and_enqueue(self, image_feat_m, text_feat_m, pair_ids):
        self.image_queue.enqueue(image_feat_m, pair_ids)
        self.text_queue.enqueue(text_feat_m, pair_ids)


def build_model(cfg, vocab_size):
    torch.manual_seed(cfg.seed)
    return MSD(cfg, vocab_size)


# -----------------------------------------------------------------------------
# 7. Training
# -----------------------------------------------------------------------------


def get_lr(step, cfg, total_steps):
    # 1) linear warm-up for warmup_steps optimizer steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    # 2) past the end of the schedule, the floor
    if step >= total_steps:
        return cfg.min_lr
    # 3) in between, cosine decay from lr down to min_lr
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def alpha_ramp_steps(cfg, steps_per_epoch):
    """Optimizer steps over which alpha ramps up: one epoch unless the config says otherwise."""
    return steps_per_epoch if cfg.alpha_ramp_steps < 0 else cfg.alpha_ramp_steps


def get_alpha(step, cfg, steps_per_epoch):
    """alpha ramps linearly from 0 to cfg.alpha over the first epoch's optimizer steps (ALBEF)."""
    ramp = alpha_ramp_steps(cfg, steps_per_epoch)
    return cfg.alpha if ramp == 0 else cfg.alpha * min(1.0, step / ramp)


def configure_optimizer(model, cfg):
    """AdamW; weight decay on weight matrices (>= 2-D) only. The temperature is a 0-D tensor and
    stays undecayed: under decay it would drift. Teacher parameters are not in the optimizer."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


def to_fp32(x):
    """Features leave bf16 autocast as float32 for the loss (float64, used by tests, stays)."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def train_step(model, optimizer, batch, cfg, lr, alpha, autocast):
    """One optimizer step on an effective batch of B = N * b pairs (PAPER.md section 5).

    batch: (images (B, 1, H, W), input_ids (B, L), attention_mask (B, L), pair_ids (B,), ...)
    Returns a dict of scalars for the log. Gradients stay in .grad after the step (the tests read them).
    """
    images, input_ids, attention_mask, pair_ids = batch[:4]
    N = cfg.accum_steps
    B = images.size(0)
    assert B % N == 0, f"effective batch {B} is not a multiple of accum_steps {N}"
    b = B // N  # micro-batch
    micro = [slice(j * b, (j + 1) * b) for j in range(N)]

    # 2. the teacher encodes ALL N micro-batches first, without gradient: V', T' (B, d).
    #    Keys K_v = [V'; Q_v], K_t = [T'; Q_t] are now fixed for the whole step, so every row of
    #    every micro-batch sees the same key set.
    if cfg.method == "msd":
        with torch.no_grad(), autocast():
            image_feat_m = torch.cat([model.teacher.encode_image(images[s]) for s in micro])
            text_feat_m = torch.cat([model.teacher.encode_text(input_ids[s], attention_mask[s])
                                     for s in micro])
        image_feat_m, text_feat_m = to_fp32(image_feat_m), to_fp32(text_feat_m)  # (B, d) each
        queue_image, queue_ids = model.image_queue.keys()
        queue_text, _ = model.text_queue.keys()
        image_keys = torch.cat([image_feat_m, queue_image])  # (B + filled, d)
        text_keys = torch.cat([text_feat_m, queue_text])     # (B + filled, d)
        key_ids = torch.cat([pair_ids, queue_ids])           # (B + filled,)

    # 3. the student encodes one micro-batch at a time; only b pairs of activations live at once
    optimizer.zero_grad(set_to_none=True)
    total_loss = 0.0
    for s in micro:
        with autocast():
            image_feat = to_fp32(model.student.encode_image(images[s]))  # (b, d)
            text_feat = to_fp32(model.student.encode_text(input_ids[s], attention_mask[s]))
        if cfg.method == "msd":
            loss = msd_loss(image_feat, text_feat, image_feat_m[s], text_feat_m[s],
                            image_keys, text_keys, pair_ids[s], key_ids, model.logit_scale, alpha)
        else:
            # naive accumulation: each micro-batch only sees its own b - 1 negatives, so this is
            # an average of N small-batch losses, NOT the loss of one batch of B
            loss = clip_loss(image_feat, text_feat, pair_ids[s], model.logit_scale)
        # divide by N: the loss of B rows is the mean of N equal-sized micro-batch means. Keys are
        # stop-gradient, so the summed gradients equal the gradient of one batch of B exactly.
        (loss / N).backward()
        total_loss += loss.item() / N
        if cfg.method == "msd" and cfg.ema_per_micro_batch:
            model.momentum_update(cfg.momentum)  # THE COMMON BUG, kept for the ablation: momentum m^N

    # 4. clip, one optimizer step, keep the temperature in a sane range (tau in [0.01, 1])
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0.0, math.log(100.0))

    if cfg.method == "msd":
        # 5. EMA of the teacher once per optimizer step, after optimizer.step()
        if not cfg.ema_per_micro_batch:
            model.momentum_update(cfg.momentum)
        # 6. enqueue this step's teacher features and pair ids, after the loss, never before
        model.dequeue_and_enqueue(image_feat_m, text_feat_m, pair_ids)
    return {"loss": total_loss, "grad_norm": float(grad_norm), "lr": lr, "alpha": alpha,
            "tau": 1.0 / model.logit_scale.exp().item()}


def autocast_for(cfg, device):
    """A zero-argument factory of the autocast context: bf16 on CUDA when cfg.amp, else a no-op."""
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16,
                                  enabled=cfg.amp and device.type == "cuda")


def pick_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def prepare_data(cfg):
    """The manifest CSV this run trains on; the synthetic set is generated on first use."""
    if cfg.data == "synth":
        return data.ensure_synthetic(cfg.synth_dir, n=cfg.synth_n, size=cfg.synth_size,
                                     seed=cfg.synth_seed, n_per_class_5x=cfg.synth_per_class_5x)
    path = Path(cfg.data)
    if not path.is_file():
        raise FileNotFoundError(f"config key 'data': manifest not found: {path} "
                                f"(use 'synth' for the built-in synthetic data)")
    return path


def build_tokenizer(cfg, manifest):
    """text_arch "bert": the checkpoint's WordPiece. Otherwise the vocabulary comes from the
    training split's reports only."""
    if cfg.text_arch == "bert":
        read_bert_config(cfg.text_weights)  # a missing folder fails here, before the data is read
        return data.WordPieceTokenizer.from_pretrained(cfg.text_weights, max_len=cfg.max_len)
    train_texts = [row["text"] for row in data.read_manifest(manifest) if row["split"] == "train"]
    if not train_texts:
        raise ValueError(f"{manifest}: no rows with split 'train'")
    if not any(text.strip() for text in train_texts):
        raise ValueError(f"{manifest}: the training split has no report text (a labels-only "
                         f"manifest such as CheXpert or RSNA is for evaluation, not pretraining)")
    return data.Tokenizer.build(train_texts, min_freq=cfg.min_freq, max_len=cfg.max_len)


def epoch_batches(n, B, seed, epoch):
    """The effective batches of one epoch: a permutation seeded by (seed, epoch), cut into full
    batches of B (the last partial batch is dropped). It depends on B only, never on how each
    batch is later split into micro-batches."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[: n // B * B].view(-1, B).tolist()  # (steps_per_epoch, B)


def peak_memory_mb(device):
    """CUDA: max_memory_allocated. Elsewhere: the process's peak resident set size (ru_maxrss;
    NaN where the `resource` module does not exist, i.e. on Windows)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:
        return float("nan")
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / (2**20 if sys.platform == "darwin" else 1024)  # macOS reports bytes, Linux KiB


def count_params(module):
    return sum(p.numel() for p in module.parameters())


def train(cfg, resume=False, stop_after=None):
    """Train for cfg.max_steps optimizer steps (or cfg.epochs), checkpointing into cfg.out_dir.
    `stop_after` ends the run early after that many steps, as an interruption would (for tests).
    Returns a summary dict."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "ckpt.pt"
    device = pick_device(cfg.device)

    manifest = prepare_data(cfg)
    ckpt = None
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        changed = {k: (v, getattr(cfg, k)) for k, v in ckpt["config"].items() if getattr(cfg, k) != v}
        if changed:
            print(f"warning: resuming with config keys changed since the checkpoint "
                  f"(saved -> now): {changed}")
        tokenizer = data.tokenizer_from_dict(ckpt["tokenizer"])
    else:
        tokenizer = build_tokenizer(cfg, manifest)
    train_set = data.PairDataset(manifest, "train", tokenizer,
                                 data.ImageTransform(cfg.image_size, train=True),
                                 seed=cfg.seed, cache_images=cfg.cache_images)
    valid_texts = [r["text"] for r in data.read_manifest(manifest) if r["split"] == "valid"]

    B = cfg.batch_size * cfg.accum_steps  # the effective batch
    steps_per_epoch = len(train_set) // B
    if steps_per_epoch == 0:
        raise ValueError(f"the training split has {len(train_set)} pairs, fewer than one "
                         f"effective batch of {B}")
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch

    model = build_model(cfg, tokenizer.vocab_size).to(device)
    optimizer = configure_optimizer(model, cfg)
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])

    autocast = autocast_for(cfg, device)

    # the derived quantities a reader should know before the first step
    print("config: " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
    print(f"device {device} | manifest {manifest} | {len(train_set)} training pairs | "
          f"vocabulary {tokenizer.vocab_size} | valid unknown-token rate "
          f"{tokenizer.unk_rate(valid_texts) if valid_texts else float('nan'):.2%}")
    print(f"effective batch B = {cfg.accum_steps} x {cfg.batch_size} = {B} pairs | "
          f"{steps_per_epoch} optimizer steps per epoch | {total_steps} steps in all")
    print(f"student {count_params(model.student) / 1e6:.2f} M parameters | method {cfg.method}")
    if cfg.method == "msd":
        half_life = math.log(0.5) / math.log(cfg.momentum) if 0 < cfg.momentum < 1 else float("inf")
        print(f"teacher half-life {half_life:.0f} optimizer steps (m = {cfg.momentum}) | queue "
              f"K = {cfg.queue_size} fills in {math.ceil(cfg.queue_size / B)} steps | alpha "
              f"{cfg.alpha} reached after {alpha_ramp_steps(cfg, steps_per_epoch)} steps")
        if cfg.queue_size > len(train_set) - B:
            print(f"warning: queue_size {cfg.queue_size} > training pairs - B = "
                  f"{len(train_set) - B}: a pair's own older copy will often sit in the queue")
    if step:
        print(f"resuming from {ckpt_path} at step {step}")

    log_file = open(out_dir / "log.jsonl", "a" if resume else "w")
    model.train()
    bar = tqdm(total=total_steps, initial=step, disable=not cfg.progress, dynamic_ncols=True)
    start, pairs_done, last = time.perf_counter(), 0, {}
    while step < total_steps and (stop_after is None or step < stop_after):
        epoch, first = divmod(step, steps_per_epoch)
        train_set.set_epoch(epoch)
        batches = epoch_batches(len(train_set), B, cfg.seed, epoch)[first:]  # resume mid-epoch
        # a private generator: creating a loader must not consume the global RNG (dropout's), or
        # a resumed run would draw different dropout masks than an uninterrupted one
        loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches,
                                             num_workers=cfg.num_workers,
                                             generator=torch.Generator().manual_seed(cfg.seed))
        for batch in loader:
            batch = [x.to(device, non_blocking=True) for x in batch]
            # drop the padding columns that no report of this batch reaches: padding never
            # changes a feature (tests/test_msd.py), so this only saves time
            L = int(batch[2].sum(dim=1).max())
            batch[1], batch[2] = batch[1][:, :L], batch[2][:, :L]
            last = train_step(model, optimizer, batch, cfg, get_lr(step, cfg, total_steps),
                              get_alpha(step, cfg, steps_per_epoch), autocast)
            step += 1
            pairs_done += B
            last["pairs_per_s"] = pairs_done / (time.perf_counter() - start)
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{last['lr']:.1e}",
                            alpha=f"{last['alpha']:.2f}", tau=f"{last['tau']:.3f}",
                            pairs_s=f"{last['pairs_per_s']:.0f}")
            if step % cfg.log_every == 0 or step == total_steps:
                record = json.dumps({"step": step, "epoch": epoch, **last})
                log_file.write(record + "\n")
                log_file.flush()
                if not cfg.progress:
                    print(record, flush=True)
            if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                save_checkpoint(ckpt_path, model, optimizer, step, cfg, tokenizer)
            if step >= total_steps or (stop_after is not None and step >= stop_after):
                break
    bar.close()
    log_file.close()
    save_checkpoint(ckpt_path, model, optimizer, step, cfg, tokenizer)
    seconds = time.perf_counter() - start
    summary = {"steps": step, "seconds": seconds, "pairs_per_s": pairs_done / max(seconds, 1e-9),
               "final_loss": last.get("loss"), "peak_memory_mb": peak_memory_mb(device),
               "checkpoint": str(ckpt_path)}
    print(f"done: {step} steps in {seconds:.1f} s | {summary['pairs_per_s']:.0f} pairs/s | "
          f"final loss {summary['final_loss']} | peak memory {summary['peak_memory_mb']:.0f} MB "
          f"({'CUDA allocated' if device.type == 'cuda' else 'process RSS'}) | {ckpt_path}")
    return summary


# -----------------------------------------------------------------------------
# 8. Checkpoints and the command line
# -----------------------------------------------------------------------------


def save_checkpoint(path, model, optimizer, step, cfg, tokenizer):
    """Everything needed to resume bit-identically, written atomically (temp file + rename)."""
    path = Path(path)
    state = {
        "model": model.state_dict(),  # student, teacher, queues, logit_scale
        "optimizer": optimizer.state_dict(),
        "step": step,
        "config": asdict(cfg),
        "tokenizer": tokenizer.to_dict(),
        "bert_config": model.student.bert_config,  # text_arch "bert": rebuilds the tower (else None)
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    """-> (model in eval mode, tokenizer, cfg, the raw checkpoint dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    cfg = Config(**ckpt["config"])
    tokenizer = data.tokenizer_from_dict(ckpt["tokenizer"])
    # the BERT tower's shape travels in the checkpoint; no weights file is read (pretrained=False)
    model = MSD(cfg, tokenizer.vocab_size, ckpt.get("bert_config"), pretrained=False)
    model.load_state_dict(ckpt["model"])
    return model.to(map_location).eval(), tokenizer, cfg, ckpt


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Train MSD (or the end-to-end CLIP baseline) on image-report pairs.",
        epilog="Any config key can be overridden as --key=value, e.g. --accum_steps=8.")
    parser.add_argument("--config", help="JSON file of config keys (defaults: msd.Config)")
    parser.add_argument("--resume", action="store_true", help="continue from out_dir/ckpt.pt")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e.args[0] if e.args else e}\n")
    train(cfg, resume=args.resume)


if __name__ == "__main__":
    main()
