"""
MSD: Momentum Self-Distillation for medical vision-language pretraining, in one file.

Paper: P. Pham, N. Pham, N. Q. Ly, "Boosting Medical Vision-Language Pretraining via Momentum
Self-Distillation under Limited Computing Resources", WACV 2026 (arXiv 2512.02438).
The authors released no code; this is an independent implementation. docs/choices.md says which
choices are the paper's and which are ours.

What the method does, in one breath: a student image/text dual encoder is trained CLIP-style, but
every student feature is compared only with features of an EMA ("momentum") copy of the model,
the teacher, and with queues of older teacher features. The teacher's own similarity
distributions are mixed into the one-hot target (self-distillation), and because every key is a
stop-gradient teacher feature, the loss is a plain mean of independent per-pair terms: an
effective batch of B = N * b pairs can be processed as N micro-batches of b with EXACTLY the
gradient of one batch of B.

Part I, the method, reads straight through next to docs/method.md (the equations, with this
file's names):
  1. Config                 every knob, its default and its meaning
  2. Encoders               Attention, MLP, Block, VisionTransformer, TextTransformer, DualEncoder
  3. Momentum teacher       copy_params, momentum_update                          (method.md §1)
  4. Queues                 FeatureQueue: a ring buffer of teacher features and pair ids (§1)
  5. Losses                 msd_loss, clip_loss (the end-to-end baseline)         (method.md §2)
  6. The model              MSD = student + teacher + queues + temperature
  7. One optimizer step     get_lr, get_alpha, Batch, encode_no_grad, train_step  (§3, §4, §6)
  8. A training run         epoch_batches, pretrain, train_loop
Part II, appendices: the machinery, each read when it is needed:
  A. Run setup and resume   start_run: data, vocabulary, model; --resume, init_from; the lock
  B. Checkpoints            save_checkpoint, read_checkpoint, load_checkpoint
  C. Config parsing         load_config, config_from_dict, check_config
  D. Several processes      torchrun / DDP: Dist, all_gather                      (method.md §5)
  E. Pretrained weights     the post-LN BERT, a safetensors reader, the BERT and timm-ViT maps
  F. Logging and guards     RunLog, the NaN guard, the run summary
  G. The command line       main
"Section N" / "appendix X" below mean parts of this file; "method.md §N" means docs/method.md.
"""

import argparse
import contextlib
import copy
import difflib
import hashlib
import json
import math
import os
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data


# =============================================================================
# Part I: the method, read straight through next to docs/method.md
# =============================================================================

# -----------------------------------------------------------------------------
# 1. Config
# Every knob with its default and meaning (docs/training.md has them as a table). Reading
# a config file and checking its values is appendix C.
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
    allow_split_overlap: bool = False  # train although a patient/study/image is in train and in valid/test
    skip_bad: bool = False            # train on the good rows of a manifest with bad ones (listed in skipped_rows.csv)
    # model (ViT + BERT-lite from scratch, or published pretrained towers: docs/mimic.md)
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
    clip_accum: str = "naive"         # method "clip" with accum_steps > 1: "naive" (N small batches) or "exact" (GradCache)
    momentum: float = 0.995           # EMA momentum m per optimizer step
    momentum_half_life: float = 0.0   # > 0: m from the teacher's half-life instead, in optimizer steps (>= 1) or as a share of the run (< 1, e.g. 0.005)
    alpha: float = 0.4                # weight of the teacher's soft target in the mix
    alpha_ramp_steps: int = -1        # optimizer steps over which alpha ramps from 0; -1 = one epoch
    queue_size: int = 1024            # K teacher features per modality (0 = no queue)
    temperature: float = 0.07         # initial tau; learnable, stored as log(1/tau)
    ema_per_micro_batch: bool = False  # reproduce the common bug (EMA per micro-batch = momentum m^N)
    report_positives: bool = False    # pairs whose cleaned report text is identical share the positive mass
    init_from: str = ""               # start from this checkpoint's student (a NEW run; not --resume)
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
    teacher_batch: int = 256          # pairs per teacher forward chunk (it keeps no activations)
    # run
    seed: int = 0                     # model init, data order, augmentation, dropout
    out_dir: str = "runs/default"     # ckpt.pt and log.jsonl go here; a --config FILE's default is runs/<FILE's name>
    device: str = "auto"              # "auto" (cuda > mps > cpu), "cuda", "mps" or "cpu"
    amp: bool = True                  # bf16 autocast on CUDA (ignored elsewhere)
    compile: str = "auto"             # torch.compile the encoders: "auto" (CUDA only), "on", "off", "reduce-overhead"
    log_every: int = 10               # optimizer steps between log.jsonl records
    eval_every: int = -1              # steps between held-out checks (valid loss, R@10); -1 = each epoch, 0 = never
    ckpt_every: int = 0               # optimizer steps between checkpoints (0 = only at the end)
    progress: bool = True             # show the tqdm progress bar
    memory_limit_gb: float = 0.0      # refuse a config estimated to need more; 0 = 90 % of the memory free at start


# -----------------------------------------------------------------------------
# 2. Encoders: a ViT for images, a BERT-lite for reports (method.md §1)
# LayerNorm only, never BatchNorm: every operation is per sample, which is what makes the
# accumulation of section 7 exact (method.md §3). The BERT tower of text_arch 'bert' and
# the published weights are appendix E.
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
        # q, k, v: (B, T, C) each -> (B, nh, T, hs), one head per row of dim 1
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for t in self.qkv(x).split(C, dim=2))
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
    The same layout as timm's ViT, so that its weights load (appendix E); eps 1e-6 is timm's."""

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
    pad_multiple = 1  # reports are trimmed to a multiple of this (compile_towers raises it)

    def __init__(self, vocab_size, max_len, width, layers, heads, mlp_ratio, dropout, impl):
        super().__init__()
        self.width = width
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


class DualEncoder(nn.Module):
    """f_v, g_v, f_t, g_t: the student, and (as a copy) the teacher. Published towers and weights
    (appendix E) are loaded here, before MSD copies the student; `bert_config` and
    pretrained=False rebuild a saved model without the weights files (load_checkpoint)."""

    def __init__(self, cfg, vocab_size, bert_config=None, pretrained=True):
        super().__init__()
        self.visual = VisionTransformer(cfg.image_size, cfg.patch_size, cfg.vision_width,
                                        cfg.vision_layers, cfg.vision_heads, cfg.mlp_ratio,
                                        cfg.dropout, cfg.attn_impl,
                                        eps=TIMM_VIT_LN_EPS if cfg.vision_weights else 1e-5)
        if cfg.text_arch == "bert":  # appendix E
            self.text = BertTextTransformer(bert_config or read_bert_config(cfg.text_weights),
                                            vocab_size, cfg.max_len, cfg.dropout, cfg.attn_impl)
        else:
            self.text = TextTransformer(vocab_size, cfg.max_len, cfg.text_width, cfg.text_layers,
                                        cfg.text_heads, cfg.mlp_ratio, cfg.dropout, cfg.attn_impl)
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim, bias=False)  # g_v
        self.text_proj = nn.Linear(self.text.width, cfg.embed_dim, bias=False)     # g_t
        self._init_weights(cfg)
        if pretrained:
            load_published_weights(self, cfg)  # appendix E; nothing for the hand-written towers

    @property
    def bert_config(self):
        """The BERT tower's shape, stored in our checkpoints (None for the hand-written tower)."""
        return getattr(self.text, "bert_config", None)

    def _init_weights(self, cfg):
        """openai/CLIP's explicit formulas (w = width, L = layers of each encoder, below). They
        keep features of different inputs far apart at step 0; with N(0, 0.02) everywhere every
        [CLS] output starts as nearly the same vector (cosine 0.99), a drifting common direction
        that a queue of older teacher features turns into a shortcut ("fresh keys score higher")."""
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

    def forward(self, images, input_ids, attention_mask):
        """Both features of a batch of pairs: (v, t). The training step calls the student through
        forward(), because DistributedDataParallel all-reduces gradients only for what runs there."""
        return self.encode_image(images), self.encode_text(input_ids, attention_mask)


# -----------------------------------------------------------------------------
# 3. Momentum teacher (ALBEF's copy_params / momentum_update)
# -----------------------------------------------------------------------------


def copy_params(student):
    """The teacher starts as an exact copy of the student, never receives gradients, never drops out."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher.eval()


def momentum_from_half_life(half_life, total_steps):
    """The m whose teacher forgets half of a weight in `half_life` optimizer steps: m^h = 1/2.
    half_life >= 1 is in optimizer steps; below 1 it is a share of the run's total_steps."""
    steps = half_life if half_life >= 1 else half_life * total_steps
    return 0.5 ** (1.0 / max(steps, 1e-9))


def teacher_half_life(m):
    """Optimizer steps for the teacher to move half-way to the student: ln 0.5 / ln m."""
    return math.log(0.5) / math.log(m) if 0 < m < 1 else (0.0 if m == 0 else float("inf"))


@torch.no_grad()
def momentum_update(teacher, student, m):
    """theta' <- m * theta' + (1 - m) * theta, parameter by parameter."""
    for param_m, param in zip(teacher.parameters(), student.parameters()):
        param_m.lerp_(param, 1.0 - m)  # theta' + (1 - m)(theta - theta') = m theta' + (1 - m) theta


# -----------------------------------------------------------------------------
# 4. Queues: ring buffers of teacher features (MoCo / ALBEF's dequeue_and_enqueue)
# -----------------------------------------------------------------------------


class FeatureQueue(nn.Module):
    """The last K teacher features of one modality, each with the pair id it came from. Buffers
    (they move with .to() and live in the checkpoint): feats (K, d), ids (K,), ptr () the next
    slot to write, filled () how many slots hold a feature; keys() returns only those (writes
    start at slot 0). ptr and filled are also kept as Python ints (n_ptr, n_filled): reading a
    buffer on a GPU would make the host wait for the GPU at every step."""

    def __init__(self, size, dim):
        super().__init__()
        self.size = size
        self.register_buffer("feats", torch.zeros(size, dim))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.n_ptr = self.n_filled = 0
        self.register_load_state_dict_post_hook(FeatureQueue._read_counters)

    @staticmethod
    def _read_counters(queue, incompatible_keys):
        """After load_state_dict (resume): the host copies come from the loaded buffers, once."""
        queue.n_ptr, queue.n_filled = int(queue.ptr), int(queue.filled)

    def keys(self):
        """(filled, d) features and (filled,) ids of the written slots."""
        return self.feats[:self.n_filled], self.ids[:self.n_filled]

    @torch.no_grad()
    def enqueue(self, feats, ids):
        """Write a batch of any size at the pointer, wrapping around; the oldest entries go first."""
        if self.size == 0:
            return
        feats, ids = feats[-self.size:], ids[-self.size:]  # a batch larger than K keeps its last K
        n, p = feats.size(0), self.n_ptr
        head = min(n, self.size - p)                       # slots left before the end of the buffer
        self.feats[p:p + head], self.ids[p:p + head] = feats[:head], ids[:head]
        self.feats[:n - head], self.ids[:n - head] = feats[head:], ids[head:]  # the rest wraps to 0
        self.n_ptr = (p + n) % self.size
        self.n_filled = min(self.n_filled + n, self.size)
        self.ptr.fill_(self.n_ptr)
        self.filled.fill_(self.n_filled)


# -----------------------------------------------------------------------------
# 5. Losses
# -----------------------------------------------------------------------------


def positive_targets(row_ids, key_ids, dtype=torch.float32):
    """y: the one-hot positive of each row; columns that carry the same pair id share the mass.
    row_ids (b,), key_ids (M,) -> (b, M) in `dtype` (the features'), rows sum to 1."""
    y = (row_ids[:, None] == key_ids[None, :]).to(dtype)  # (b, M)
    return y / y.sum(dim=1, keepdim=True)


def report_ids(texts):
    """Report-level positives (cfg.report_positives): pairs whose cleaned report text is the same
    (case and spacing aside) get one pair id, so positive_targets gives them a share of each
    other's positive mass instead of counting a duplicate report as a negative. (n,) long."""
    ids = {}
    return torch.tensor([ids.setdefault(" ".join(t.lower().split()), len(ids)) for t in texts],
                        dtype=torch.long)


def soft_targets(sim_m, y, alpha):
    """y~_i = alpha * q_i + (1 - alpha) * y_i, with q_i = softmax(teacher logits). Rows sum to 1."""
    return alpha * sim_m.softmax(dim=1) + (1 - alpha) * y


def soft_cross_entropy(logits, target):
    """- mean_i sum_j target_ij log softmax(logits)_ij; equals KL(target || p) up to a constant."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def msd_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_keys, text_keys,
             row_ids, key_ids, logit_scale, alpha):
    """The MSD loss of method.md §2 for b rows of the effective batch.

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
        y = positive_targets(row_ids, key_ids, image_feat.dtype)  # y_i: the row's own pair
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
    y = positive_targets(row_ids, row_ids, image_feat.dtype)  # column i (and repeats of its pair)
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

    def dequeue_and_enqueue(self, image_feat_m, text_feat_m, pair_ids):
        self.image_queue.enqueue(image_feat_m, pair_ids)
        self.text_queue.enqueue(text_feat_m, pair_ids)


