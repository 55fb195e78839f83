"""Write tests/fixtures/pretrained/: tiny random BERT and ViT models saved in their published file
formats, and what the reference libraries (transformers, timm, safetensors) compute on them.
tests/test_pretrained.py checks msd.py's and data.py's hand-written readers, tokenizer and towers
against these outputs, without the reference libraries.

Run once by a developer, in a scratch environment that has the reference libraries; never by CI
or by a user (pytest does not collect this file). From the repository root:

    python -m venv ref-env && ref-env/bin/pip install torch torchvision timm transformers safetensors
    ref-env/bin/python tests/make_pretrained_fixtures.py

(keep ref-env outside the repository, or delete it afterwards). Everything is seeded; the library
versions used are written to fixtures/pretrained/versions.json. What it writes:

  bert/config.json, bert/vocab.txt    a 2-layer, 32-wide BERT with a 200-piece cased vocabulary
  bert/model.safetensors              BertModel (no prefix, with pooler), as save_pretrained writes it
  bert/pytorch_model.bin              BertForPreTraining ("bert." prefix, "cls." heads) in PyTorch's
                                      legacy (pre-zip) format, as Bio_ClinicalBERT's file is
  bert_reference.pt                   input ids, attention mask, last_hidden_state (eager attention)
  tokenizer_reference.json            report-like sentences and their token ids from the Python
                                      ("legacy") BertTokenizer and the fast (Rust) one, cased and
                                      uncased, plus a padded, truncated batch
  vit/model.safetensors, vit/pytorch_model.bin   timm's VisionTransformer (vit_base_patch16_224
                                      layout) at width 32, 2 blocks, patch 8, 32 px
  vit_reference.pt                    grey images, timm's class-token features after the final norm,
                                      the same at 48 px and 16 px (timm's own position resampling on
                                      load), and resample_abs_pos_embed's output for 6x6 and 2x2
  dtypes.safetensors, dtypes_reference.pt   one tensor of each dtype, written by safetensors
"""
import json
import shutil
import sys
import tempfile
from pathlib import Path

import safetensors
import safetensors.torch
import timm
import tokenizers
import torch
import transformers
from timm.layers import resample_abs_pos_embed
from transformers import BertConfig, BertForPreTraining, BertTokenizer
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

OUT = Path(__file__).resolve().parent / "fixtures" / "pretrained"

