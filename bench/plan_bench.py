"""The budget chooser on GPT-2-small- and Mixer-B/16-shaped models: predicted against measured step speed-up.

    OMP_NUM_THREADS=1 .venv/bin/python bench/plan_bench.py [--depth 2] [--speedup 1.5] [--out results/plan]

For each model (training/models.py at the shapes of the Pixelfly paper's Mixer-B/16 and GPT-2
small, Dao, Chen et al., ICLR 2022, arXiv 2112.00029; ``--depth`` blocks instead of 12 to keep
the CPU run to minutes), :func:`pixelfly_lab.plan_model` plans every linear layer for the target
step speed-up from this machine's layer times, then sparsifies a copy and times both models'
training steps (:func:`pixelfly_lab.time_training_steps`, one thread, interleaved medians).
Prints one line per model (predicted, measured, their ratio, the load average) and writes
plan_<model>.csv. The machine's load moves both numbers; rerun to see the spread.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import pixelfly_lab as pl
from pixelfly_lab.speed.machine import load_average
from pixelfly_lab.speed.model_speed import MODEL_CASES, dense_model


def models(depth: int):
    """(name, model, batch, target): :data:`MODEL_CASES`' Mixer-B/16 (batch 8 images) and GPT-2 small
    (batch 4 x 256 tokens) shapes, ``depth`` blocks, dense (the planner sparsifies them)."""
    for case in MODEL_CASES:
        name = case.name.lower().replace("gpt-2", "gpt2").replace("/", "").replace(" ", "-")   # mixer-b16, gpt2-small
        yield (name, *dense_model(replace(case, depth=depth)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=2, help="blocks per model (12 at full size)")
    parser.add_argument("--speedup", type=float, default=1.5, help="target training-step speed-up")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--out", default="results/plan", help="folder of the plan CSVs")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, model, batch, target in models(args.depth):
        plan = pl.plan_model(model, batch, speedup=args.speedup, target=target, budgets=(0.1, 0.15, 0.25, 0.35, 0.5),
                             block_sizes=(32, 16), rounds=args.rounds, progress=False)
        plan.drop(columns=["shape"]).to_csv(out / f"plan_{name}.csv", index=False)
        a = plan.attrs
        sparse = plan[plan["pattern"] == "pixelfly"]
        print(f"{name} depth {args.depth}: target x{args.speedup}, predicted x{a['predicted_speedup']:.2f}, "
              f"measured x{a['measured_speedup']:.2f} (measured/predicted {a['measured_ratio_of_predicted']:.2f}); "
              f"{len(sparse)}/{len(plan)} layers sparse, budget {a['budget']:.3f}; dense step {a['dense_step_ms']:.0f} ms; "
              f"load {load_average()[0]:.1f}; threads {a['threads']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
