"""Checks that need a CUDA GPU, run by hand (`python tests/gpu_check.py`), not by the CPU suite.
docs/results.md ("Speed on one GPU") records what they printed. Each line is a number and a
verdict against a tolerance that bf16 arithmetic allows:

1. exactness under bf16 autocast + torch.compile (no dropout): MSD 4 x 8 against 1 x 32, and
   exact CLIP 4 x 8 against end-to-end CLIP on 32 pairs, by the relative L2 distance of the
   student's gradients;
2. exact CLIP's RNG replay under bf16 + compile, dropout 0.1: the step's gradient against ONE
   loss over the batch encoded, with gradient, micro-batch by micro-batch from the same seed
   (the CPU test's reference); the same reference from another seed shows what a mask mismatch
   costs;
3. no host reads: each step of MSD, exact CLIP (dropout 0.1) and naive CLIP, eager and
   compiled, under torch.cuda.set_sync_debug_mode("error") after two warm-up steps.

`--speed FILE.json` then times the paper-scale rows (configs/mimic.json: ViT-B/16 at 224 px, a
BERT-base-sized text tower, B = 256, K = 65,536, bf16) with evaluate.measure_step: the
efficiency table's rows eager, MSD and exact CLIP 8 x 32 compiled, and b = 128; it stops
starting rows after --budget seconds (default 200).
"""
import json
import time
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import msd  # noqa: E402
from test_msd import VOCAB, fake_batch, tiny_cfg  # noqa: E402

DRY_RUN = "--cpu-dry-run" in sys.argv  # the script's logic on the CPU (eager, float32), no GPU claims
DEVICE = torch.device("cpu" if DRY_RUN else "cuda")


def autocast():
    return torch.autocast("cpu", enabled=False) if DRY_RUN else torch.autocast("cuda", dtype=torch.bfloat16)


def cfg_of(**kw):
    base = dict(image_size=32, patch_size=8, vision_width=64, text_width=64, embed_dim=32,
                max_len=24, queue_size=64, compile="off" if DRY_RUN else "on", grad_clip=0.0)
    return tiny_cfg(**{**base, **kw})


def model_of(cfg, seed=0):
    torch.manual_seed(seed)
    model = msd.build_model(cfg, VOCAB).to(DEVICE).train()
    msd.compile_towers(model, cfg, DEVICE)
    return model


def cuda_batch(cfg, B, seed=0):
    images, ids, mask, pair_ids = fake_batch(B, cfg, seed=seed)
    return msd.Batch(images.to(DEVICE), ids.to(DEVICE), mask.to(DEVICE), pair_ids.to(DEVICE),
                     text_lengths=mask.sum(1).tolist())


def grads(model):
    return torch.cat([p.grad.float().flatten() for p in model.student.parameters() if p.grad is not None])


def rel(a, b):
    return float((a - b).norm() / b.norm())


def report(name, value, tol):
    print(f"{name:<62} {value:.2e}  {'ok' if value <= tol else 'FAILED'} (tolerance {tol:.0e})", flush=True)
    return value <= tol


def step(model, cfg, batch, seed=123):
    torch.manual_seed(seed)
    opt = msd.configure_optimizer(model, cfg)
    return msd.train_step(model, opt, batch, cfg, 0.0, cfg.alpha, autocast)  # lr 0: weights stay


def check_exactness():
    ok = True
    for name, small in (("MSD 4 x 8 vs 1 x 32", cfg_of(batch_size=8, accum_steps=4)),
                        ("exact CLIP 4 x 8 vs end-to-end CLIP 32",
                         cfg_of(method="clip", clip_accum="exact", batch_size=8, accum_steps=4))):
        big = replace(small, batch_size=32, accum_steps=1, clip_accum="naive")
        batch = cuda_batch(small, 32)
        a, b = model_of(small), model_of(big)
        step(a, small, batch), step(b, big, batch)
        ok &= report(f"1. bf16 + compile, {name}: gradient rel. L2", rel(grads(a), grads(b)), 3e-2)
    return ok