def build_model(cfg, vocab_size, bert_config=None, pretrained=True):
    """The initial model of a run. It seeds the global RNG with cfg.seed first, so that a seed
    names one set of initial weights; dropout then draws from where the initialisation stopped.
    pretrained=False: the weights will come from a checkpoint, so no weights file is read."""
    torch.manual_seed(cfg.seed)
    return MSD(cfg, vocab_size, bert_config, pretrained)


# -----------------------------------------------------------------------------
# 7. One optimizer step (method.md §3, §4; exact CLIP accumulation: §6)
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


def get_alpha(step, cfg, steps_per_epoch):
    """alpha ramps linearly from 0 to cfg.alpha over the first epoch's optimizer steps (ALBEF),
    or over cfg.alpha_ramp_steps steps when that is set (>= 0)."""
    ramp = steps_per_epoch if cfg.alpha_ramp_steps < 0 else cfg.alpha_ramp_steps
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
    """Features leave bf16 autocast as float32 for the loss; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


class Batch(NamedTuple):
    """One effective batch as the loop hands it to train_step (with several processes, this
    process's share of the global batch: appendix D)."""
    images: torch.Tensor          # (B, 1, H, W)
    input_ids: torch.Tensor       # (B, L): [CLS] tokens [SEP] [PAD] ...
    attention_mask: torch.Tensor  # (B, L): 1 = token, 0 = padding
    pair_ids: torch.Tensor        # (B,): the study each pair comes from
    text_lengths: list = None     # B Python ints, tokens per report, counted on the host (or None)


def chunks(n, size):
    """Slices of at most `size` rows that cover 0 .. n-1 in order."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def trim_padding(input_ids, attention_mask, lengths, multiple=1):
    """Cut the padding columns no report of this chunk reaches (padding never changes a feature,
    so this only saves time); `multiple` rounds the length up for a compiled encoder. No report
    padded: the mask becomes None, and attention runs on its fastest, mask-free kernel."""
    L = min(-(-max(lengths) // multiple) * multiple, input_ids.size(1))
    return input_ids[:, :L], (None if min(lengths) >= L else attention_mask[:, :L])


def encode_no_grad(encoder, images, reports, slices, autocast, rng_states=None):
    """(B, d) features of `encoder` over the row slices, without gradient (so the slices may be
    larger than a micro-batch): the teacher's pass, and exact CLIP's cache. rng_states: a list
    that receives the RNG state before each slice, so that a second pass can replay its dropout."""
    feats = []
    with torch.no_grad(), autocast():
        for rows in slices:
            if rng_states is not None:
                rng_states.append(get_rng_state(images.device))
            feats.append((encoder.encode_image(images[rows]), encoder.encode_text(*reports(rows))))
    return to_fp32(torch.cat([v for v, _ in feats])), to_fp32(torch.cat([t for _, t in feats]))


def splice(cached, live, rows):
    """The cached (M, d) features with rows `rows` replaced by `live` (b, d), which carry gradient."""
    return torch.cat([cached[:rows.start], live, cached[rows.stop:]])


def train_step(model, optimizer, batch, cfg, lr, alpha, autocast=contextlib.nullcontext, dist=None):
    """One MSD optimizer step on an effective batch of B = N * b pairs: the six steps of
    method.md §4 (README.md, "One optimizer step"). The keys are stop-gradient TEACHER features,
    so each micro-batch's loss / N backpropagates its exact share of the gradient of one batch
    of B. The CLIP baselines take clip_step. Returns "loss", "grad_norm", "tau" as 0-d tensors on
    the device (nothing here waits for the GPU), "lr" and "alpha"; .grad is kept. With W
    processes (appendix D), `batch` is this process's share of a global batch of W * B."""
    if cfg.method == "clip":
        return clip_step(model, optimizer, batch, cfg, lr, alpha, autocast, dist)
    student, micro, reports = step_parts(model, batch, cfg, dist)
    N = len(micro)

    # 1. the loop has taken an effective batch of B = N * b pairs: `batch`
    # 2. the teacher encodes ALL B rows first, without gradient: V', T' (B, d). The keys are then
    #    fixed for the whole step: K_v = [V'; Q_v], K_t = [T'; Q_t], every micro-batch sees them.
    image_feat_m, text_feat_m = encode_no_grad(model.teacher, batch.images, reports,
                                               chunks(len(batch.images), cfg.teacher_batch), autocast)
    image_all, text_all, ids_all = gathered(dist, image_feat_m, text_feat_m, batch.pair_ids)
    queue_image, queue_ids = model.image_queue.keys()
    queue_text, _ = model.text_queue.keys()
    image_keys = torch.cat([image_all, queue_image])  # K_v = [V'; Q_v]   (W*B + filled, d)
    text_keys = torch.cat([text_all, queue_text])     # K_t = [T'; Q_t]   (W*B + filled, d)
    key_ids = torch.cat([ids_all, queue_ids])         # their pair ids    (W*B + filled,)

    # 3. the student encodes one micro-batch at a time; only b pairs of activations live at once
    optimizer.zero_grad(set_to_none=True)
    total_loss = 0.0  # becomes a tensor on the device: summed without reading it back
    for j, rows in enumerate(micro):
        with sync_on_last(student, dist, j, N):  # W processes: one gradient all-reduce per step
            with autocast():
                image_feat, text_feat = student(batch.images[rows], *reports(rows))  # (b, d) each
            loss = msd_loss(to_fp32(image_feat), to_fp32(text_feat), image_feat_m[rows],
                            text_feat_m[rows], image_keys, text_keys, batch.pair_ids[rows], key_ids,
                            model.logit_scale, alpha)
            # / N: the loss of B rows is the mean of N equal-sized micro-batch means; the keys are
            # stop-gradient, so the summed gradients are the gradient of one batch of B exactly
            (loss / N).backward()
            total_loss = total_loss + loss.detach() / N
        if cfg.ema_per_micro_batch:  # THE COMMON BUG, kept for the ablation: momentum m^N
            momentum_update(model.teacher, model.student, cfg.momentum)
    reduce_gradients(model, dist)  # W processes: tau lives outside the DDP-wrapped student

    # 4. clip, one optimizer step, keep the temperature in a sane range (tau in [0.01, 1])
    grad_norm = optimizer_step(model, optimizer, cfg, lr)
    # 5. EMA of the teacher once per optimizer step, after optimizer.step()
    if not cfg.ema_per_micro_batch:
        momentum_update(model.teacher, model.student, cfg.momentum)
    # 6. enqueue this step's teacher features and pair ids (of the global batch), after the
    #    loss, never before; every process enqueues the same, so the queues stay identical
    model.dequeue_and_enqueue(image_all, text_all, ids_all)
    return step_result(total_loss, grad_norm, lr, alpha, model)


def clip_step(model, optimizer, batch, cfg, lr, alpha, autocast=contextlib.nullcontext, dist=None):
    """The CLIP baselines' optimizer step: no teacher, no queue; the keys are the STUDENT's own
    features, so rows share negatives and the loss of a batch is not a sum of per-row terms.
    Two ways to spend N micro-batches (method.md §3 and §6), beside MSD's:
      clip_accum "exact"  (GradCache, open_clip's accum_freq) the student encodes all B rows once
                          without gradient (the cache), then re-encodes one micro-batch at a time
                          with gradient, spliced into the cache: each backward of the WHOLE loss
                          gives its exact share, no / N;
      clip_accum "naive"  each micro-batch is its own small batch: the mean of N small-batch
                          losses, NOT the loss of one batch of B (N = 1: end-to-end CLIP)."""
    student, micro, reports = step_parts(model, batch, cfg, dist)
    N, exact, device = len(micro), cfg.clip_accum == "exact", batch.images.device
    replay = exact and cfg.dropout > 0  # with dropout both passes must draw the same masks
    if exact:
        # the cache V, T (B, d). With dropout it is made one micro-batch at a time from a saved
        # RNG state, replayed below, so the recomputed rows equal the cached ones exactly
        rng = [] if replay else None
        image_cache, text_cache = encode_no_grad(model.student, batch.images, reports,
                                                 micro if replay else chunks(len(batch.images), cfg.teacher_batch),
                                                 autocast, rng)
        image_all, text_all, ids_all = gathered(dist, image_cache, text_cache, batch.pair_ids)
        offset = dist.rank * len(batch.images) if dist is not None and dist.world_size > 1 else 0

    optimizer.zero_grad(set_to_none=True)
    total_loss = 0.0  # becomes a tensor on the device: summed without reading it back
    for j, rows in enumerate(micro):
        with sync_on_last(student, dist, j, N):
            if replay:
                set_rng_state(rng[j], device)
            with autocast():
                image_feat, text_feat = student(batch.images[rows], *reports(rows))  # (b, d) each
            image_feat, text_feat = to_fp32(image_feat), to_fp32(text_feat)
            if exact:
                # L of the whole (global) batch, rows j live, every other row cached: backward
                # gives dL/df_j * df_j/dtheta, and summed over j that is dL/dtheta exactly, so no
                # / N. tau's own gradient must be counted once: only j = 0 sees it.
                live = slice(offset + rows.start, offset + rows.stop)
                loss = clip_loss(splice(image_all, image_feat, live), splice(text_all, text_feat, live),
                                 ids_all, model.logit_scale if j == 0 else model.logit_scale.detach())
                loss.backward()
                total_loss = loss.detach()  # the same value in every micro-batch
            else:
                # with W processes the micro-batch is global, as in open_clip (gather_features):
                # the other processes' rows of it join as keys without gradient (appendix D)
                image_mb, text_mb, ids_mb = gathered_live(image_feat, text_feat, batch.pair_ids[rows], dist)
                loss = clip_loss(image_mb, text_mb, ids_mb, model.logit_scale)
                (loss / N).backward()
                total_loss = total_loss + loss.detach() / N
    reduce_gradients(model, dist, sum_student=True)  # W processes: parts of ONE sum, DDP averaged
    grad_norm = optimizer_step(model, optimizer, cfg, lr)
    return step_result(total_loss, grad_norm, lr, alpha, model)


def step_parts(model, batch, cfg, dist):
    """The student to call (DDP-wrapped with W processes), the N micro-batch slices of b rows, and
    reports(rows): the token ids and mask of those rows, cut to the padding they reach."""
    N, n = cfg.accum_steps, batch.images.size(0)  # n: this process's rows (B, or B / W with W processes)
    assert n % N == 0, f"batch of {n} pairs is not a multiple of accum_steps {N}"
    b = n // N  # micro-batch
    lengths = batch.text_lengths or batch.attention_mask.sum(1).tolist()

    def reports(rows):
        return trim_padding(batch.input_ids[rows], batch.attention_mask[rows], lengths[rows],
                            model.student.text.pad_multiple)
    ddp = dist is not None and dist.world_size > 1
    return (dist.ddp_student if ddp else model.student), [slice(j * b, (j + 1) * b) for j in range(N)], reports


def optimizer_step(model, optimizer, cfg, lr):
    """Step 4: clip the gradient norm, one AdamW step at lr, clamp tau to [0.01, 1] -> the norm."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0.0, math.log(100.0))
    return grad_norm


def step_result(total_loss, grad_norm, lr, alpha, model):
    return {"loss": total_loss, "grad_norm": grad_norm, "lr": lr, "alpha": alpha,
            "tau": model.logit_scale.detach().exp().reciprocal()}


# -----------------------------------------------------------------------------
# 8. A training run: effective batches in epoch order, one train_step each
# How a run starts (fresh, --resume, init_from) is appendix A; its log and NaN guard, F.
# -----------------------------------------------------------------------------


def epoch_batches(n, B, seed, epoch):
    """A permutation seeded by (seed, epoch), cut into full batches of B (the last partial one
    dropped); never depends on how a batch is split into micro-batches or processes."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[: n // B * B].view(-1, B).tolist()  # (steps_per_epoch, B)


def pretrain(cfg, resume=False, overwrite=False, stop_after=None):
    """Train for cfg.max_steps optimizer steps (or cfg.epochs), checkpointing into cfg.out_dir.
    resume: continue the run in out_dir. overwrite: start over in an out_dir that holds a run.
    cfg.init_from: a new run that starts from another run's student. `stop_after` ends the run
    early after that many steps, as an interruption would (for tests). Returns a summary dict.
    A run that already finished with this config is not trained again (see finished_run)."""
    dist = init_distributed(cfg)
    check_ranks_agree(dist, "config", {**asdict(cfg), "resume": resume, "overwrite": overwrite})
    with locked_run_folder(cfg, resume, overwrite, dist) as done:  # one run at a time in a folder
        if done is not None:  # it finished already with this config
            return done
        run = start_run(cfg, dist, resume)
        summary = train_loop(cfg, run, dist, resume, stop_after)
    if dist.world_size > 1:  # every process leaves together: none tears the group down under another
        torch.distributed.barrier()
    return summary


def train_loop(cfg, run, dist, resume, stop_after):
    """The loop: effective batches in epoch order, one train_step each, logs and checkpoints."""
    model, optimizer, step, B = run.model, run.optimizer, run.step, run.B
    ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
    compiled = compile_towers(model, cfg, run.device)
    wrap_student(model, dist, run.device)  # W processes: DistributedDataParallel (appendix D)
    if dist.is_main:
        print_run_summary(cfg, run, dist, compiled)
    end = run.total_steps if stop_after is None else min(run.total_steps, stop_after)
    if step >= end:  # a resumed run already at its end (appendix F)
        return nothing_to_do(step, end, run.device, ckpt_path, dist)

    autocast = autocast_for(cfg, run.device)
    step_cfg = replace(cfg, momentum=run.momentum)  # train_step reads the m in force
    share = slice(dist.rank * B // dist.world_size, (dist.rank + 1) * B // dist.world_size)
    first_bad = torch.full((), -1, device=run.device)  # first step with a NaN / inf loss or grad norm
    log = RunLog(Path(cfg.out_dir) / "log.jsonl", resume, step, dist, echo=not cfg.progress)
    # smoothing 0.9: the time left follows the latest steps, not the slow first ones
    bar = tqdm(total=end, initial=step, disable=not (cfg.progress and dist.is_main), dynamic_ncols=True,
               smoothing=0.9)
    start, pairs_done, last = time.perf_counter(), 0, {}
    heldout = heldout_split(cfg, run, dist)
    every = run.steps_per_epoch if cfg.eval_every < 0 else cfg.eval_every
    stop = SigtermStop(catch=dist.world_size == 1)  # SIGTERM: finish this step, checkpoint, exit
    model.train()
    try:
        while step < end:
            epoch, first = divmod(step, run.steps_per_epoch)
            run.train_set.set_epoch(epoch)
            # this process's rows of each global effective batch of B (appendix D)
            batches = [rows[share] for rows in epoch_batches(len(run.train_set), B, cfg.seed, epoch)[first:]]
            # a private generator: creating a loader must not consume the global RNG (dropout's),
            # or a resumed run would draw different dropout masks than an uninterrupted one
            loader = torch.utils.data.DataLoader(run.train_set, batch_sampler=batches,
                                                 num_workers=cfg.num_workers,
                                                 pin_memory=run.device.type == "cuda",
                                                 generator=torch.Generator().manual_seed(cfg.seed))
            for images, input_ids, attention_mask, pair_ids, _ in loader:
                batch = Batch(*(x.to(run.device, non_blocking=True)
                                for x in (images, input_ids, attention_mask, pair_ids)),
                              text_lengths=attention_mask.sum(1).tolist())  # counted on the host
                out = train_step(model, optimizer, batch, step_cfg, get_lr(step, cfg, run.total_steps),
                                 get_alpha(step, cfg, run.steps_per_epoch), autocast, dist)
                step += 1
                pairs_done += B
                bad = ~(torch.isfinite(out["loss"]) & torch.isfinite(out["grad_norm"]))
                first_bad.masked_fill_(bad & (first_bad < 0), step)  # on the device: no waiting
                bar.update(1)
                write_log = step % cfg.log_every == 0 or step == run.total_steps
                write_ckpt = cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < end
                if write_log or write_ckpt:  # nothing is written after a non-finite step
                    stop_if_not_finite(first_bad, dist, ckpt_path)
                if write_log:  # the one place the loop reads numbers back from the device
                    last = log.record(out, step, epoch, pairs_done / (time.perf_counter() - start),
                                      model, dist, bar)
                if write_ckpt:
                    save_checkpoint(ckpt_path, model, optimizer, step, cfg, run.tokenizer, dist,
                                    run.source, run.data)
                if heldout is not None and every and step % every == 0:
                    log.heldout(heldout_metrics(model, heldout, run.device, autocast), step, epoch, bar)
                if stop.asked:
                    stop_if_not_finite(first_bad, dist, ckpt_path)
                    save_checkpoint(ckpt_path, model, optimizer, step, cfg, run.tokenizer, dist,
                                    run.source, run.data)
                    print(f"SIGTERM: stopped after step {step}; {ckpt_path} written, --resume "
                          f"continues", flush=True)
                    raise SystemExit(128 + signal.SIGTERM)
                if step >= end:
                    break
    finally:
        stop.restore()
        bar.close()
        log.close()
    stop_if_not_finite(first_bad, dist, ckpt_path)
    save_checkpoint(ckpt_path, model, optimizer, step, cfg, run.tokenizer, dist, run.source,
                    run.data, finished=step >= run.total_steps)
    return run_summary(step, time.perf_counter() - start, pairs_done, last, run.device, ckpt_path, dist)


# =============================================================================
# Part II: appendices, the machinery. Each says when a reader needs it.
# =============================================================================

# -----------------------------------------------------------------------------
# A. Run setup and resume
# Read this when you resume a run, start from another run's weights (init_from), or want to
# know what is checked before step 1: the data, the vocabulary, the model and the optimizer,
# and the lock that keeps two runs out of one folder.
# -----------------------------------------------------------------------------


@dataclass
class Run:
    """What start_run prepares for the loop."""
    model: nn.Module              # MSD: student, teacher, queues, temperature
    optimizer: torch.optim.Optimizer
    tokenizer: object             # data.Tokenizer or data.WordPieceTokenizer
    train_set: data.PairDataset
    manifest: Path
    device: torch.device
    B: int                        # the effective batch (global, with several processes)
    steps_per_epoch: int
    total_steps: int
    step: int                     # optimizer steps already done (> 0 after --resume)
    source: dict = None           # the init_from checkpoint, if any
    data: dict = None             # data_fingerprint of the training split
    momentum: float = None        # the teacher's m in force (from momentum_half_life if set)


def start_run(cfg, dist, resume):
    """A fresh start, --resume, or init_from: the data, the vocabulary, the model and the
    optimizer, checked, initialised or restored."""
    ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
    if resume and not ckpt_path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
    device = dist.device or pick_device(cfg.device)  # a device this machine lacks: before any work

    # where the weights and the vocabulary come from: the checkpoint to resume, the checkpoint
    # to start from (init_from), or nowhere (a fresh start: the vocabulary of the training split)
    ckpt = read_checkpoint(ckpt_path) if resume else None
    source = read_checkpoint(cfg.init_from) if cfg.init_from and not resume else None
    if ckpt is not None:
        check_resumable(ckpt, cfg, dist, ckpt_path)

    # the data (several processes: rank 0 generates the synthetic set while the others wait)
    if dist.world_size > 1 and not dist.is_main:
        torch.distributed.barrier()
    manifest = prepare_data(cfg)
    if dist.world_size > 1 and dist.is_main:
        torch.distributed.barrier()
    if ckpt is not None or source is not None:  # the embedding rows follow that vocabulary
        tokenizer = data.tokenizer_from_dict((ckpt or source)["tokenizer"])
    else:
        tokenizer = build_tokenizer(cfg, manifest)
    train_set = data.PairDataset(manifest, "train", tokenizer,
                                 data.ImageTransform(cfg.image_size, train=True),
                                 seed=cfg.seed, cache_images=cfg.cache_images, skip_bad=cfg.skip_bad)
    if train_set.skipped and dist.is_main:  # never dropped silently: counted, and listed beside the run
        listed = data.write_skipped(Path(cfg.out_dir) / "skipped_rows.csv", train_set.skipped)
        print(f"skip_bad: {len(train_set.skipped)} bad row(s) of {manifest} left out, listed in {listed}")
    if cfg.report_positives:  # one id per distinct report: an identical report is a positive
        train_set.pair_ids = report_ids(train_set.texts)
    fingerprint = data_fingerprint(train_set)
    check_ranks_agree(dist, "training data", fingerprint)
    if ckpt is not None:
        check_same_data(ckpt.get("data"), fingerprint, ckpt_path)
    B = cfg.batch_size * cfg.accum_steps * dist.world_size  # the (global) effective batch
    steps_per_epoch = len(train_set) // B
    if steps_per_epoch == 0:
        raise data.InputError(f"the training split has {len(train_set)} pairs, fewer than one "
                              f"effective batch of {B}")

    # the model: seeded by cfg.seed, initialised (from published weights on a fresh start only),
    # then the weights of the checkpoint to resume or to start from
    bert_config = (ckpt or source or {}).get("bert_config")
    check_memory(cfg, tokenizer.vocab_size, device, bert_config)
    model = build_model(cfg, tokenizer.vocab_size, bert_config, pretrained=ckpt is None and source is None)
    if source is not None:
        warm_start(model, source, cfg, cfg.init_from)
    model.to(device)
    optimizer = configure_optimizer(model, cfg)
    step = 0
    if ckpt is not None:  # --resume: everything as it was when the checkpoint was written
        model.load_state_dict(ckpt["model"])  # student, teacher, queues, temperature
        optimizer.load_state_dict(ckpt["optimizer"])
        rng = ckpt["rng"][dist.rank]  # this process's RNG state
        torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)
        step = ckpt["step"]
    if dist.world_size > 1 and ckpt is None:
        torch.manual_seed(cfg.seed * 1000 + 1 + dist.rank)  # dropout: other masks in each process
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    m = cfg.momentum  # the teacher's m in force: cfg.momentum, or that of momentum_half_life
    if cfg.momentum_half_life > 0:
        m = momentum_from_half_life(cfg.momentum_half_life, total_steps)
    return Run(model, optimizer, tokenizer, train_set, manifest, device, B, steps_per_epoch,
               total_steps, step, source, fingerprint, m)


def prepare_data(cfg, check_splits=True):
    """The manifest CSV this run trains on; the synthetic set is generated on first use. A
    patient, study or image in 'train' and in another split is refused unless
    cfg.allow_split_overlap (check_splits=False: the caller checks, as evaluate.py does)."""
    if cfg.data == "synth":
        path = data.ensure_synthetic(cfg.synth_dir, n=cfg.synth_n, size=cfg.synth_size,
                                     seed=cfg.synth_seed, n_per_class_5x=cfg.synth_per_class_5x,
                                     progress=cfg.progress)
    else:
        path = Path(cfg.data)
        data.require_file(path, "config key 'data': manifest",
                          " (use 'synth' for the built-in synthetic data)")
    if check_splits:
        data.check_split_overlap(data.read_manifest(path, skip_bad=cfg.skip_bad), path,
                                 cfg.allow_split_overlap, contents=True)
    return path


def build_tokenizer(cfg, manifest):
    """text_arch "bert": the checkpoint's WordPiece. Otherwise the vocabulary comes from the
    training split's reports only."""
    if cfg.text_arch == "bert":
        read_bert_config(cfg.text_weights)  # a missing folder fails here, before the data is read
        return data.WordPieceTokenizer.from_pretrained(cfg.text_weights, max_len=cfg.max_len)
    train_texts = [row["text"] for row in data.read_manifest(manifest, skip_bad=cfg.skip_bad)
                   if row["split"] == "train"]
    if not train_texts:
        raise data.InputError(f"{manifest}: no rows with split 'train'")
    if not any(text.strip() for text in train_texts):
        raise data.InputError(f"{manifest}: the training split has no report text (a labels-only "
                         f"manifest such as CheXpert or RSNA is for evaluation, not pretraining)")
    return data.Tokenizer.build(train_texts, min_freq=cfg.min_freq, max_len=cfg.max_len)


def pick_device(name):
    """"auto" = cuda > mps > cpu; a named device this torch or this machine lacks is a user
    error that says what there is (not a traceback from the first tensor moved there)."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    kind, _, index = name.partition(":")
    if kind == "cuda" and not torch.cuda.is_available():
        raise data.InputError(f"config key 'device': {name!r}, but this torch build has no CUDA or "
                              f"sees no GPU (torch {torch.__version__}); use --device=cpu or auto")
    n = torch.cuda.device_count() if kind == "cuda" else 0
    if kind == "cuda" and index and (not index.isdigit() or int(index) >= n):
        raise data.InputError(f"config key 'device': {name!r}, but this machine has {n} GPU(s): "
                              f"cuda:0 .. cuda:{n - 1}")
    if kind == "mps" and not has_mps:
        raise data.InputError("config key 'device': 'mps', but MPS is not available here; use "
                              "--device=cpu or auto")
    return torch.device(name)


def autocast_for(cfg, device):
    """A zero-argument factory of the autocast context: bf16 on CUDA when cfg.amp, else a no-op."""
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16,
                                  enabled=cfg.amp and device.type == "cuda")


def compile_towers(model, cfg, device):
    """With cfg.compile (default: on CUDA only), torch.compile the four encoders in place
    (nn.Module.compile: parameters and checkpoint keys stay those of the eager modules).
    Report lengths are then rounded up to a multiple of 16: few shapes, few compilations."""
    mode = ("on" if device.type == "cuda" else "off") if cfg.compile == "auto" else cfg.compile
    if mode == "off":
        return "off"
    for encoder in (model.student, model.teacher):
        if encoder is not None:
            for tower in (encoder.visual, encoder.text):
                tower.compile(**({} if mode == "on" else {"mode": mode}))
            encoder.text.pad_multiple = 16  # a compiled encoder wants few distinct shapes
    return mode


# Keys a resumed run may change: none of them alters the model, the optimizer state or the order
# in which pairs are seen. epochs / max_steps may grow (the cosine schedule then stretches).
RESUME_SAFE_KEYS = ("epochs", "max_steps", "log_every", "ckpt_every", "num_workers", "progress",
                    "device", "compile", "teacher_batch", "attn_impl", "cache_images", "out_dir",
                    "memory_limit_gb", "eval_every",
                    "init_from", "text_weights", "vision_weights")  # the last three name files read
# at a fresh start only; whether vision_weights is set is architecture (architecture_changes)


# Keys that must match the checkpoint named by init_from: its weights must fit the model.
ARCHITECTURE_KEYS = ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads",
                     "text_arch", "text_width", "text_layers", "text_heads", "mlp_ratio", "embed_dim",
                     "max_len")


RUN_PLACE_KEYS = ("out_dir", "progress", "eval_every")  # where a run is written and what it shows


def same_run(saved, cfg):
    """A saved config (a dict; keys it lacks take their defaults) trains exactly what cfg trains:
    only the folder and the progress bar may differ, and they change no number."""
    return not config_changes(saved, cfg, [f.name for f in fields(Config) if f.name not in RUN_PLACE_KEYS])


def config_changes(saved, cfg, keys):
    """{key: (value in the checkpoint, value now)} for the keys that differ."""
    default = Config()
    return {k: (saved.get(k, getattr(default, k)), getattr(cfg, k))
            for k in keys if saved.get(k, getattr(default, k)) != getattr(cfg, k)}


def describe_changes(changed):
    """config_changes -> 'key old -> new; ...' for a message."""
    return "; ".join(f"{k} {old!r} (checkpoint) -> {new!r} (now)" for k, (old, new) in changed.items())


def check_resumable(ckpt, cfg, dist, path):
    """A resumed run must continue the same run: same model, optimizer and data order."""
    config_from_dict(ckpt["config"], path)  # one rule with evaluate.py: unknown keys are refused
    unsafe = [f.name for f in fields(Config) if f.name not in RESUME_SAFE_KEYS]
    changed = {**config_changes(ckpt["config"], cfg, unsafe), **architecture_changes(ckpt["config"], cfg)}
    if changed:
        raise CheckpointError(
            f"--resume: {path} was trained with another config: {describe_changes(changed)}. "
            f"These keys change the model, the optimizer state or the data order. A resumed run "
            f"may change only {', '.join(RESUME_SAFE_KEYS)}; to change the others start a new run "
            f"(another out_dir, or --overwrite).")
    if ckpt.get("world_size", 1) != dist.world_size:
        raise CheckpointError(
            f"--resume: {path} was written by {ckpt.get('world_size', 1)} process(es), this run "
            f"has {dist.world_size}: each process's share of every batch, and so the data order, "
            f"would change. Resume with the same number of processes.")
    shown = config_changes(ckpt["config"], cfg, [k for k in RESUME_SAFE_KEYS if k not in RUN_PLACE_KEYS])
    if shown and dist.is_main:
        print(f"resume: {describe_changes(shown)}")


def architecture_changes(saved, cfg):
    """{key: (in the checkpoint, now)} for ARCHITECTURE_KEYS, and vision_weights as far as it
    shapes the model: a ViT started from timm weights has LayerNorm eps 1e-6, ours 1e-5, so
    whether it is set is architecture (which file it named is not)."""
    changed = config_changes(saved, cfg, ARCHITECTURE_KEYS)
    if bool(saved.get("vision_weights", "")) != bool(cfg.vision_weights):
        changed["vision_weights"] = (saved.get("vision_weights", ""), cfg.vision_weights)
    return changed


def warm_start(model, source, cfg, path):
    """init_from: a NEW run whose student starts as the student of another run's checkpoint
    (e.g. a pretraining run). The teacher is an exact copy of that student (copy_params on the
    loaded weights), the queues start empty, the optimizer and the step start fresh. The
    temperature is the checkpoint's: its features were trained with it."""
    changed = architecture_changes(source["config"], cfg)
    if changed:
        raise CheckpointError(
            f"init_from {path}: the architecture differs from the checkpoint's: "
            f"{describe_changes(changed)}. Set these keys as in the checkpoint.")
    student = {k[len("student."):]: v for k, v in source["model"].items() if k.startswith("student.")}
    model.student.load_state_dict(student)
    if model.teacher is not None:
        model.teacher.load_state_dict(model.student.state_dict())
    with torch.no_grad():
        model.logit_scale.copy_(source["model"]["logit_scale"])


def data_fingerprint(train_set):
    """What a run trains on, cheaply: the manifest's SHA-256, the number of training rows, and a
    SHA-256 of every training image's path, size and modification time (os.stat: no image is
    read). Stored in the checkpoint; --resume refuses data that differ."""
    images = hashlib.sha256()
    for row in train_set.rows:
        st = os.stat(row["_path"])
        images.update(f"{row['_path']}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"manifest": str(train_set.manifest_path), "train_rows": len(train_set.rows),
            "manifest_sha256": hashlib.sha256(train_set.manifest_path.read_bytes()).hexdigest(),
            "images_sha256": images.hexdigest()}


def check_same_data(saved, now, path):
    """--resume: the run must see the data it was trained on, or it silently trains on others."""
    if saved is None:
        print(f"warning: {path} records no fingerprint of its data (written by an earlier "
              f"version); cannot check that the data are the same", file=sys.stderr)
        return
    what = {"train_rows": "training rows", "manifest_sha256": "the manifest's contents (SHA-256)",
            "images_sha256": "the training images (paths, sizes or modification times; SHA-256)"}
    short = lambda v: v[:12] if isinstance(v, str) else v  # noqa: E731
    changed = [f"{label} {short(saved.get(k))} -> {short(now[k])}" for k, label in what.items()
               if saved.get(k) != now[k]]
    if changed:
        raise CheckpointError(
            f"--resume: {path} was trained on other data than {now['manifest']} holds now: "
            + "; ".join(changed) + ". A resumed run must see the same data: restore them, or start "
            f"a new run (another --out_dir, or --overwrite).")


class RunLockedError(RuntimeError):
    """Another run holds the run folder (or a killed run left its lock behind)."""


def finished_run(cfg, resume, overwrite, dist):
    """A fresh start into an out_dir whose run already finished with this same config is no
    error: nothing is trained, and the summary says so (the quick start can be run twice). Any
    other run already there is refused unless --resume or --overwrite."""
    ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
    if resume or overwrite or not ckpt_path.is_file():
        return None
    ckpt = read_checkpoint(ckpt_path)
    same = same_run(ckpt["config"], cfg)
    if not (same and ckpt.get("finished")):
        raise FileExistsError(
            f"{cfg.out_dir} already holds a run ({'unfinished' if same else 'of another config'}: "
            f"{ckpt_path}, step {ckpt['step']}). Continue it with --resume, start over there with "
            f"--overwrite (its checkpoint and log are replaced), or choose another --out_dir.")
    if dist.is_main:
        print(f"{cfg.out_dir}: already finished (step {ckpt['step']}, the same config); nothing to "
              f"train. --overwrite trains it again.")
    return {"steps": ckpt["step"], "seconds": 0.0, "pairs_per_s": float("nan"), "final_loss": None,
            "peak_memory_mb": float("nan"), "checkpoint": str(ckpt_path), "already_finished": True}


@contextlib.contextmanager
def locked_run_folder(cfg, resume, overwrite, dist):
    """The run folder, checked and locked for the whole run; yields what finished_run says.
    run.lock is created with O_EXCL, so of two runs started together into one folder exactly one
    gets it; it holds the pid and host of its run and is removed when the run ends, however it
    ends (SIGTERM included: it is turned into SystemExit while the run holds the lock). Rank 0
    alone locks."""
    folder = Path(cfg.out_dir)
    # everything a run writes, checked before step 1 (a folder there would fail at the last save)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"out_dir {folder} is a file, not a folder; choose another --out_dir")
    for name in ("ckpt.pt", "log.jsonl"):
        if (folder / name).exists() and not (folder / name).is_file():
            raise FileExistsError(f"{folder / name} exists and is not a file, so the run could not "
                                  f"write it; move it away or choose another --out_dir")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"cannot create out_dir {folder}: {e.strerror}; choose another "
                               f"--out_dir") from None
    lock, previous = folder / "run.lock", None
    if dist.is_main:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            raise RunLockedError(describe_lock(lock)) from None
        except OSError as e:
            raise OSError(e.errno, f"cannot write in out_dir {folder}: {e.strerror}; "
                                   f"choose another --out_dir") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        with contextlib.suppress(ValueError):  # not the main thread: signals cannot be caught here
            previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        yield finished_run(cfg, resume, overwrite, dist)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if dist.is_main:
            lock.unlink(missing_ok=True)


