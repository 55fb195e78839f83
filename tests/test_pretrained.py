"""Pretrained towers: the safetensors reader, BERT's WordPiece, the BERT tower and the timm ViT
import, each against what the reference libraries computed on tiny random models.

The fixtures (tests/fixtures/pretrained/) were written once by tests/make_pretrained_fixtures.py
in a scratch environment with transformers, timm and safetensors; none of them is needed here."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import data
import msd

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "pretrained"
BERT_DIR, VIT_DIR = FIX / "bert", FIX / "vit"
TOL = 1e-5  # float32; the reference libraries ran on another torch build


@pytest.fixture(scope="module")
def tok_ref():
    return json.loads((FIX / "tokenizer_reference.json").read_text())


def bert_tower(max_len=24, impl="sdpa"):
    config = msd.read_bert_config(BERT_DIR)
    return msd.BertTextTransformer(config, config["vocab_size"], max_len, 0.0, impl).eval()


def vit_tower(image_size=32, **kw):
    args = dict(patch_size=8, width=32, layers=2, heads=2, mlp_ratio=4, dropout=0.0, impl="sdpa",
                eps=msd.TIMM_VIT_LN_EPS)
    args.update(kw)
    return msd.VisionTransformer(image_size, **args).eval()


# ---------------------------------------------------------------- weights files


def test_safetensors_reader_equals_the_safetensors_library():
    ours = msd.read_safetensors(FIX / "dtypes.safetensors")
    ref = torch.load(FIX / "dtypes_reference.pt", weights_only=True)
    assert sorted(ours) == sorted(ref)  # "__metadata__" is not a tensor
    for name, value in ref.items():
        assert ours[name].dtype == value.dtype and torch.equal(ours[name], value), name


def test_safetensors_reader_refuses_bad_files_naming_them(tmp_path):
    good = (FIX / "dtypes.safetensors").read_bytes()
    n = int.from_bytes(good[:8], "little")
    header = json.loads(good[8:8 + n])

    def write(name, header=header, body=good[8 + n:], length=None):
        text = json.dumps(header).encode()
        path = tmp_path / name
        path.write_bytes((len(text) if length is None else length).to_bytes(8, "little") + text + body)
        return path

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good[:-10])  # the last tensor's bytes run past the end
    with pytest.raises(ValueError, match=r"cut\.safetensors.*truncated or corrupt"):
        msd.read_safetensors(cut)
    short = tmp_path / "short.safetensors"
    short.write_bytes(good[:20])  # not even the whole header
    with pytest.raises(ValueError, match=r"short\.safetensors: truncated"):
        msd.read_safetensors(short)
    odd = dict(header, f32={**header["f32"], "dtype": "F8_E4M3"})
    with pytest.raises(ValueError, match=r"odd\.safetensors: tensor 'f32' has dtype F8_E4M3"):
        msd.read_safetensors(write("odd.safetensors", odd))
    begin, end = header["f32"]["data_offsets"]
    shifted = dict(header, f32={**header["f32"], "data_offsets": [begin, end + 4]})
    with pytest.raises(ValueError, match=r"shifted\.safetensors: tensor 'f32'.*data_offsets"):
        msd.read_safetensors(write("shifted.safetensors", shifted))
    negative = dict(header, f32={**header["f32"], "shape": [-3, 4]})
    with pytest.raises(ValueError, match=r"negative\.safetensors: tensor 'f32': bad header entry"):
        msd.read_safetensors(write("negative.safetensors", negative))
    with pytest.raises(ValueError, match=r"long\.safetensors: truncated"):
        msd.read_safetensors(write("long.safetensors", length=10**9))
    (tmp_path / "text.safetensors").write_bytes((4).to_bytes(8, "little") + b"abcd")
    with pytest.raises(ValueError, match=r"text\.safetensors: not a safetensors file"):
        msd.read_safetensors(tmp_path / "text.safetensors")
    (tmp_path / "w.npz").write_bytes(b"PK")
    with pytest.raises(ValueError, match=r"w\.npz: unknown weights format '\.npz'"):
        msd.read_weights(tmp_path / "w.npz")
    torch.save({"model": {"a": torch.ones(1)}, "epoch": 3}, tmp_path / "wrapped.pth")
    with pytest.raises(ValueError, match=r"wrapped\.pth: expected a flat .*'model'"):
        msd.read_weights(tmp_path / "wrapped.pth")


# ---------------------------------------------------------------- WordPiece


@pytest.mark.parametrize("case", ["uncased", "cased"])
def test_wordpiece_ids_equal_hf_bert_tokenizer(tok_ref, case):
    """Every sentence, [CLS] and [SEP] included, id for id: the Python BertTokenizer exactly; the
    fast (Rust) one except where the two reference tokenizers disagree with each other."""
    tok = data.WordPieceTokenizer(
        (BERT_DIR / "vocab.txt").read_text(encoding="utf-8").splitlines(), max_len=512,
        do_lower_case=case == "uncased")
    ours = [tok.encode(s) for s in tok_ref["sentences"]]
    python, fast = tok_ref["ids"][f"{case}_python"], tok_ref["ids"][f"{case}_fast"]
    mismatches = [(s, o, p) for s, o, p in zip(tok_ref["sentences"], ours, python) if o != p]
    print(f"WordPiece {case}: {len(ours) - len(mismatches)}/{len(ours)} sentences equal the Python "
          f"BertTokenizer, {sum(o == f for o, f in zip(ours, fast))}/{len(ours)} the fast one")
    assert not mismatches, mismatches
    assert [i for i, (o, f) in enumerate(zip(ours, fast)) if o != f] == \
        tok_ref["python_vs_fast_differ_at"][case]


def test_wordpiece_batch_truncation_and_defaults_of_a_folder(tok_ref, tmp_path):
    """A folder without tokenizer_config.json is lower-cased, as HF's AutoTokenizer does (this is
    Bio_ClinicalBERT's case); padding, truncation and the mask equal the reference batch."""
    tok = data.WordPieceTokenizer.from_pretrained(BERT_DIR, max_len=tok_ref["max_len"])
    assert tok.do_lower_case and tok_ref["auto_do_lower_case"]
    assert [tok.encode(s) for s in tok_ref["sentences"]] == [
        ids[:tok.max_len - 1] + ids[-1:] if len(ids) > tok.max_len else ids for ids in tok_ref["ids"]["auto"]]
    input_ids, attention_mask = tok(tok_ref["sentences"])
    assert input_ids.tolist() == tok_ref["padded_input_ids"]
    assert attention_mask.tolist() == tok_ref["padded_attention_mask"]
    full = tok_ref["ids"]["uncased_python"]
    assert tok.truncated_share(tok_ref["sentences"]) == sum(len(i) > tok.max_len for i in full) / len(full)
    unk = tok.unk_id
    assert tok.unk_rate(tok_ref["sentences"]) == pytest.approx(
        sum(i.count(unk) for i in full) / sum(len(i) - 2 for i in full))
    # tokenizer_config.json decides the casing when present
    cased_dir = tmp_path / "cased"
    shutil.copytree(BERT_DIR, cased_dir)
    (cased_dir / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    cased = data.WordPieceTokenizer.from_pretrained(cased_dir, max_len=512)
    assert [cased.encode(s) for s in tok_ref["sentences"]] == tok_ref["ids"]["cased_python"]
    with pytest.raises(FileNotFoundError, match="no vocab.txt in"):
        data.WordPieceTokenizer.from_pretrained(tmp_path, max_len=8)
    (tmp_path / "vocab.txt").write_text("[PAD]\n[CLS]\nhello\n")
    with pytest.raises(ValueError, match=r"vocab\.txt: the WordPiece vocabulary has no \['\[SEP\]', '\[UNK\]'\]"):
        data.WordPieceTokenizer.from_pretrained(tmp_path, max_len=8)


def test_wordpiece_pieces_and_unknown_words():
    tok = data.WordPieceTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "effusion", "##s", "pleural",
                                   "un", "##aff", "##able", "."], max_len=16)
    assert tok.tokenize("Pleural effusions.") == ["pleural", "effusion", "##s", "."]
    assert tok.tokenize("unaffable") == ["un", "##aff", "##able"]  # greedy, longest first
    assert tok.tokenize("effusionx unaffablex") == ["[UNK]", "[UNK]"]  # no cover: the whole word
    assert tok.decode(tok.encode("pleural effusions")) == "pleural effusions"


