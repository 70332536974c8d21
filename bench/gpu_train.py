"""One bfloat16 training step of GPT-2 small and Mixer-B/16: dense against Pixelfly; run it through bench/gpu_train.sh.

The talk accompanying the Pixelfly paper (Dao, Chen et al., ICLR 2022, arXiv 2112.00029) reports
end-to-end training speed-ups over dense of 2.3x (Mixer-B/16), 2.0x (ViT-B/16) and 2.1x (GPT-2
small). This script times what our toolkit gives for two of those models, built from
:mod:`pixelfly_lab.training.models` at their real shapes, their MLP matmuls sparsified by
:func:`pixelfly_lab.training.models.sparsify_model` (the layers the paper sparsifies; budget 0.25 of each
matmul, this toolkit's stand-in for the paper's per-model budgets (README, Notes), block 64 so the Triton kernels
run on tensor cores):

* GPT-2 small: 12 blocks, width 768, 12 heads, 1024 positions, vocabulary 50257, batch 8;
* Mixer-B/16: 12 blocks, width 768, 196 patches of 16x16x3 (224x224 images), token MLP 384,
  channel MLP 3072, 1000 classes, batch 64.

A step = forward under torch.autocast(bfloat16) (float32 parameters, as mixed-precision training
runs), cross-entropy, backward, AdamW, timed by the toolkit's one step timer
(:func:`pixelfly_lab.speed.timer.time_training_steps`): its median over 10 rounds after 5 warm-up
steps (which autotune the Triton kernels), dense and Pixelfly interleaved, eager (no CUDA graphs:
the optimiser's state and autocast's cast cache make a captured step a different program).
Everything runs under one deadline (--deadline seconds from the interpreter's start); a model
the deadline reaches is reported as trimmed. Output: a summary on stdout, gpu_train.csv and
gpu_train.log under --out. Exit 0 when every step ran with a finite loss.

--smoke: the same on the CPU with toy widths and depth 1 (seconds; timings mean nothing).
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from gpu_common import Report, cuda_torch  # noqa: E402  (bench/ is the script's directory)

TALK = {"gpt2-small": 2.1, "mixer-b16": 2.3}   # the talk's end-to-end training speed-ups (ViT-B/16: 2.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, toy sizes")
    p.add_argument("--deadline", type=float, default=240.0, help="seconds from start after which nothing new starts")
    p.add_argument("--out", default=os.environ.get("OUT") or "results", help="directory of the CSV and log")
    p.add_argument("--budget", type=float, default=0.25, help="fraction of each sparsified matmul kept")
    p.add_argument("--block", type=int, default=64, help="Pixelfly block size (64: tensor-core tiles)")
    return p.parse_args(argv)


def left(args) -> float:
    return args.deadline - (time.perf_counter() - START)


def build(name: str, pattern: str, smoke: bool, budget: float, block: int, device: str):
    """(model, example inputs, targets) for one model family at its real (or smoke) shape."""
    import torch
    from pixelfly_lab.training.models import Mixer, Transformer, sparsify_model

    torch.manual_seed(0)
    if name == "gpt2-small":
        dim, depth, heads, seq, vocab, batch = (64, 1, 2, 32, 97, 2) if smoke else (768, 12, 12, 1024, 50257, 8)
        model = Transformer(seq, dim, depth, heads, vocab, causal=True, vocab_size=vocab, per_token=True)
        family = "gpt"
        x = torch.randint(0, vocab, (batch, seq))
        y = torch.randint(0, vocab, (batch, seq))
    else:
        dim, depth, image, patch, classes, batch = (64, 1, 32, 8, 10, 2) if smoke else (768, 12, 224, 16, 1000, 64)
        model = Mixer((3, image, image), patch, dim, depth, classes, token_hidden=dim // 2)
        family = "mixer"
        x = torch.randn(batch, 3, image, image)
        y = torch.randint(0, classes, (batch,))
    if pattern == "pixelfly":
        sparsify_model(model, family, pattern="pixelfly", budget=budget, block_size=16 if smoke else block)
    return model.to(device), x.to(device), y.to(device)


def final_loss(model, x, y, device: str) -> float:
    """The loss of one more forward (bf16 autocast), to check that training kept it finite."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        out = model(x)
        return float(F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1)))