def describe_lock(lock):
    """Why a run folder is locked, and the way out. The lock's creator writes its pid right
    after creating it, so an empty lock is read again for up to a second."""
    try:
        for _ in range(20):
            text = lock.read_text()
            if text.strip():
                break
            time.sleep(0.05)
        pid, host = text.split()[:2]
        pid = int(pid)
    except (OSError, ValueError):
        return (f"{lock.parent} is locked ({lock} exists but cannot be read); if no run uses this "
                f"folder, delete {lock} and start again")
    if host == socket.gethostname():
        try:
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            return (f"{lock.parent} holds a stale lock {lock} of process {pid}, which is no longer "
                    f"running (a run that was killed). If no other run uses this folder, delete "
                    f"{lock} and start again (--resume continues the killed run)")
        except OSError:  # PermissionError included: it exists
            pass
    return (f"{lock.parent} is in use by another run (process {pid} on {host}, lock {lock}). Wait "
            f"for it to end, or choose another --out_dir")


# -----------------------------------------------------------------------------
# B. Checkpoints
# Read this when you load a checkpoint yourself, or want to know why a user's file can never
# run code here: weights-only files with a SHA-256, refused before anything is allocated.
# -----------------------------------------------------------------------------


class CheckpointError(data.InputError):
    """A checkpoint that cannot be used: not one of ours, damaged, or not matching this run."""


