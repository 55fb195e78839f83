"""Data parallelism (torchrun, DDP) on the CPU with gloo: W processes x N micro-batches x b pairs
equal one process with W * N micro-batches of b, because every key is a stop-gradient teacher
feature of the whole (all-gathered) global batch; and for exact CLIP accumulation, because every
process contrasts its rows with the cached features of the whole global batch."""
import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import msd
from test_msd import VOCAB, assert_models_close, fake_batch, tiny_cfg

ROOT = Path(__file__).resolve().parent.parent


def state_after_each_step(model):
    """What must agree: weights, gradients, teacher, queue contents and pointers (float64 copies)."""
    out = {f"param:{k}": v.detach().clone() for k, v in model.named_parameters()}
    out.update({f"grad:{k}": v.grad.clone() for k, v in model.named_parameters() if v.grad is not None})
    out.update({f"buffer:{k}": v.clone() for k, v in model.named_buffers()})
    return out


def batches(cfg, steps, B):
    return [fake_batch(B, cfg, seed=step) for step in range(steps)]


def _worker(rank, world_size, init_file, cfg_dict, steps, B, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    try:
        cfg = msd.Config(**cfg_dict)
        model = msd.build_model(cfg, VOCAB).double().train()
        optimizer = msd.configure_optimizer(model, cfg)
        dist = msd.Dist(rank, world_size, torch.device("cpu"),
                        torch.nn.parallel.DistributedDataParallel(model.student))
        share = slice(rank * B // world_size, (rank + 1) * B // world_size)  # as msd.pretrain slices
        states = []
        for images, ids, mask, pair_ids in batches(cfg, steps, B):
            batch = msd.Batch(images[share].double(), ids[share], mask[share], pair_ids[share])
            msd.train_step(model, optimizer, batch, cfg, 1e-3, 0.4, dist=dist)
            states.append(state_after_each_step(model))
        torch.save(states, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def run_ddp(cfg, world_size, steps, B, tmp_path):
    mp.spawn(_worker, args=(world_size, str(tmp_path / "init"), asdict(cfg), steps, B, str(tmp_path)),
             nprocs=world_size, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world_size)]


def run_single(cfg, steps, B):
    model = msd.build_model(cfg, VOCAB).double().train()
    optimizer = msd.configure_optimizer(model, cfg)
    states = []
    for images, ids, mask, pair_ids in batches(cfg, steps, B):
        msd.train_step(model, optimizer, msd.Batch(images.double(), ids, mask, pair_ids), cfg, 1e-3, 0.4)
        states.append(state_after_each_step(model))
    return states


def assert_states_close(a, b, tol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=tol, rtol=tol, msg=f"differs: {key}")
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


def test_two_processes_equal_one_process_with_twice_the_micro_batches(tmp_path):
    """W = 2, N = 2, b = 4 against W = 1, N = 4, b = 4, two optimizer steps (the second one reads
    a queue filled by the first): gradients, student, teacher, queue contents and pointer agree
    to 1e-10 in float64, and both processes hold the same state."""
    ddp_cfg = tiny_cfg(batch_size=4, accum_steps=2, queue_size=24)
    single = run_single(replace(ddp_cfg, accum_steps=4), steps=2, B=16)
    ranks = run_ddp(ddp_cfg, world_size=2, steps=2, B=16, tmp_path=tmp_path)
    worst = max(assert_states_close(ranks[r][step], single[step], tol=1e-10)
                for step in range(2) for r in range(2))
    print(f"W=2 x N=2 against N=4: largest difference {worst:.1e} (float64)")  # seen with -s
    assert ranks[0][1]["buffer:image_queue.ptr"].item() == 32 % 24
    assert torch.equal(ranks[0][1]["buffer:text_queue.ids"], ranks[1][1]["buffer:text_queue.ids"])


def test_clip_under_ddp_contrasts_the_global_batch(tmp_path):
    """End-to-end CLIP with W = 2 contrasts each process's rows with the all-gathered rows of
    every process, as open_clip does by default (gather_features): 2 processes x b = 4 equal one
    process with b = 8, in gradients, weights and tau, two steps; not W separate small batches."""
    ddp_cfg = tiny_cfg(method="clip", batch_size=4, accum_steps=1)
    ranks = run_ddp(ddp_cfg, world_size=2, steps=2, B=8, tmp_path=tmp_path)
    global_batch = run_single(replace(ddp_cfg, batch_size=8), steps=2, B=8)
    per_process = run_single(replace(ddp_cfg, accum_steps=2), steps=2, B=8)
    worst = max(assert_states_close(ranks[r][step], global_batch[step], tol=1e-10)
                for step in range(2) for r in range(2))
    print(f"end-to-end CLIP, W=2 x b=4 against b=8: largest difference {worst:.1e} (float64)")
    with pytest.raises(AssertionError):
        assert_states_close(ranks[0][0], per_process[0], tol=1e-6)


def test_exact_clip_on_two_processes_equals_one_batch_of_the_global_batch(tmp_path):
    """clip_accum "exact" with W = 2: every process contrasts its re-encoded rows with the
    cached features of the GLOBAL batch, so W = 2 x N = 2 x b = 4 equals one process with
    N = 4 (and so end-to-end CLIP on all 16 pairs): gradients, weights and tau, two steps."""
    ddp_cfg = tiny_cfg(method="clip", clip_accum="exact", batch_size=4, accum_steps=2)
    single = run_single(replace(ddp_cfg, accum_steps=4), steps=2, B=16)
    ranks = run_ddp(ddp_cfg, world_size=2, steps=2, B=16, tmp_path=tmp_path)
    worst = max(assert_states_close(ranks[r][step], single[step], tol=1e-10)
                for step in range(2) for r in range(2))
    print(f"exact CLIP, W=2 x N=2 against N=4: largest difference {worst:.1e} (float64)")


@pytest.mark.slow
def test_torchrun_trains_tiny_on_two_cpu_processes(tmp_path):
    """The command of the README: torchrun on the CPU (gloo) writes a checkpoint that
    evaluate.py reads; resuming it with another number of processes is refused."""
    out, synth = tmp_path / "run", tmp_path / "synth"
    common = ["--config", str(ROOT / "configs" / "tiny.json"), f"--out_dir={out}",
              f"--synth_dir={synth}", "--progress=false", "--max_steps=4", "--log_every=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--standalone", str(ROOT / "msd.py"), *common],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "effective batch B = 2 processes x 2 x 8 = 32 pairs" in proc.stdout
    model, tokenizer, cfg, ckpt = msd.load_checkpoint(out / "ckpt.pt")
    assert ckpt["step"] == 4 and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert [json.loads(r)["step"] for r in (out / "log.jsonl").read_text().splitlines()
            if '"loss"' in r] == [2, 4]
    with pytest.raises(msd.CheckpointError, match="written by 2 process"):
        msd.pretrain(msd.load_config(common[1], common[2:] + ["--max_steps=6"]), resume=True)


@pytest.mark.slow
def test_torchrun_processes_started_differently_stop_before_step_1(tmp_path):
    """One process asks for MSD, the other for CLIP (a launcher that passes each rank its own
    arguments): every process stops before step 1, and rank 0 alone prints one line naming the
    key and each rank's value."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import msd\n"
        "method = 'msd' if os.environ['RANK'] == '0' else 'clip'\n"
        "msd.main(sys.argv[1:] + [f'--method={method}'])\n")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--standalone", str(launcher), "--config", str(ROOT / "configs" / "tiny.json"),
                           f"--out_dir={out}", f"--synth_dir={tmp_path / 'synth'}", "--progress=false",
                           "--max_steps=2"], capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("msd.py: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "different config (method: rank 0 'msd', rank 1 'clip')" in errors[0]
    assert not (out / "log.jsonl").exists() and not (out / "ckpt.pt").exists()