# A cased vocabulary like Bio_ClinicalBERT's, in miniature. The special tokens are NOT at ids
# 0..4 in BERT's order, so that the tokenizer must look them up. Lower-case letters have "##"
# continuations (most lower-case words segment), upper-case letters do not (XXXX, cased, is [UNK]).
LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOCAB = (["[PAD]", "[unused1]", "[unused2]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
         + list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + list("0123456789")
         + ["##" + d for d in "0123456789"] + list(LETTERS) + ["##" + c for c in LETTERS]
         + list(LETTERS.upper())
         + ["the", "The", "lung", "heart", "Heart", "size", "is", "normal", "no", "No",
            "acute", "cardio", "##pulmonary", "pulmonary", "process", "pleural", "effusion",
            "pneumo", "##thorax", "##nia", "right", "left", "upper", "lobe", "nodule", "cm", "mm",
            "##mega", "##ly", "atelectasis", "tube", "tip", "above", "carina", "unchanged", "since",
            "FINDINGS", "IMPRESSION", "mild", "Mild", "bibasilar", "small", "Small", "##sided",
            "vs", "early", "edema", "café", "cafe", "xxxx", "clear", "stable", "Stable", "change",
            "肺", "é", "##é", "œ", "##è", "##me", "Dr", "##üller", "##ller", "##ity", "##ies"])
assert len(VOCAB) == len(set(VOCAB))

SENTENCES = [
    "No acute cardiopulmonary process.",
    "The heart size is normal. The lungs are clear; no pleural effusion or pneumothorax.",
    "There is a 3.5 cm nodule in the right upper lobe (RUL), unchanged since ___.",
    "Comparison: XXXX. FINDINGS: Mild cardiomegaly, bibasilar atelectasis.",
    "ET tube tip 4.2cm above the carina; NG tube courses below the diaphragm.",
    "Small left-sided effusion, ?early pneumonia vs. atelectasis.",
    "Opacités bilatérales — œdème pulmonaire (café au lait).",
    "Discussed with Dr. Müller at 10:30 a.m. on ___/___/____ by telephone.",
    "肺部清晰，无胸腔积液。",
    "Lungs 清晰 clear, 5µm and ≥5 mm ± 2°.",
    "pneumono" * 13 + " is longer than 100 characters",      # a 104-character word: [UNK]
    "b" * 100 + " is exactly 100 characters",                  # still split into pieces
    "cafe\u0301 with a decomposed accent",                     # e + U+0301 (NFC makes it é)
    "IMPRESSION:\n\tNo change.\u00a0Stable\u2003appearance\u200b of the\x00 lungs\ufffd.",
    "NO ACUTE DISEASE. Heart Size NORMAL.",
    "T12-L1 compression #3, $100 & 50% <less> than 1/2 {prior} [stable] |x| ~y^ `z`",
    "",
    "   \n  ",
    "[MASK] is a special token, [CLS] too.",
    "Heart size is normal. " * 6 + "No pleural effusion.",   # longer than max_len: truncated
    "İstanbul ǅemal ﬁndings \u2028line\x85next",               # dotted I, titlecase digraph, ligature
    "Zzyzx qwerty unknownword",
]
MAX_LEN = 24  # the padded reference batch


def randomise(model, embed_std):
    """Every parameter random (biases and LayerNorm too, so that a swapped name shows up).
    Embedding-like tensors stay small, as in trained models, so that LayerNorm's eps matters."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "LayerNorm.weight" in name or "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embed" in name or name in ("cls_token", "pos_embed"):
                p.copy_(embed_std * noise)
            else:
                p.copy_(0.2 * noise)


def make_bert(tmp):
    bert_dir = OUT / "bert"
    bert_dir.mkdir(parents=True, exist_ok=True)
    (bert_dir / "vocab.txt").write_text("".join(t + "\n" for t in VOCAB), encoding="utf-8")
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=48, max_position_embeddings=64,
                        type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu")
    torch.manual_seed(0)
    model = BertForPreTraining(config).eval()
    randomise(model, embed_std=0.02)
    model.config.save_pretrained(bert_dir)
    # the BertModel alone, as save_pretrained writes it (safetensors, no prefix, pooler included)
    model.bert.save_pretrained(tmp / "bert_model")
    shutil.copy(tmp / "bert_model" / "model.safetensors", bert_dir / "model.safetensors")
    # the whole pretraining model in the legacy pickle format, as Bio_ClinicalBERT's .bin
    torch.save(model.state_dict(), bert_dir / "pytorch_model.bin", _use_new_zipfile_serialization=False)

    # token ids: the Python tokenizer (Google's algorithm) and the fast one, uncased and cased
    ids, agree = {}, {}
    for case, lower in (("uncased", True), ("cased", False)):
        slow = BertTokenizerLegacy(str(bert_dir / "vocab.txt"), do_lower_case=lower)
        fast = BertTokenizer.from_pretrained(str(bert_dir), do_lower_case=lower)
        ids[f"{case}_python"] = [slow(s)["input_ids"] for s in SENTENCES]
        ids[f"{case}_fast"] = [fast(s)["input_ids"] for s in SENTENCES]
        agree[case] = [i for i, (a, b) in enumerate(zip(ids[f"{case}_python"], ids[f"{case}_fast"]))
                       if a != b]
    # what a user of the folder gets: AutoTokenizer, no tokenizer_config.json -> lower-cased
    auto = transformers.AutoTokenizer.from_pretrained(str(bert_dir))
    ids["auto"] = [auto(s)["input_ids"] for s in SENTENCES]
    slow = BertTokenizerLegacy(str(bert_dir / "vocab.txt"), do_lower_case=True)
    batch = slow(SENTENCES, padding="max_length", truncation=True, max_length=MAX_LEN)
    reference = {"sentences": SENTENCES, "ids": ids, "python_vs_fast_differ_at": agree,
                 "auto_do_lower_case": bool(getattr(auto, "do_lower_case", None)),
                 "max_len": MAX_LEN, "padded_input_ids": batch["input_ids"],
                 "padded_attention_mask": batch["attention_mask"]}
    (OUT / "tokenizer_reference.json").write_text(json.dumps(reference, indent=1, ensure_ascii=True))

    # last hidden states with the canonical (eager) attention; sdpa must agree
    input_ids = torch.tensor(batch["input_ids"])
    attention_mask = torch.tensor(batch["attention_mask"])
    with torch.no_grad():
        model.bert.set_attn_implementation("eager")
        hidden = model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        model.bert.set_attn_implementation("sdpa")
        hidden_sdpa = model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    print("BERT eager vs sdpa max abs diff", (hidden - hidden_sdpa).abs().max().item())
    torch.save({"input_ids": input_ids, "attention_mask": attention_mask,
                "last_hidden_state": hidden.clone()}, OUT / "bert_reference.pt")
    return agree


def make_vit(tmp):
    vit_dir = OUT / "vit"
    vit_dir.mkdir(parents=True, exist_ok=True)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs).eval()
    randomise(model, embed_std=0.02)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, vit_dir / "model.safetensors", metadata={"format": "pt"})
    torch.save(state, vit_dir / "pytorch_model.bin")

    g = torch.Generator().manual_seed(1)
    out = {}
    for size in (32, 48, 16):
        images = torch.rand(3, 1, size, size, generator=g) * 2 - 1  # grey, normalised like ours
        if size == 32:
            m = model
        else:  # timm's own loading path, which resamples pos_embed to the new grid
            m = timm.create_model("vit_base_patch16_224", pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(vit_dir / "model.safetensors")),
                                  **{**kwargs, "img_size": size}).eval()
        with torch.no_grad():
            tokens = m.forward_features(images.expand(-1, 3, -1, -1))  # R = G = B
            features = m.forward_head(tokens, pre_logits=True)          # the class token after norm
        assert torch.equal(features, tokens[:, 0])
        out[f"images_{size}"], out[f"features_{size}"] = images, features.clone()
    pos = model.pos_embed.detach()
    out["pos_embed"] = pos.clone()
    out["pos_6x6"] = resample_abs_pos_embed(pos, new_size=[6, 6], num_prefix_tokens=1)
    out["pos_2x2"] = resample_abs_pos_embed(pos, new_size=[2, 2], num_prefix_tokens=1)
    torch.save(out, OUT / "vit_reference.pt")


def make_dtypes():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, generator=g)
    tensors = {"f64": x.double(), "f32": x, "f16": x.half(), "bf16": x.bfloat16(),
               "i64": torch.arange(-6, 6).reshape(2, 6), "i32": torch.arange(5, dtype=torch.int32),
               "i16": torch.tensor([-2, 7], dtype=torch.int16), "i8": torch.tensor([-128, 127], dtype=torch.int8),
               "u8": torch.tensor([0, 255], dtype=torch.uint8), "bool": torch.tensor([True, False]),
               "scalar": torch.tensor(3.25), "empty": torch.zeros(0, 5)}
    safetensors.torch.save_file(tensors, OUT / "dtypes.safetensors", metadata={"note": "fixture"})
    torch.save(tensors, OUT / "dtypes_reference.pt")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        differ = make_bert(Path(tmp))
        make_vit(Path(tmp))
    make_dtypes()
    versions = {"python": sys.version.split()[0], "torch": torch.__version__,
                "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                "timm": timm.__version__, "safetensors": safetensors.__version__}
    (OUT / "versions.json").write_text(json.dumps(versions, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 1024:.0f} KiB); python vs fast tokenizer differ at {differ}")


if __name__ == "__main__":
    main()