CHECKPOINT_KEYS = ("model", "optimizer", "step", "config", "tokenizer", "rng")


def checkpoint_sha256(obj, h=None):
    """SHA-256 of a checkpoint's contents: every tensor's dtype, shape and bytes, and every other
    value's repr, in order. Stored inside the checkpoint; read_checkpoint recomputes it."""
    top, h = h is None, h or hashlib.sha256()
    if torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        for key, value in obj.items():
            h.update(repr(key).encode())
            checkpoint_sha256(value, h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}{len(obj)}".encode())
        for value in obj:
            checkpoint_sha256(value, h)
    else:
        h.update(repr(obj).encode())
    return h.hexdigest() if top else None


def save_checkpoint(path, model, optimizer, step, cfg, tokenizer, dist=None, source=None,
                    data_fingerprint=None, finished=False):
    """Everything needed to resume bit-identically, with a SHA-256 of it, written atomically
    (temporary file + rename). Non-finite weights are never written over a checkpoint."""
    dist = dist or Dist()
    rng = rng_states(dist)  # all processes take part; rank 0 alone writes
    if not dist.is_main:
        return
    path = Path(path)
    bad = [name for name, p in model.state_dict().items()
           if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteError(f"not writing {path} at step {step}: non-finite values in "
                             f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}; the previous "
                             f"checkpoint is kept")
    # model: student, teacher, queues, logit_scale; bert_config rebuilds a BERT tower (else None);
    # rng: one entry per process; data: what the run trained on (--resume refuses other data);
    # finished: the last step of the schedule is done
    init_from = None if source is None else {"path": cfg.init_from, "sha256": source["sha256"],
                                             "step": source["step"]}
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "config": asdict(cfg), "tokenizer": tokenizer.to_dict(),
             "bert_config": model.student.bert_config, "rng": rng, "world_size": dist.world_size,
             "init_from": init_from, "data": data_fingerprint, "finished": finished}
    state["sha256"] = checkpoint_sha256(state)
    with data.atomic_write(path) as tmp:  # a killed run or a full disk leaves the last one whole
        torch.save(state, tmp)