def test_tokenizers_round_trip_through_a_weights_only_checkpoint(tmp_path):
    word = data.Tokenizer.build(["small left effusion", "no effusion"], min_freq=1, max_len=6)
    piece = data.WordPieceTokenizer.from_pretrained(BERT_DIR, max_len=12)
    texts = ["Small left effusion, 3.5 cm.", "", "No pleural effusion or pneumothorax today."]
    torch.save({"word": word.to_dict(), "piece": piece.to_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    for tok, d in ((word, saved["word"]), (piece, saved["piece"])):
        back = data.tokenizer_from_dict(d)
        assert type(back) is type(tok) and back.to_dict() == tok.to_dict()
        assert all(torch.equal(a, b) for a, b in zip(back(texts), tok(texts)))
    old = {"vocab": word.vocab, "max_len": word.max_len}  # written before tokenizers had a kind
    assert data.tokenizer_from_dict(old).to_dict() == word.to_dict()
    with pytest.raises(ValueError, match="restore it with data.tokenizer_from_dict"):
        data.Tokenizer.from_dict(piece.to_dict())
    with pytest.raises(ValueError, match="unknown tokenizer kind 'bpe'"):
        data.tokenizer_from_dict({"kind": "bpe"})
    # truncated_share is the same notion on both: tokens + [CLS] + [SEP] > max_len
    assert word.truncated_share(["small left effusion", "small left effusion no effusion"]) == 0.5
    assert piece.truncated_share(texts) == sum(len(piece.tokenize(t)) + 2 > 12 for t in texts) / 3


# ---------------------------------------------------------------- BERT tower


@pytest.mark.parametrize("impl", ["sdpa", "manual"])
@pytest.mark.parametrize("file", ["model.safetensors", "pytorch_model.bin"])
def test_bert_tower_equals_transformers(file, impl):
    """Last hidden states of every position (padding included) and the [CLS] rows that f_t
    returns, from both published formats (the .bin is BertForPreTraining's, "bert."-prefixed)."""
    ref = torch.load(FIX / "bert_reference.pt", weights_only=True)
    text = bert_tower(impl=impl)
    msd.load_bert_weights(text, BERT_DIR / file)
    with torch.no_grad():
        hidden = text.hidden_states(ref["input_ids"], ref["attention_mask"])
        cls = text(ref["input_ids"], ref["attention_mask"])
    diff = (hidden - ref["last_hidden_state"]).abs().max().item()
    print(f"BERT {file} ({impl}): max abs difference {diff:.1e}")  # shown with pytest -s
    assert diff <= TOL, diff
    torch.testing.assert_close(cls, ref["last_hidden_state"][:, 0], atol=TOL, rtol=0)


def test_bert_gamma_beta_names_load_the_same(tmp_path):
    """TF-converted files call LayerNorm's weight and bias gamma and beta."""
    weights = msd.read_weights(BERT_DIR / "model.safetensors")
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in weights.items()}
    assert renamed.keys() != weights.keys()
    torch.save(renamed, tmp_path / "old.bin")
    a, b = bert_tower(), bert_tower()
    msd.load_bert_weights(a, BERT_DIR / "model.safetensors")
    msd.load_bert_weights(b, tmp_path / "old.bin")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_bert_config_errors(tmp_path):
    config = msd.read_bert_config(BERT_DIR)
    with pytest.raises(ValueError, match=r"'max_len' = 65 exceeds max_position_embeddings 64 of .*config\.json"):
        msd.BertTextTransformer(config, config["vocab_size"], 65, 0.0, "sdpa")
    with pytest.raises(ValueError, match="vocab.txt does not belong to these weights"):
        msd.BertTextTransformer(config, config["vocab_size"] + 1, 16, 0.0, "sdpa")
    with pytest.raises(FileNotFoundError, match="config key 'text_weights': folder not found: " + re.escape(str(tmp_path / "nope"))):
        msd.read_bert_config(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        msd.read_bert_config(tmp_path)
    roberta = json.loads((BERT_DIR / "config.json").read_text())
    roberta["model_type"] = "roberta"
    (tmp_path / "config.json").write_text(json.dumps(roberta))
    with pytest.raises(ValueError, match="model_type 'roberta' is not supported"):
        msd.read_bert_config(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors or pytorch_model\.bin in .*config\.json"):
        msd.find_bert_weights(tmp_path)


# ---------------------------------------------------------------- ViT


@pytest.mark.parametrize("size", [32, 48, 16])
@pytest.mark.parametrize("file", ["model.safetensors", "pytorch_model.bin"])
def test_vit_tower_equals_timm(file, size):
    """Class-token features after the final norm, for grey images fed to timm as R = G = B. At
    48 px (6x6 grid) and 16 px (2x2) timm resampled the 4x4 position grid when loading."""
    ref = torch.load(FIX / "vit_reference.pt", weights_only=True)
    visual = vit_tower(size)
    msd.load_vit_weights(visual, VIT_DIR / file)
    with torch.no_grad():
        features = visual(ref[f"images_{size}"])
    diff = (features - ref[f"features_{size}"]).abs().max().item()
    print(f"ViT {file} at {size} px: max abs difference {diff:.1e}")  # shown with pytest -s
    assert diff <= TOL, diff


@pytest.mark.parametrize("grid", [6, 2])
def test_position_resampling_equals_timm(grid):
    ref = torch.load(FIX / "vit_reference.pt", weights_only=True)
    ours = msd.resample_pos_embed(ref["pos_embed"][0], grid)
    assert ours.shape == (1 + grid * grid, 32)
    print(f"positions 4x4 -> {grid}x{grid}: max abs difference "
          f"{(ours - ref[f'pos_{grid}x{grid}'][0]).abs().max().item():.1e}")  # shown with pytest -s
    torch.testing.assert_close(ours, ref[f"pos_{grid}x{grid}"][0], atol=1e-6, rtol=0)
    assert torch.equal(ours[0], ref["pos_embed"][0, 0])  # the class token's row is kept


def test_weights_that_do_not_fit_raise_one_error_listing_all(tmp_path):
    weights = msd.read_weights(VIT_DIR / "model.safetensors")
    del weights["blocks.1.norm2.bias"]
    weights["blocks.0.attn.q_norm.weight"] = torch.ones(16)
    weights["norm.weight"] = torch.ones(33)
    torch.save(weights, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as err:
        msd.load_vit_weights(vit_tower(), tmp_path / "bad.pth")
    message = str(err.value)
    assert "bad.pth does not fit the model" in message
    assert "missing (1): blocks.1.norm2.bias" in message
    assert "unexpected (1): blocks.0.attn.q_norm.weight" in message
    assert "wrong shape (1): norm.weight (33,) -> ln_post.weight needs (32,)" in message
    # one extra tensor alone is refused too (a fine-tuned file's classifier is not silently dropped)
    extra = msd.read_weights(VIT_DIR / "model.safetensors")
    extra["fc_norm.weight"] = torch.ones(32)
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"extra\.pth does not fit the model:\n  unexpected \(1\): fc_norm\.weight\n"):
        msd.load_vit_weights(vit_tower(), tmp_path / "extra.pth")
    # a config that is not the checkpoint's: every block listed, and what the file holds
    with pytest.raises(ValueError, match=r"(?s)wrong shape \(\d+\):.*vision_width 48, vision_layers 3.*"
                                         r"the file holds width 32, 2 blocks, patch 8"):
        msd.load_vit_weights(vit_tower(width=48, layers=3), VIT_DIR / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="config key 'vision_weights': file not found: " + re.escape(str(tmp_path / "x.pth"))):
        msd.load_vit_weights(vit_tower(), tmp_path / "x.pth")


# ---------------------------------------------------------------- the whole model


def pretrained_cfg(tmp_path, **kw):
    base = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2,
                text_arch="bert", text_weights=str(BERT_DIR), vision_weights=str(VIT_DIR / "model.safetensors"),
                embed_dim=16, max_len=24, dropout=0.0, queue_size=8, out_dir=str(tmp_path))
    base.update(kw)
    return msd.Config(**base)


def test_config_keys_are_checked(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="'text_arch': expected 'lite' or 'bert'"):
        msd.load_config(None, ["--text_arch=gpt"])
    with pytest.raises(ValueError, match="text_arch 'bert' needs config key 'text_weights'"):
        msd.load_config(None, ["--text_arch=bert"])
    with pytest.raises(ValueError, match="'text_weights'.*only read with text_arch 'bert'"):
        msd.load_config(None, ["--text_weights=somewhere"])
    cfg = msd.load_config(ROOT / "configs" / "mimic_pretrained.json")
    assert cfg.text_arch == "bert" and cfg.vision_weights.endswith(".safetensors")
    # its placeholder paths, where nothing was downloaded: the run names the key and the path
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="config key 'text_weights': folder not found: "
                                                "pretrained/Bio_ClinicalBERT"):
        msd.build_tokenizer(cfg, None)


def test_teacher_starts_as_the_loaded_student(tmp_path):
    cfg = pretrained_cfg(tmp_path)
    model = msd.build_model(cfg, 202)
    visual, text = vit_tower(), bert_tower()
    msd.load_vit_weights(visual, VIT_DIR / "model.safetensors")
    msd.load_bert_weights(text, BERT_DIR / "model.safetensors")
    for mine, loaded in ((model.student.visual, visual), (model.student.text, text)):
        for (name, p), q in zip(mine.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(p, q), name
    for p, q in zip(model.student.parameters(), model.teacher.parameters()):
        assert torch.equal(p, q)
    assert model.student.visual.ln_post.eps == msd.TIMM_VIT_LN_EPS
    assert model.student.text.ln_embed.eps == 1e-12  # from config.json


def test_training_with_pretrained_towers_and_rebuilding_from_the_checkpoint_alone(tmp_path):
    """msd.py with text_arch bert and both weight keys trains a few steps on SynthCXR and writes a
    checkpoint; load_checkpoint rebuilds the model after the weights files are gone."""
    weights = tmp_path / "weights"
    shutil.copytree(FIX, weights)
    msd.main(["--config", str(ROOT / "configs" / "tiny.json"), f"--out_dir={tmp_path / 'run'}",
              f"--synth_dir={tmp_path / 'synth'}", "--progress=false", "--max_steps=3",
              "--log_every=1", "--text_arch=bert", f"--text_weights={weights / 'bert'}",
              f"--vision_weights={weights / 'vit' / 'model.safetensors'}",])
    ckpt_path = tmp_path / "run" / "ckpt.pt"
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
           if '"loss"' in line]  # training records (held-out ones carry valid_loss)
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in log)
    raw = torch.load(ckpt_path, weights_only=True)
    assert raw["tokenizer"]["kind"] == "wordpiece" and raw["bert_config"]["hidden_size"] == 32
    model, tokenizer, cfg, _ = msd.load_checkpoint(ckpt_path)
    images = torch.randn(2, 1, cfg.image_size, cfg.image_size)
    ids, mask = tokenizer(["Small left pleural effusion.", "No acute cardiopulmonary process."])
    with torch.no_grad():
        before = model.student.encode_image(images), model.student.encode_text(ids, mask)
    assert model.student.text.token_embedding.weight.shape[0] == 202

    shutil.rmtree(weights)  # the run's weights files are gone; the checkpoint must suffice
    with pytest.raises(FileNotFoundError):
        msd.build_model(cfg, tokenizer.vocab_size)
    again, tokenizer2, _, _ = msd.load_checkpoint(ckpt_path)
    with torch.no_grad():
        after = again.student.encode_image(images), again.student.encode_text(*tokenizer2(
            ["Small left pleural effusion.", "No acute cardiopulmonary process."]))
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    # the training moved the towers away from the files' weights, and the teacher followed
    loaded = bert_tower(max_len=48)
    msd.load_bert_weights(loaded, BERT_DIR / "model.safetensors")
    assert not torch.equal(again.student.text.blocks[0].attn.qkv.weight, loaded.blocks[0].attn.qkv.weight)
    # resuming (and starting a new run from it with init_from) needs no weights files either
    common = ["--config", str(ROOT / "configs" / "tiny.json"), f"--synth_dir={tmp_path / 'synth'}",
              "--progress=false", "--log_every=1", "--text_arch=bert", f"--text_weights={weights / 'bert'}",
              f"--vision_weights={weights / 'vit' / 'model.safetensors'}"]
    msd.main(common + [f"--out_dir={tmp_path / 'run'}", "--max_steps=4", "--resume"])
    assert msd.read_checkpoint(ckpt_path)["step"] == 4
    msd.main(common + [f"--out_dir={tmp_path / 'warm'}", "--max_steps=1", f"--init_from={ckpt_path}"])
    assert msd.read_checkpoint(tmp_path / "warm" / "ckpt.pt")["bert_config"] == raw["bert_config"]


def test_fixtures_stay_small():
    total = sum(p.stat().st_size for p in FIX.rglob("*") if p.is_file())
    assert total < 1_000_000, total