def main(argv=None) -> int:
    args = parse_args(argv)
    torch = cuda_torch("gpu_train", args.smoke)
    if torch is None:
        return 2
    import pandas as pd
    from pixelfly_lab.speed.timer import time_training_steps

    out = Path(args.out)
    device = "cpu" if args.smoke else "cuda"
    env = [f"torch {torch.__version__}"] + ([torch.cuda.get_device_name()] if device == "cuda" else ["CPU smoke"])
    report = Report(out, "gpu_train")
    say = report.say
    say(f"gpu_train: {', '.join(env)}; budget {args.budget}, block {args.block}; imports took "
        f"{time.perf_counter() - START:.0f} s")
    if device == "cuda":  # the MLP kernels of both models (768 <-> 3072, bf16), compiled in parallel first
        import gpu_bench

        major, minor = torch.cuda.get_device_capability()
        jobs = gpu_bench.kernel_jobs([(768, 3072, 8192, args.block, args.budget),
                                      (3072, 768, 8192, args.block, args.budget)], [], "bfloat16")
        try:
            gpu_bench.precompile(jobs, 10 * major + minor, max(1, min(8, (os.cpu_count() or 2) // 2)), report,
                                 timeout=max(5.0, min(90.0, left(args) - 150)))
        except Exception as err:   # compiling on first use instead costs time, not results
            say(f"precompile failed ({type(err).__name__}: {err}"[:200] + "); compiling on first use")
    rows, trimmed, failures = [], [], []
    for name in ("gpt2-small", "mixer-b16"):
        if left(args) < (5 if args.smoke else 60):
            trimmed.append(name)
            continue
        try:
            built = {p: build(name, p, args.smoke, args.budget, args.block, device) for p in ("dense", "pixelfly")}
            _, x, y = built["dense"]        # build() seeds alike: the same batch for both
            table = time_training_steps({p: built[p][0] for p in built}, x, y, steps=1,
                                        warmup=1 if args.smoke else 5, rounds=2 if args.smoke else 10,
                                        threads=None, autocast=torch.bfloat16)
            dense_ms, pf_ms = table["step_ms"]
            losses = [final_loss(built[p][0], x, y, device) for p in built]
        except Exception as err:   # one model failing must not lose the other
            failures.append(f"{name}: {type(err).__name__}: {err}"[:300])
            say(f"{name}: FAILED {failures[-1]}")
            continue
        params = [sum(p.numel() for p in built[p][0].parameters()) for p in ("dense", "pixelfly")]
        row = dict(model=name, dense_ms=dense_ms, pixelfly_ms=pf_ms, speedup=dense_ms / pf_ms, talk=TALK[name],
                   dense_params=params[0], pixelfly_params=params[1], loss_dense=losses[0], loss_pixelfly=losses[1])
        if not all(math.isfinite(v) for v in losses):
            failures.append(f"{name}: loss not finite {losses}")
        rows.append(row)
        say(f"{name:11s} step: dense {dense_ms:8.1f} ms, pixelfly {pf_ms:8.1f} ms, speed-up x{row['speedup']:.2f} "
            f"(talk x{TALK[name]}); params {params[0] / 1e6:.1f}M -> {params[1] / 1e6:.1f}M; "
            f"losses {losses[0]:.3f} / {losses[1]:.3f}" + (" (smoke: meaningless)" if args.smoke else ""))
        pd.DataFrame(rows).to_csv(out / "gpu_train.csv", index=False)
        del built, table
        if device == "cuda":
            torch.cuda.empty_cache()
    if trimmed:
        say(f"trimmed by the deadline: {', '.join(trimmed)}")
    say("FAILED: " + "; ".join(failures) if failures else "all steps ran with finite losses")
    say(f"csv {out / 'gpu_train.csv'}, log {out / 'gpu_train.log'}, total {time.perf_counter() - START:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