def read_checkpoint(path):
    """A checkpoint of this project as a dict, verified. torch.load(weights_only=True) accepts
    only tensors, numbers, strings, lists and dicts, so loading a file can never run code from it;
    then the SHA-256 stored inside is recomputed, and the weights are checked for NaN / inf."""
    path = Path(path)
    data.require_file(path, "checkpoint")  # a folder, FIFO or device is named as such
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, a broken zip, EOFError ...: all mean "unusable"
        raise CheckpointError(
            f"{path}: cannot be read as a checkpoint of this project (a corrupt checkpoint, not "
            f"a checkpoint at all, or one holding objects other than tensors and plain values, "
            f"which are refused because loading them could run code): "
            f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        raise CheckpointError(f"{path}: not a checkpoint of this project (expected the keys "
                              f"{', '.join(CHECKPOINT_KEYS)})")
    if isinstance(ckpt["rng"], dict):  # written by an earlier version: one process, one state
        ckpt["rng"] = [ckpt["rng"]]
    stored = ckpt.pop("sha256", None)
    if stored is None:
        print(f"warning: {path} carries no checksum (written by an earlier version of msd.py); "
              f"its contents cannot be verified", file=sys.stderr)
    elif stored != checkpoint_sha256(ckpt):
        raise CheckpointError(f"corrupt checkpoint {path}: its contents do not match the SHA-256 "
                              f"recorded when it was written (the file was damaged afterwards); "
                              f"use another copy")
    ckpt["sha256"] = stored
    if not isinstance(ckpt["model"], dict) or not all(map(torch.is_tensor, ckpt["model"].values())):
        raise CheckpointError(f"{path}: its 'model' entry is not a {{name: tensor}} state dict")
    bad = [k for k, v in ckpt["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path}: non-finite values (NaN / inf) in {', '.join(bad[:4])}")
    return ckpt


def _shape(state, key):
    return tuple(state[key].shape) if key in state else "absent"


def check_checkpoint_fits(ckpt, cfg, vocab_size, path):
    """Before a model is built from a checkpoint's config: does that config describe the tensors
    in the file? The layer counts are compared first (cheap), then every shape, against a model
    built on the "meta" device (shapes, no memory). The SHA-256 inside a checkpoint is only a
    checksum, which anyone can recompute: an edited config asking for a 3,000-layer tower must be
    refused here, not by the machine running out of memory."""
    state, bert = ckpt["model"], ckpt.get("bert_config")
    text_layers = bert.get("num_hidden_layers") if isinstance(bert, dict) else cfg.text_layers
    for tower, layers in (("visual", cfg.vision_layers), ("text", text_layers)):
        prefix = f"student.{tower}.blocks."
        held = len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})
        if held != layers:
            raise CheckpointError(f"{path}: its config asks for {layers} layers in the {tower} "
                                  f"tower, its weights hold {held}: the checkpoint was edited or "
                                  f"damaged; use another copy")
    try:
        with torch.device("meta"):
            wanted = MSD(cfg, vocab_size, bert, pretrained=False).state_dict()
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the model its config describes cannot be built ({e}); "
                              f"the checkpoint was edited or damaged") from None
    differ = [k for k in sorted(wanted.keys() | state.keys()) if _shape(wanted, k) != _shape(state, k)]
    if differ:
        shown = "; ".join(f"{k}: config {_shape(wanted, k)}, file {_shape(state, k)}" for k in differ[:3])
        raise CheckpointError(
            f"{path}: its config does not describe its weights: {len(differ)} tensors differ "
            f"({shown}{'; ...' if len(differ) > 3 else ''}); the config implies "
            f"{sum(v.numel() for v in wanted.values()):,} values, the file holds "
            f"{sum(v.numel() for v in state.values()):,}. The checkpoint was edited or damaged; "
            f"use another copy")


def load_checkpoint(path, map_location="cpu"):
    """-> (model in eval mode, tokenizer, cfg, the raw checkpoint dict)."""
    ckpt = read_checkpoint(path)
    cfg = config_from_dict(ckpt["config"], path)
    tokenizer = data.tokenizer_from_dict(ckpt["tokenizer"])
    if getattr(tokenizer, "max_len", cfg.max_len) != cfg.max_len:  # it pads every report to it
        raise CheckpointError(f"{path}: its tokenizer pads to max_len {tokenizer.max_len}, its config "
                              f"says {cfg.max_len}: the checkpoint was edited or damaged; use another copy")
    check_checkpoint_fits(ckpt, cfg, tokenizer.vocab_size, path)  # before anything is allocated
    # the BERT tower's shape travels in the checkpoint; no weights file is read (pretrained=False)
    model = MSD(cfg, tokenizer.vocab_size, ckpt.get("bert_config"), pretrained=False)
    model.load_state_dict(ckpt["model"])
    return model.to(map_location).eval(), tokenizer, cfg, ckpt


# -----------------------------------------------------------------------------
# C. Config parsing and checks
# Read this when a config is refused: defaults, then the JSON file, then --key=value, every
# key type-checked, and values that make no sense named.
# -----------------------------------------------------------------------------


def _coerce(key, value, default, from_cli):
    """Check `value` against the type of `default`; command-line values arrive as strings."""
    kind = type(default)
    if from_cli and kind is not str:
        text = value.strip().lower()
        try:
            words = {"true": True, "1": True, "false": False, "0": False}
            value = words[text] if kind is bool else kind(text)
        except (KeyError, ValueError):
            raise data.InputError(f"config key '{key}': expected {kind.__name__}, got {value!r}") from None
    if kind is float and type(value) is int:
        value = float(value)  # JSON writes 1.0 as 1
    if type(value) is not kind:
        raise data.InputTypeError(f"config key '{key}': expected {kind.__name__}, got "
                                  f"{type(value).__name__} {value!r}")
    return value


def load_config(path=None, overrides=()):
    """Defaults, then the JSON file at `path`, then `--key=value` overrides; every key type-checked."""
    defaults = Config()
    valid = {f.name for f in fields(Config)}
    values, where = {}, {}  # key -> value, and where the value came from (for error messages)
    if path is not None:
        path = Path(path)
        from_file = data.read_json(path, what="config file")  # a key given twice is refused too
        if not isinstance(from_file, dict):
            raise data.InputError(f"{path}: expected a JSON object of config keys, got {type(from_file).__name__}")
        for key, value in from_file.items():
            values[key], where[key] = value, f"in {path}"
    items, from_cli = list(overrides), set()
    while items:  # "--key=value", or "--key value"
        item = items.pop(0)
        if not item.startswith("--") or item == "--":
            raise data.InputError(f"override {item!r}: expected --key=value or --key value")
        if "=" not in item:
            if not items or items[0].startswith("--"):
                raise data.InputError(f"override {item!r} has no value: expected {item}=VALUE or {item} VALUE")
            item = f"{item}={items.pop(0)}"
        key, value = item[2:].split("=", 1)
        values[key], where[key] = value, "on the command line"
        from_cli.add(key)
    for key, value in values.items():
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1)
            raise data.InputKeyError(f"unknown config key '{key}' {where[key]}"
                           + (f"; did you mean '{close[0]}'?" if close else ".")
                                     + f" Valid keys: {', '.join(sorted(valid))}")
        values[key] = _coerce(key, value, getattr(defaults, key), from_cli=key in from_cli)
    if "out_dir" not in values:  # each config trains into a folder of its own name
        values["out_dir"] = f"runs/{path.stem}" if path is not None else defaults.out_dir
    cfg = Config(**values)
    check_config(cfg)
    return cfg


def config_from_dict(saved, source):
    """The Config stored in a checkpoint (`source` names the file for error messages)."""
    valid = {f.name for f in fields(Config)}
    unknown = sorted(set(saved) - valid)
    if unknown:
        raise CheckpointError(f"{source}: config keys {unknown} are unknown to this version of msd.py")
    cfg = Config(**{k: _coerce(k, v, getattr(Config(), k), from_cli=False) for k, v in saved.items()})
    try:
        check_config(cfg)
    except ValueError as e:  # the value came from the file, not from the command line
        raise CheckpointError(f"{source}: its stored config is refused: {e}") from None
    return cfg


# Keys whose value is one of a few words, and the words.
CHOICES = {"method": ("msd", "clip"), "clip_accum": ("naive", "exact"),
           "attn_impl": ("sdpa", "manual"), "compile": ("auto", "on", "off", "reduce-overhead"),
           "text_arch": ("lite", "bert")}