def check_replay():
    cfg = cfg_of(method="clip", clip_accum="exact", batch_size=8, accum_steps=4, dropout=0.1)
    batch = cuda_batch(cfg, 32)
    model = model_of(cfg)
    step(model, cfg, batch, seed=123)
    got, errors = grads(model), {}
    for seed in (123, 124):
        ref = model_of(cfg)  # the same initial weights (model_of seeds the initialisation)
        torch.manual_seed(seed)
        feats = []
        for j in range(4):
            rows = slice(8 * j, 8 * j + 8)
            with autocast():
                feats.append(ref.student(batch.images[rows], *msd.trim_padding(
                    batch.input_ids[rows], batch.attention_mask[rows], batch.text_lengths[rows],
                    ref.student.text.pad_multiple)))
        v = torch.cat([msd.to_fp32(x) for x, _ in feats])
        t = torch.cat([msd.to_fp32(x) for _, x in feats])
        msd.clip_loss(v, t, batch.pair_ids, ref.logit_scale).backward()
        errors[seed] = rel(got, grads(ref))
    ok = report("2. exact CLIP replay, dropout 0.1, bf16 + compile: rel. L2", errors[123], 3e-2)
    print(f"   the same reference from another seed (masks differ): {errors[124]:.2e}", flush=True)
    return ok and errors[124] > 10 * errors[123]


def check_no_host_reads():
    ok = True
    for name, kw in (("MSD", {}), ("exact CLIP, dropout 0.1", dict(method="clip", clip_accum="exact", dropout=0.1)),
                     ("naive CLIP", dict(method="clip"))):
        for compile_mode in ("off", "on"):
            cfg = cfg_of(batch_size=8, accum_steps=4, **kw)
            cfg = replace(cfg, compile="off" if DRY_RUN else compile_mode)
            model = model_of(cfg)
            opt = msd.configure_optimizer(model, cfg)
            for i in range(4):
                batch = cuda_batch(cfg, 32, seed=i)
                if not DRY_RUN:
                    torch.cuda.synchronize()
                if i >= 2 and not DRY_RUN:
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    msd.train_step(model, opt, batch, cfg, 1e-3, 0.4, autocast)
                    result = "ok"
                except RuntimeError as e:
                    result = f"FAILED: {str(e).splitlines()[0]}"
                finally:
                    if not DRY_RUN:
                        torch.cuda.set_sync_debug_mode("default")
                if result != "ok":
                    break
            print(f"3. no host read in train_step, {name}, compile {compile_mode}: {result}", flush=True)
            ok &= result == "ok"
    return ok


def speed(out_path, budget):
    import evaluate
    cfg = msd.load_config(Path(__file__).resolve().parent.parent / "configs" / "mimic.json",
                          [f"--device={DEVICE.type}", "--compile=off"])
    rows = evaluate.efficiency_configs(cfg, max_factor=0)            # the table's rows, eager
    rows += [(f"compiled: {name}", replace(c, compile="on")) for name, c in rows
             if name in ("MSD 8x32", "CLIP exact accumulation 8x32")]
    rows += [("MSD 2x128", replace(cfg, batch_size=128, accum_steps=2)),
             ("CLIP exact accumulation 2x128", replace(cfg, method="clip", clip_accum="exact",
                                                      batch_size=128, accum_steps=2))]
    res = {"machine": torch.cuda.get_device_name() if not DRY_RUN else "cpu", "torch": torch.__version__,
           "cuda": torch.version.cuda, "config": "configs/mimic.json", "steps_timed": 5,
           "matmul_tflops": evaluate.matmul_tflops(DEVICE), "rows": [], "skipped": []}
    start = time.perf_counter()
    for name, c in rows:
        if time.perf_counter() - start > budget:
            res["skipped"].append(name)
            continue
        r = {"name": name, **evaluate.measure_step(c, 5)}
        res["rows"].append(r)
        print(f"{name:<40} B={r['effective_batch']:<4} {r['pairs_per_s']:>8.0f} pairs/s  "
              f"peak {r['peak_memory_mb'] / 1024:6.1f} GiB", flush=True)
        Path(out_path).write_text(json.dumps(res, indent=1))
    print("skipped (time budget):", res["skipped"])


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {'CPU dry run' if DRY_RUN else torch.cuda.get_device_name()}", flush=True)
    if "--speed" in sys.argv:
        budget = float(sys.argv[sys.argv.index("--budget") + 1]) if "--budget" in sys.argv else 200
        speed(sys.argv[sys.argv.index("--speed") + 1], budget)
        sys.exit(0)
    results = [check_exactness(), check_replay(), check_no_host_reads()]
    print("gpu checks:", "all passed" if all(results) else "SOME FAILED")
    sys.exit(0 if all(results) else 1)