def check_config(cfg):
    """Values that are the right type but make no sense; each error names the key."""
    def need(ok, key, what):
        if not ok:
            raise data.InputError(f"config key '{key}': expected {what}, got {getattr(cfg, key)!r}")

    for f in fields(Config):  # nan and inf are floats too: a run that starts with one ends in NaN
        if f.type in (float, "float"):
            need(math.isfinite(getattr(cfg, f.name)), f.name, "a finite number")
    for key, words in CHOICES.items():
        need(getattr(cfg, key) in words, key, " or ".join(map(repr, words)))
    if cfg.clip_accum != "naive" and cfg.method != "clip":
        raise data.InputError(f"config key 'clip_accum' ({cfg.clip_accum!r}) is only read with method "
                              f"'clip'; MSD's accumulation is exact already. Leave it 'naive' or set --method=clip")
    if cfg.text_arch == "bert" and not cfg.text_weights:
        raise data.InputError("text_arch 'bert' needs config key 'text_weights': the folder of a BERT-family "
                              "checkpoint (config.json, vocab.txt, model.safetensors or pytorch_model.bin)")
    if cfg.text_arch == "lite" and cfg.text_weights:
        raise data.InputError(f"config key 'text_weights' ({cfg.text_weights!r}) is only read with "
                              f"text_arch 'bert'; set --text_arch=bert or leave it empty")
    for key in ("batch_size", "accum_steps", "embed_dim", "max_len", "epochs", "log_every",
                "teacher_batch", "image_size", "patch_size", "mlp_ratio", "synth_n", "synth_size",
                "vision_width", "vision_layers", "vision_heads", "text_width", "text_layers",
                "text_heads", "min_freq"):
        need(getattr(cfg, key) >= 1, key, "an integer >= 1")
    for key in ("max_steps", "ckpt_every", "warmup_steps", "num_workers", "queue_size",
                "synth_per_class_5x", "weight_decay", "grad_clip", "min_lr"):
        need(getattr(cfg, key) >= 0, key, "a value >= 0")
    need(cfg.max_len >= 3, "max_len", "at least 3 ([CLS], one token, [SEP])")
    need(cfg.lr > 0, "lr", "a learning rate > 0")
    need(cfg.min_lr <= cfg.lr, "min_lr", f"a floor of the schedule <= lr ({cfg.lr})")
    need(cfg.out_dir.strip() != "", "out_dir", "a folder for ckpt.pt and log.jsonl (not empty)")
    need(0.01 <= cfg.temperature <= 1.0, "temperature",
         "an initial tau in [0.01, 1], the range it is clamped to after every step")
    need(0.0 <= cfg.momentum <= 1.0, "momentum", "a value in [0, 1]")
    need(cfg.momentum_half_life >= 0, "momentum_half_life",
         "0 (use momentum), a half-life in optimizer steps (>= 1) or a share of the run (< 1)")
    if cfg.momentum_half_life > 0 and cfg.method != "msd":
        raise data.InputError(f"config key 'momentum_half_life' ({cfg.momentum_half_life}) is only read "
                              f"with method 'msd' (CLIP has no teacher); leave it 0")
    need(0.0 <= cfg.alpha <= 1.0, "alpha", "a value in [0, 1]")
    need(0.0 <= cfg.dropout < 1.0, "dropout", "a value in [0, 1)")
    need(cfg.alpha_ramp_steps >= -1, "alpha_ramp_steps", "-1 (one epoch) or a number of steps >= 0")
    need(cfg.image_size % cfg.patch_size == 0, "image_size", f"a multiple of patch_size {cfg.patch_size}")
    need(cfg.vision_width % cfg.vision_heads == 0, "vision_width", f"a multiple of vision_heads {cfg.vision_heads}")
    need(cfg.text_width % cfg.text_heads == 0, "text_width", f"a multiple of text_heads {cfg.text_heads}")
    need(cfg.device == "auto" or cfg.device.split(":")[0] in ("cpu", "cuda", "mps"), "device",
         "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    need(cfg.memory_limit_gb >= 0, "memory_limit_gb", "0 (90 % of the free memory) or a limit in GB")
    check_memory(cfg, vocab_size=0, training=False)  # before anything is built; start_run checks
    # again with the vocabulary, the optimizer and the activations, against the device's memory


def parameter_count(cfg, vocab_size, bert_config=None):
    """The student's parameters, from the config alone. A block of width w holds (4 + 2r) w^2 +
    (9 + r) w: qkv and out-projection, the MLP of r * w, two LayerNorms."""
    def block(w, r):
        return (4 + 2 * r) * w * w + (9 + r) * w
    w, r = cfg.vision_width, cfg.mlp_ratio
    tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
    vision = cfg.vision_layers * block(w, r) + (cfg.patch_size ** 2 + tokens + 4) * w
    if cfg.text_arch == "bert" and bert_config:
        wt, layers = bert_config["hidden_size"], bert_config["num_hidden_layers"]
        rt = bert_config["intermediate_size"] / wt
    else:
        wt, layers, rt = cfg.text_width, cfg.text_layers, r
    text = layers * block(wt, rt) + (vocab_size + cfg.max_len + 2) * wt
    return int(vision + text + (w + wt) * cfg.embed_dim)


def memory_needed(cfg, vocab_size, bert_config=None, training=True):
    """A lower bound of the bytes a run of cfg holds, from the config alone. Building the model:
    float32 weights of the student and the teacher (an MSD module always has both) and the two
    queues. Training adds the student's gradient and AdamW's two moments, and the activations
    one micro-batch keeps for its backward pass and one layer's attention scores (counted at 2
    bytes a value, as under bf16 autocast)."""
    P = parameter_count(cfg, vocab_size, bert_config)
    built = 4 * P * 2 + 2 * cfg.queue_size * (4 * cfg.embed_dim + 8)
    if not training:
        return built
    tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
    kept = (tokens * cfg.vision_width * cfg.vision_layers + cfg.max_len * cfg.text_width * cfg.text_layers)
    activations = 2 * cfg.batch_size * kept * (6 + 2 * cfg.mlp_ratio)
    scores = 2 * cfg.batch_size * max(cfg.vision_heads * tokens ** 2, cfg.text_heads * cfg.max_len ** 2)
    return built + 4 * P * 3 + activations + scores


def memory_free(device=None):
    """Bytes free now: the GPU's, else the host's (MemAvailable, or physical memory), or None."""
    if device is not None and device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(cfg, vocab_size, device=None, bert_config=None, training=True):
    """Refuse, before anything is allocated, a config whose memory_needed exceeds the limit:
    cfg.memory_limit_gb, or 90 % of the memory free now."""
    need = memory_needed(cfg, vocab_size, bert_config, training)
    free = memory_free(device)
    limit = cfg.memory_limit_gb * 2**30 if cfg.memory_limit_gb else (0.9 * free if free else None)
    if limit is not None and need > limit:
        where = "set by memory_limit_gb" if cfg.memory_limit_gb else (
            f"90 % of the {free / 2**30:.1f} GB free on {device or 'this machine'}")
        raise data.InputError(
            f"this config needs at least {need / 2**30:,.1f} GB ({parameter_count(cfg, vocab_size, bert_config):,} "
            f"parameters, queue_size {cfg.queue_size}, micro-batch {cfg.batch_size} of "
            f"{(cfg.image_size // cfg.patch_size) ** 2 + 1} image and {cfg.max_len} text tokens), over the "
            f"limit of {limit / 2**30:,.1f} GB ({where}). Lower the widths, layers, image_size, max_len, "
            f"queue_size or batch_size, or raise memory_limit_gb if the estimate is wrong for your machine")


# -----------------------------------------------------------------------------
# D. More than one process: torchrun, DistributedDataParallel (method.md §5)
# Read this when you train on several GPUs; a single process never enters it. The
# accumulation argument extends to W processes: the keys are stop-gradient teacher features,
# so when every process contrasts its rows with the teacher features of the WHOLE global batch
# (all-gathered) and the same queue, DDP's gradient average over W processes x N micro-batches
# x b pairs equals the gradient of one batch of W * N * b. Also here: the RNG states a
# checkpoint keeps, and that exact CLIP replays.
# -----------------------------------------------------------------------------


@dataclass
class Dist:
    """This process's place among the W processes that torchrun started (W = 1 without it)."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = None
    ddp_student: nn.Module = None  # DistributedDataParallel(model.student), set by wrap_student

    @property
    def is_main(self):  # rank 0 alone logs, shows progress and writes checkpoints
        return self.rank == 0


def init_distributed(cfg):
    """torchrun sets WORLD_SIZE, RANK and LOCAL_RANK: one process per GPU (NCCL), or per CPU
    process (gloo). Without torchrun, W = 1 and nothing is initialised."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = pick_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise data.InputError(f"torchrun: device {cfg.device!r} is not supported; use cuda or cpu")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, device)


def wrap_student(model, dist, device):
    """W processes: the student wrapped in DistributedDataParallel (dist.ddp_student), which
    averages its gradients over the processes in backward()."""
    if dist.world_size > 1:
        dist.ddp_student = torch.nn.parallel.DistributedDataParallel(
            model.student, device_ids=[device.index] if device.type == "cuda" else None)


def gathered(dist, *xs):
    """W processes: each tensor for the GLOBAL batch, in rank order (no gradient flows)."""
    return [all_gather(x, dist) for x in xs] if dist is not None and dist.world_size > 1 else list(xs)


def sync_on_last(student, dist, j, N):
    """W processes: DDP all-reduces the gradients in backward(); inside no_sync() they only
    accumulate, so the all-reduce happens once per optimizer step, on the last micro-batch."""
    if dist is not None and dist.world_size > 1 and j < N - 1:
        return student.no_sync()
    return contextlib.nullcontext()


def reduce_gradients(model, dist, sum_student=False):
    # W processes. sum_student (CLIP): each holds one part of the gradient of ONE loss over the
    # global batch, and DDP averaged the parts (/ W): multiply by W to get their sum. tau lives
    # outside the DDP-wrapped student: its gradient is averaged over W by hand.
    if dist is None or dist.world_size == 1:
        return
    if sum_student:
        for p in model.student.parameters():
            if p.grad is not None:
                p.grad.mul_(dist.world_size)
    torch.distributed.all_reduce(model.logit_scale.grad)
    model.logit_scale.grad /= dist.world_size


def gathered_live(image_feat, text_feat, ids, dist):
    """CLIP with W processes (open_clip's gather_features): every process's rows of the
    micro-batch, in rank order, this process's own rows live (with gradient), the others' as
    all-gathered copies without gradient. One process: the rows as they are."""
    if dist is None or dist.world_size == 1:
        return image_feat, text_feat, ids
    live = slice(dist.rank * len(ids), (dist.rank + 1) * len(ids))
    image_all, text_all = all_gather(image_feat.detach(), dist), all_gather(text_feat.detach(), dist)
    return splice(image_all, image_feat, live), splice(text_all, text_feat, live), all_gather(ids, dist)


class RanksDisagreeError(data.InputError):
    """torchrun started processes with different configs or data."""


def check_ranks_agree(dist, what, value):
    """Before step 1: every process must train the same run. One all_gather of a small dict;
    a difference is refused in every process, and the command line prints rank 0's line."""
    if dist.world_size == 1:
        return
    values = [None] * dist.world_size
    torch.distributed.all_gather_object(values, value)
    differ = sorted({k for v in values[1:] for k in set(v) | set(values[0]) if v.get(k) != values[0].get(k)})
    if differ:
        shown = "; ".join(f"{k}: " + ", ".join(f"rank {r} {v.get(k)!r}" for r, v in enumerate(values))
                          for k in differ[:3])
        raise RanksDisagreeError(f"torchrun: the {dist.world_size} processes were started with "
                                 f"different {what} ({shown}{'; ...' if len(differ) > 3 else ''}); "
                                 f"start every process with the same command and files")


@torch.no_grad()
def all_gather(x, dist):
    """(n, ...) on every process -> (W * n, ...): all of them, in rank order (MoCo's
    concat_all_gather). Used for teacher features and pair ids only, which carry no gradient."""
    parts = [torch.empty_like(x) for _ in range(dist.world_size)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def check_replicas_agree(model, step):
    """Every process applies the same averaged gradient, EMA and enqueue, so student, teacher
    and queues must stay identical without ever being sent; one all-reduce of their sums checks it."""
    parts = [model.student.parameters()]
    if model.teacher is not None:
        parts += [model.teacher.parameters(), model.image_queue.buffers(), model.text_queue.buffers()]
    sums = torch.stack([torch.stack([t.double().sum() for t in part]).sum() for part in parts])
    low, high = sums.clone(), sums.clone()
    torch.distributed.all_reduce(low, torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, torch.distributed.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(f"step {step}: the processes' copies of the student / teacher / queues "
                           f"differ (sums {low.tolist()} .. {high.tolist()}); stopping")


def rng_states(dist):
    """The RNG state of every process (a collective: all processes call it), for the checkpoint."""
    mine = {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    if dist.world_size == 1:
        return [mine]
    states = [None] * dist.world_size
    torch.distributed.all_gather_object(states, mine)
    return states


def get_rng_state(device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng_state(state, device):
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


# -----------------------------------------------------------------------------
# E. Pretrained weights: the post-LN BERT, a safetensors reader, the BERT and ViT name maps
# Read this when you start from published encoders (configs/mimic_pretrained.json). At paper
# scale f_t starts from Bio_ClinicalBERT and f_v from an ImageNet ViT-B/16. Their published
# files are read here without transformers, timm or safetensors: each name map below says once
# which tensor of theirs becomes which parameter of ours, and a file that does not fit is
# refused with one error listing every missing, unexpected, mis-shaped, integer or NaN / inf
# tensor. A config.json is checked against its weights file before a tower is built from it,
# and a file is trusted for nothing its bytes do not back. Nothing is ever downloaded
# (docs/mimic.md says which files to fetch by hand). tests/test_pretrained.py checks all of it
# against the reference libraries' own outputs.
# -----------------------------------------------------------------------------


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
    """f_t for text_arch "bert", shaped by the checkpoint's config.json (`bert_config`). Token +
    position + token-type embeddings (every token is of type 0: only row 0 of the type table is
    kept), LayerNorm, post-LN blocks, the last hidden state of [CLS] (BERT's pooler is not used;
    ALBEF also takes the [CLS] state)."""
    pad_multiple = 1  # reports are trimmed to a multiple of this (compile_towers raises it)

    def __init__(self, bert_config, vocab_size, max_len, dropout, impl):
        super().__init__()
        c, source = bert_config, bert_config["source"]
        if vocab_size > c["vocab_size"]:
            raise data.InputError(f"the tokenizer has {vocab_size} ids, {source} says vocab_size "
                                  f"{c['vocab_size']}: vocab.txt does not belong to these weights")
        if max_len > c["max_position_embeddings"]:
            raise data.InputError(f"config key 'max_len' = {max_len} exceeds max_position_embeddings "
                                  f"{c['max_position_embeddings']} of {source}; use --max_len="
                                  f"{c['max_position_embeddings']} or less")
        self.bert_config = bert_config        # its shape, stored in our checkpoints
        self.width = width = c["hidden_size"]
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


def load_published_weights(encoder, cfg):
    """A DualEncoder's towers from their published checkpoints, when the config names them."""
    if cfg.text_arch == "bert":
        load_bert_weights(encoder.text, find_bert_weights(cfg.text_weights))
    if cfg.vision_weights:
        load_vit_weights(encoder.visual, cfg.vision_weights)


class WeightsError(data.InputError):
    """A published weights file (or its config.json) that cannot be used; the message names it."""


TIMM_VIT_LN_EPS = 1e-6  # timm's ViTs use LayerNorm(eps=1e-6); PyTorch's default (from scratch) is 1e-5


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


SAFETENSORS_MAX_HEADER = 100_000_000  # bytes; the safetensors library refuses longer headers too


def read_safetensors_header(path, f):
    """The header of the open .safetensors file f -> (where its data section starts, [(name,
    dtype, shape, begin, end)] in file order), checked against the file's size. Every byte of the
    data section must belong to exactly one tensor: no two tensors may share bytes, and no bytes
    may lie between or after them (what no header entry names is never read; the format allows
    none). Nothing but the header has been read when this returns."""
    file_size = os.fstat(f.fileno()).st_size
    first = f.read(8)
    n = int.from_bytes(first, "little") if len(first) == 8 else None
    if n is None or 8 + n > file_size:
        raise WeightsError(f"{path}: truncated or not a safetensors file ({file_size} bytes, "
                           f"header length {n})")
    if n > SAFETENSORS_MAX_HEADER:
        raise WeightsError(f"{path}: not a safetensors file (a header of {n} bytes; the format "
                           f"allows {SAFETENSORS_MAX_HEADER})")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: not a safetensors file (its header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    data_size, entries = file_size - 8 - n, []
    for name, info in header.items():
        try:
            kind, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            shape = None
        if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise WeightsError(f"{path}: tensor {name!r}: bad header entry {info!r} (expected "
                               f"dtype, shape, data_offsets)")
        if kind not in SAFETENSORS_DTYPES:
            raise WeightsError(f"{path}: tensor {name!r} has dtype {kind}, which this reader does "
                               f"not read (it reads {', '.join(SAFETENSORS_DTYPES)})")
        dtype = SAFETENSORS_DTYPES[kind]
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size
                and end - begin == size):
            raise WeightsError(f"{path}: tensor {name!r} ({kind} {shape}, {size} bytes) has "
                               f"data_offsets [{begin}, {end}] in a data section of {data_size} "
                               f"bytes: the file is truncated or corrupt")
        entries.append((name, dtype, shape, begin, end))
    entries.sort(key=lambda e: (e[3], e[4]))
    covered, previous = 0, None  # bytes [0, covered) belong to the tensors seen so far
    for name, _, _, begin, end in entries:
        if begin != covered:
            what = (f"overlaps tensor {previous!r}, which ends at byte {covered}" if begin < covered
                    else f"leaves bytes [{covered}, {begin}) that no tensor names")
            raise WeightsError(f"{path}: tensor {name!r} at data_offsets [{begin}, {end}] {what}: "
                               f"not a valid safetensors file")
        covered, previous = end, name
    if covered != data_size:
        raise WeightsError(f"{path}: the header names {covered} bytes of tensor data, but "
                           f"{data_size} bytes follow it: {data_size - covered} bytes that no "
                           f"tensor names, which are not read; not a valid safetensors file")
    return 8 + n, entries


def read_safetensors(path, meta=False):
    """A .safetensors file -> {name: tensor}. The format: 8 bytes (little-endian) giving the header
    length n; n bytes of JSON, {name: {"dtype", "shape", "data_offsets": [begin, end]}} plus an
    optional "__metadata__"; then the tensors' raw little-endian bytes, offsets counted from the
    end of the header. Each tensor's bytes are read where the header says (seek), after the
    whole header is checked. meta=True: tensors on the "meta" device (dtype and shape, no data)."""
    path = Path(path)
    if sys.byteorder != "little":
        raise WeightsError(f"{path}: this safetensors reader assumes a little-endian machine")
    tensors = {}
    with open(path, "rb") as f:
        start, entries = read_safetensors_header(path, f)
        for name, dtype, shape, begin, end in entries:
            if meta or begin == end:
                tensors[name] = torch.zeros(shape, dtype=dtype, device="meta" if meta else "cpu")
                continue
            buffer = bytearray(end - begin)
            f.seek(start + begin)
            if f.readinto(buffer) != len(buffer):  # the file shrank since its size was read
                raise WeightsError(f"{path}: tensor {name!r}: the file ends early (truncated)")
            tensors[name] = torch.frombuffer(buffer, dtype=dtype).reshape(shape)
    return tensors


def read_weights(path, meta=False):
    """A weights file -> {name: tensor}: .safetensors by the reader above; .bin / .pth / .pt by
    torch.load(weights_only=True), which refuses arbitrary objects (memory-mapped for meta=True
    where the format allows, so that no tensor data is read)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path, meta)
    if path.suffix not in (".bin", ".pth", ".pt"):
        raise WeightsError(f"{path}: unknown weights format {path.suffix!r}; expected .safetensors, "
                           f".bin, .pth or .pt")
    try:
        try:
            weights = torch.load(path, map_location="cpu", weights_only=True, mmap=meta)
        except RuntimeError as e:  # mmap needs the zip format of torch >= 1.6: read it all
            if not (meta and "mmap" in str(e)):
                raise
            weights = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors share no base class
        raise WeightsError(f"{path}: torch.load(weights_only=True) cannot read it: {e}") from e
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        keys = list(weights)[:6] if isinstance(weights, dict) else []
        raise WeightsError(f"{path}: expected a flat {{name: tensor}} state dict, got "
                           f"{type(weights).__name__} {keys}; if it wraps one (e.g. under 'model' "
                           f"or 'state_dict'), save that inner dict to its own file")
    if meta:
        return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in weights.items()}
    return dict(weights)


def load_mapped(module, weights, names, per_layer, theirs_prefix, transforms, ignored, source):
    """Copy `weights` (their names) into `module` (our names). The name map, ours -> theirs, is
    `names` plus `per_layer` for each of module.blocks (weight and bias each); a tuple of theirs
    is concatenated along dim 0, and transforms[ours] applied where given. Tensors whose names
    start with one of `ignored` may stay unused; every other problem (missing, unexpected,
    mis-shaped, not floating point, NaN / inf) is collected and raised as ONE error. "meta"
    module and weights check names, shapes and dtypes without data. Returns the unused tensors'
    names."""
    name_map = {ours: (theirs,) for ours, theirs in names.items()}
    for i in range(len(module.blocks)):
        for ours, theirs in per_layer:
            theirs = (theirs,) if isinstance(theirs, str) else theirs
            for p in ("weight", "bias"):
                name_map[f"blocks.{i}.{ours}.{p}"] = tuple(f"{theirs_prefix}{i}.{t}.{p}"
                                                           for t in theirs)
    target = module.state_dict()
    assert set(name_map) == set(target), "the name map must cover exactly the module's parameters"
    converted, missing, wrong, bad = {}, [], [], []
    for ours, theirs in name_map.items():
        if any(t not in weights for t in theirs):
            missing += [t for t in theirs if t not in weights]
            continue
        for t in theirs:  # a meta tensor has no values: judged by its dtype alone
            if not weights[t].is_floating_point():
                bad.append(f"{t} ({weights[t].dtype}: weights must be floating point)")
            elif not weights[t].is_meta and not torch.isfinite(weights[t]).all():
                bad.append(f"{t} ({(~torch.isfinite(weights[t])).sum().item()} NaN / inf values)")
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
    used = {t for theirs in name_map.values() for t in theirs}
    unexpected = sorted(k for k in weights if k not in used and not k.startswith(ignored))
    if missing or unexpected or wrong or bad:
        problems = [f"{what} ({len(names)}): {', '.join(names)}" for what, names in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong),
                     ("unusable values", bad)) if names]
        raise WeightsError(f"{source} does not fit the model:\n  " + "\n  ".join(problems))
    module.load_state_dict(converted)
    return sorted(k for k in weights if k not in used)


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
    ("attn.proj", "attention.output.dense"), ("ln_1", "attention.output.LayerNorm"),
    ("mlp.fc", "intermediate.dense"), ("mlp.proj", "output.dense"), ("ln_2", "output.LayerNorm")]


BERT_UNUSED = ("pooler.", "cls.", "embeddings.position_ids")  # NSP pooler, pretraining heads, a buffer


BERT_CONFIG_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "max_position_embeddings")


def read_bert_config(folder):
    """The shape of a BERT-family checkpoint, from its config.json -> a plain dict (stored in our
    checkpoints, so that a trained model is rebuilt without the folder), checked against the
    folder's weights file (check_bert_fits) before any tower is built from it."""
    folder, help_ = Path(folder), 'see docs/mimic.md'
    if not folder.is_dir():
        raise FileNotFoundError(f"config key 'text_weights': folder not found: {folder} ({help_}: "
                                f"it needs config.json, vocab.txt and model.safetensors or "
                                f"pytorch_model.bin)")
    path = folder / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"config key 'text_weights': no config.json in {folder} ({help_})")
    c = data.read_json(path, what="BERT config")
    if not isinstance(c, dict):
        raise WeightsError(f"{path}: expected a JSON object of BERT's settings")
    missing = [k for k in BERT_CONFIG_KEYS if not isinstance(c.get(k), int) or c[k] < 1]
    if missing:
        raise WeightsError(f"{path}: needs positive integers for {missing}")
    for key, allowed in (("model_type", "bert"), ("hidden_act", "gelu"),
                         ("position_embedding_type", "absolute")):
        if c.get(key, allowed) != allowed:
            raise WeightsError(f"{path}: {key} {c[key]!r} is not supported; the BERT tower is "
                               f"{key} {allowed!r} (BERT, BioBERT, Bio_ClinicalBERT, PubMedBERT, ...)")
    if c["hidden_size"] % c["num_attention_heads"]:
        raise WeightsError(f"{path}: hidden_size {c['hidden_size']} is not divisible by "
                           f"num_attention_heads {c['num_attention_heads']}")
    eps = c.get("layer_norm_eps", 1e-12)  # BERT's, if not written
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise WeightsError(f"{path}: layer_norm_eps {eps!r} must be a positive number "
                           f"(BERT's is 1e-12): LayerNorm divides by sqrt(variance + eps)")
    config = {**{k: c[k] for k in BERT_CONFIG_KEYS}, "layer_norm_eps": float(eps), "source": str(path)}
    check_bert_fits(config, find_bert_weights(folder))
    return config


def find_bert_weights(folder):
    """model.safetensors, else pytorch_model.bin, in a BERT checkpoint folder."""
    folder = Path(folder)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    there = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise FileNotFoundError(f"config key 'text_weights': no model.safetensors or pytorch_model.bin "
                            f"in {folder} (it holds {there}; a sharded checkpoint is not supported)")


def read_bert_weights(path, meta=False):
    """A BERT checkpoint file -> {HF BertModel name: tensor}. Published files name things in two
    more ways, both read: BertForPreTraining / MaskedLM files (Bio_ClinicalBERT's) put the encoder
    under "bert.", and TF-converted ones call LayerNorm's weight and bias gamma and beta."""
    weights = {}
    for name, value in read_weights(path, meta).items():
        name = name[len("bert."):] if name.startswith("bert.") else name
        weights[name.replace("LayerNorm.gamma", "LayerNorm.weight")
                    .replace("LayerNorm.beta", "LayerNorm.bias")] = value
    return weights


def load_bert_into(text, weights, path):
    """BERT `weights` (read_bert_weights) -> BertTextTransformer `text`; -> the unused names."""
    return load_mapped(text, weights, BERT_NAMES, BERT_LAYER_NAMES, "encoder.layer.",
                       {"token_type_embedding": lambda t: t[0]}, BERT_UNUSED, path)


def check_bert_fits(config, path):
    """Does config.json (`config`, read_bert_config) describe the weights file at path? Checked
    from the file's dtypes and shapes alone (its header; no tensor data) against a tower built
    on the "meta" device (shapes, no memory), so that a config.json asking for a tower far
    larger than its file is refused before anything is allocated. The layer count is compared
    first: building even a meta tower costs time per layer."""
    weights = read_bert_weights(path, meta=True)
    layers = len({k.split(".")[2] for k in weights if k.startswith("encoder.layer.")})
    held = sum(v.numel() for k, v in weights.items() if not k.startswith(BERT_UNUSED))
    if layers != config["num_hidden_layers"]:
        raise WeightsError(f"{config['source']} asks for num_hidden_layers "
                           f"{config['num_hidden_layers']}, but {path} holds {layers} layers "
                           f"({held:,} parameters): the config.json does not belong to these weights")
    with torch.device("meta"):
        text = BertTextTransformer(config, config["vocab_size"], 1, 0.0, "sdpa")
    try:
        load_bert_into(text, weights, path)
    except WeightsError as e:
        wanted = sum(p.numel() for p in text.parameters())
        raise WeightsError(f"{e}\n  {config['source']} implies {wanted:,} parameters (hidden_size "
                           f"{config['hidden_size']}, intermediate_size {config['intermediate_size']}, "
                           f"vocab_size {config['vocab_size']}); the file holds {held:,}") from None


def load_bert_weights(text, path):
    """A BERT checkpoint file -> BertTextTransformer `text`."""
    weights = read_bert_weights(path)
    unused = load_bert_into(text, weights, path)
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


def resample_pos_embed(pos, grid):
    """Position embeddings of a G x G patch grid (1 + G*G, C) -> (1 + grid*grid, C): the class
    token's row is kept, the grid is resized like a C-channel image, bicubic with antialiasing
    (what timm's resample_abs_pos_embed does when it loads a ViT at another image size)."""
    G = math.isqrt(pos.shape[0] - 1)
    if G * G != pos.shape[0] - 1:
        raise data.InputError(f"{pos.shape[0] - 1} position rows after the class token are not a square grid")
    if G == grid:
        return pos
    cls_pos, grid_pos = pos[:1], pos[1:]
    grid_pos = grid_pos.reshape(1, G, G, -1).permute(0, 3, 1, 2)   # (1, C, G, G)
    grid_pos = F.interpolate(grid_pos.float(), size=(grid, grid), mode="bicubic", antialias=True,
                             align_corners=False)
    grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(grid * grid, -1)  # (grid*grid, C)
    return torch.cat([cls_pos, grid_pos.to(pos.dtype)])


def load_vit_weights(visual, path):
    """A timm ViT file -> VisionTransformer `visual`. Width, depth, patch size and MLP size must
    be the config's; timm's files do not record the heads, so vision_heads is used as given (12
    for ViT-B). Another image_size resamples the positions. The RGB patch embedding is summed
    over its three input channels: exact for a grey image fed as R = G = B with one normalisation
    on every channel (mean = std = 0.5 for timm's augreg ViTs, as in data.ImageTransform)."""
    path = Path(path)
    data.require_file(path, "config key 'vision_weights': file")  # see README, "Training on MIMIC-CXR"
    weights = read_weights(path)
    grid = math.isqrt(visual.positional_embedding.shape[0] - 1)
    transforms = {"class_embedding": lambda t: t.reshape(t.shape[-1]),
                  "positional_embedding": lambda t: resample_pos_embed(t.reshape(-1, t.shape[-1]), grid),
                  "patch_embed.weight": lambda t: t.sum(dim=1, keepdim=True)}
    width, patch = visual.patch_embed.weight.shape[0], visual.patch_embed.weight.shape[-1]
    try:  # "head." (the ImageNet classifier) is left unused
        load_mapped(visual, weights, VIT_NAMES, VIT_BLOCK_NAMES, "blocks.", transforms, ("head.",),
                    path)
    except ValueError as e:  # say what the file holds beside what the config asks for
        proj = weights.get("patch_embed.proj.weight")
        depth = len({k.split(".")[1] for k in weights if k.startswith("blocks.")})
        holds = (f"width {proj.shape[0]}, {depth} blocks, patch {proj.shape[-1]}"
                 if proj is not None and proj.dim() == 4 else f"{depth} blocks")
        raise WeightsError(f"{e}\n  the config asks for vision_width {width}, vision_layers "
                           f"{len(visual.blocks)}, patch_size {patch}, MLP hidden "
                           f"{visual.blocks[0].mlp.fc.out_features} (mlp_ratio); the file holds "
                           f"{holds}") from None
    old = math.isqrt(weights["pos_embed"].shape[-2] - 1)
    print(f"vision tower: ViT, {len(visual.blocks)} blocks, width {width}, "
          f"{len(visual.state_dict())} tensors from {path}; patch embedding RGB -> grey; "
          f"positions {old}x{old}" + (f" resampled to {grid}x{grid}" if old != grid else ""))


# -----------------------------------------------------------------------------
# F. Logging and guards
# Read this when a run stops on NaN, or to see what a run prints and logs.
# -----------------------------------------------------------------------------


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm became NaN or inf: the run stops, nothing more is written."""


class RunLog:
    """log.jsonl: one JSON record per log_every steps, written by rank 0 alone. On --resume the
    records after the checkpoint's step are dropped first: the run does those steps again."""

    def __init__(self, path, resume, step, dist, echo):
        self.file, self.echo = None, echo
        if dist.is_main:
            if resume:
                truncate_log(path, step)
            self.file = open(path, "a" if resume else "w")

    def write(self, record):
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            if self.echo:
                print(json.dumps(record), flush=True)

    def record(self, out, step, epoch, pairs_per_s, model, dist, bar):
        """train_step's numbers (0-d tensors on the device) read once, shown and written. With
        several processes: the loss is averaged over the global batch, and the replicas are
        checked to agree."""
        loss = out["loss"].clone()
        if dist.world_size > 1:
            torch.distributed.all_reduce(loss)
            loss /= dist.world_size
            check_replicas_agree(model, step)
        last = {"loss": loss.item(), "grad_norm": out["grad_norm"].item(), "lr": out["lr"],
                "tau": out["tau"].item(), "pairs_per_s": pairs_per_s}
        shown = {"loss": f"{last['loss']:.3f}", "lr": f"{last['lr']:.1e}", "tau": f"{last['tau']:.3f}",
                 "pairs_s": f"{last['pairs_per_s']:.0f}"}
        if model.teacher is not None:  # alpha means something for MSD only: logged and shown there
            last["alpha"] = out["alpha"]
            shown["alpha"] = f"{last['alpha']:.2f}"
        bar.set_postfix(shown)
        self.write({"step": step, "epoch": epoch, **last})
        return last

    def heldout(self, metrics, step, epoch, bar):
        """A held-out check: its own record in log.jsonl, and a line above the bar."""
        self.write({"step": step, "epoch": epoch, **metrics})
        if self.file is not None and not self.echo:
            bar.write(f"step {step}: valid loss {metrics['valid_loss']:.3f}, valid mean R@10 "
                      f"{metrics['valid_R@10']:.3f} (over {metrics['heldout_pairs']} valid pairs"
                      f"{'; 1 by construction below 11' if metrics['heldout_pairs'] <= 10 else ''})")

    def close(self):
        if self.file is not None:
            self.file.close()


HELDOUT_PAIRS = 256  # valid pairs scored at each held-out check (about a second at the default size)


def heldout_split(cfg, run, dist):
    """The valid split as a dataset (images as evaluation sees them), or None: no valid rows,
    eval_every 0, or a process other than rank 0."""
    if cfg.eval_every == 0 or not dist.is_main:
        return None
    rows = [r for r in data.read_manifest(run.manifest, skip_bad=True) if r["split"] == "valid"]
    if len(rows) < 2:
        return None
    return data.PairDataset(run.manifest, "valid", run.tokenizer, data.ImageTransform(cfg.image_size, train=False),
                            cache_images=cfg.cache_images, skip_bad=True)


@torch.no_grad()
def heldout_metrics(model, valid, device, autocast):
    """The student on the first HELDOUT_PAIRS pairs of the valid split: their CLIP loss as one
    batch at the current tau, and mean R@10 (image -> report and report -> image; a pair's own
    report is the hit, rows of the same study are not counted against it, ties count against).
    Eval mode (no dropout) and no random draw, so training continues exactly as without it."""
    n = min(len(valid), HELDOUT_PAIRS)
    images, ids, mask, pair_ids, _ = torch.utils.data.default_collate([valid[i] for i in range(n)])
    model.eval()
    with autocast():
        image_feat, text_feat = model.student(images.to(device), ids.to(device), mask.to(device))
    model.train()
    image_feat, text_feat, pair_ids = to_fp32(image_feat), to_fp32(text_feat), pair_ids.to(device)
    loss = clip_loss(image_feat, text_feat, pair_ids, model.logit_scale)
    sim = image_feat @ text_feat.t()                                  # (n, n)
    other = pair_ids[:, None] != pair_ids[None, :]                    # (n, n): wrong candidates
    own = sim.diagonal()
    rank_i2t = 1 + ((sim >= own[:, None]) & other).sum(1)
    rank_t2i = 1 + ((sim.t() >= own[:, None]) & other).sum(1)
    recall = ((rank_i2t <= 10).double().mean() + (rank_t2i <= 10).double().mean()) / 2
    return {"valid_loss": loss.item(), "valid_R@10": recall.item(), "heldout_pairs": n}


class SigtermStop:
    """While the loop runs (one process): SIGTERM, what a scheduler sends before it kills a job,
    only sets `asked`; the loop ends the step it is in, writes a checkpoint and exits (143).
    With several processes each would stop at another step, so there SIGTERM exits at once
    (the last checkpoint of ckpt_every is kept); so does Ctrl-C (SIGINT) everywhere."""

    def __init__(self, catch):
        self.asked, self.previous = False, None
        if catch:
            with contextlib.suppress(ValueError):  # not the main thread: signals cannot be caught
                self.previous = signal.signal(signal.SIGTERM, self.ask)

    def ask(self, *_):
        self.asked = True

    def restore(self):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def run_summary(step, seconds, pairs_done, last, device, ckpt_path, dist):
    """What pretrain returns, and the "done:" line it prints."""
    summary = {"steps": step, "seconds": seconds, "pairs_per_s": pairs_done / max(seconds, 1e-9),
               "final_loss": last.get("loss"), "peak_memory_mb": peak_memory_mb(device),
               "checkpoint": str(ckpt_path)}
    if dist.is_main:
        print(f"done: {step} steps in {seconds:.1f} s | {summary['pairs_per_s']:.0f} pairs/s | "
              f"final loss {summary['final_loss']} | peak memory {summary['peak_memory_mb']:.0f} MB "
              f"({'CUDA allocated' if device.type == 'cuda' else 'process RSS'}) | {ckpt_path}")
    return summary


def nothing_to_do(step, end, device, ckpt_path, dist):
    """The summary of a run resumed at the step where it ends: nothing is trained."""
    if dist.is_main:
        print(f"nothing to do: {ckpt_path} is at step {step}, the run ends at step {end} "
              f"(raise max_steps or epochs to train longer)")
    return {"steps": step, "seconds": 0.0, "pairs_per_s": float("nan"), "final_loss": None,
            "peak_memory_mb": peak_memory_mb(device), "checkpoint": str(ckpt_path)}


def truncate_log(path, step):
    """On resume, keep the log records of steps <= step: the run continues from there, so the
    later records (written after the checkpoint) would otherwise appear twice."""
    if not path.is_file():
        return
    kept = []
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            record_step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise data.InputError(f"{path}, line {i}: not a log record ({line[:60]!r}); the log is damaged. "
                                  f"Delete that line (or move {path.name} away) and --resume again; "
                                  f"the checkpoint does not depend on it") from None
        if record_step <= step:
            kept.append(line)
    data.write_text(path, "".join(line + "\n" for line in kept))


def stop_if_not_finite(first_bad, dist, ckpt_path):
    """One read of the device per log interval: was the loss or the gradient norm of any step so
    far NaN or inf? first_bad holds the first such step on the device (-1: none)."""
    bad = first_bad.clone()
    if dist.world_size > 1:
        torch.distributed.all_reduce(bad, torch.distributed.ReduceOp.MAX)
    if int(bad) >= 0:
        raise NonFiniteError(
            f"step {int(bad)}: the loss or the gradient norm is not finite (NaN or inf). Training "
            f"stopped; nothing was written after step {int(bad) - 1}, and the last good "
            f"checkpoint {ckpt_path} (if any) is kept. Lower lr, or check the data.")


def print_run_summary(cfg, run, dist, compiled):
    """The derived quantities a reader should know before the first step."""
    tokenizer, train_set, B = run.tokenizer, run.train_set, run.B
    valid_texts = [r["text"] for r in data.read_manifest(run.manifest, skip_bad=cfg.skip_bad)
                   if r["split"] == "valid"]
    print("config: " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
    print(f"device {run.device} | manifest {run.manifest} | {len(train_set)} training pairs | "
          f"vocabulary {tokenizer.vocab_size} | unknown-token rate: train "
          f"{tokenizer.unk_rate(train_set.texts):.2%}, valid "
          f"{tokenizer.unk_rate(valid_texts) if valid_texts else float('nan'):.2%} | reports cut at "
          f"max_len {cfg.max_len}: {tokenizer.truncated_share(train_set.texts):.1%} of train")
    W = f"{dist.world_size} processes x " if dist.world_size > 1 else ""
    print(f"effective batch B = {W}{cfg.accum_steps} x {cfg.batch_size} = {B} pairs | "
          f"{run.steps_per_epoch} optimizer steps per epoch | {run.total_steps} steps in all")
    params = sum(p.numel() for p in run.model.student.parameters())
    print(f"student {params / 1e6:.2f} M parameters | method {cfg.method} | "
          f"torch.compile {compiled}")
    if cfg.method == "msd":
        for line in teacher_scale_lines(run.momentum, run.steps_per_epoch, run.total_steps):
            print(line)
        print(f"queue K = {cfg.queue_size} fills in {math.ceil(cfg.queue_size / B)} steps | alpha "
              f"{cfg.alpha} reached after "
              f"{run.steps_per_epoch if cfg.alpha_ramp_steps < 0 else cfg.alpha_ramp_steps} steps")
        if cfg.queue_size > len(train_set) - B:
            print(f"warning: queue_size {cfg.queue_size} > training pairs - B = "
                  f"{len(train_set) - B}: a pair's own older copy will often sit in the queue")
    if run.source is not None:
        print(f"init_from {cfg.init_from}: student, teacher and tau from its step "
              f"{run.source['step']}; queues empty, optimizer and step fresh")
    if run.step:
        print(f"resuming from {Path(cfg.out_dir) / 'ckpt.pt'} at step {run.step}")


# The paper's likely setting (MIMIC-CXR, about 213,000 pairs, B = 256: about 834 steps an epoch,
# 30 to 50 epochs; ALBEF's m = 0.995): a teacher half-life of 138 steps, 0.3 to 0.55 % of the run.
PAPER_HALF_LIFE = "138 steps, 0.17 of an epoch, 0.3-0.55 % of the run (MIMIC-CXR, B = 256, m = 0.995)"
HALF_LIFE_WARN_SHARE = 0.05  # above this share of the run the teacher mostly remembers its start


def teacher_scale_lines(m, steps_per_epoch, total_steps):
    """The teacher's half-life in optimizer steps, in epochs and as a share of the run, beside
    the paper's likely setting, and a warning when it is more than a few percent of the run."""
    h = teacher_half_life(m)
    lines = [f"teacher half-life {h:.1f} optimizer steps = {h / steps_per_epoch:.2f} epochs = "
             f"{h / total_steps:.2%} of the run (m = {m:.6g}) | the paper's likely setting: {PAPER_HALF_LIFE}"]
    if h > HALF_LIFE_WARN_SHARE * total_steps:
        lines.append(f"warning: the teacher's half-life is {h / total_steps:.0%} of the run: for much "
                     f"of it the teacher stays close to its starting weights. To scale it like the "
                     f"paper set momentum_half_life=0.005 (0.5 % of the run; docs/choices.md, "
                     f"'Scaling m, K and the alpha ramp')")
    return lines


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


# -----------------------------------------------------------------------------
# G. The command line
# Read this to see which errors are a user's (one line, no traceback) and which are bugs.
# -----------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Train MSD (or the end-to-end CLIP baseline) on image-report pairs.",
        epilog="Any config key can be overridden as --key=value, e.g. --accum_steps=8. "
               "Several processes: torchrun --nproc_per_node=G msd.py --config ...")
    parser.add_argument("--config", help="JSON file of config keys (defaults: msd.Config)")
    parser.add_argument("--resume", action="store_true", help="continue the run in out_dir")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an out_dir that already holds a run (replaces it)")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of its one-line message")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except USER_ERRORS as e:
        if args.debug:
            raise
        parser.exit(2, f"msd.py: error: {one_line(e)}\n")
    try:
        pretrain(cfg, resume=args.resume, overwrite=args.overwrite)
    except USER_ERRORS as e:  # bad input, a refused run, a full disk: one line, exit 1
        if args.debug:
            raise
        quiet = isinstance(e, RanksDisagreeError) and os.environ.get("RANK", "0") != "0"
        parser.exit(1, None if quiet else f"msd.py: error: {one_line(e)}\n")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# What a user can cause: a bad config, file or folder, a refused run, a full disk, a diverging
# run. Their message says what and where; anything else is a bug and keeps its traceback.
# The one list of user errors, for both command lines: bad input (data.InputError and its
# kinds), a file that cannot be read or written (OSError), a run refused or stopped for a reason
# its message gives. Everything else is a bug and keeps its traceback.
USER_ERRORS = (*data.USER_ERRORS, NonFiniteError, RunLockedError)


def one_line(e):
    """An exception's message on one line (KeyError's str() would add quotes)."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(text.split()) or type(e).__name__


if __name__ == "__main__":
    main()
