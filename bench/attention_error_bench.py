"""PixelflyAttention's error against dense softmax attention at equal budget, per length and kind of q, k.

Variants: the default layer (connected flat butterfly, no random features), the same budget with 16 random
features, and the paper's layout (layout='pixelfly'); every variant gets the connected layout's floor at that
length plus the 16 features' cost (2 * 16 / T), so all three spend one budget. Queries and keys: 'random' and
'local' (pixelfly_lab.approx.targets.attention_inputs, two heads of 32, scores ~ N(0, 1) at t = 1) at every
length, and a trained character GPT's (pixelfly_lab.studies.estimators.trained_queries_keys, causal) at the
shortest. Error: relative Frobenius over heads and rows (PixelflyAttention.error_against_dense), float64.
Run: OMP_NUM_THREADS=1 python bench/attention_error_bench.py [--lengths 1024 2048 4096 8192] [--trained-steps 60]
(about 2 minutes at these lengths on one core; T = 8192 needs ~1 GB for the dense reference).
"""

import argparse

import pandas as pd
import torch

from pixelfly_lab.approx.targets import attention_inputs
from pixelfly_lab.nn.attention import PixelflyAttention
from pixelfly_lab.studies.estimators import layer_error_table, trained_queries_keys

VARIANTS = {"default (connected, no features)": {}, "16 features, same budget": {"lowrank_features": 16},
            "paper layout (pixelfly)": {"layout": "pixelfly"}}


def error_table(lengths, *, trained_steps: int = 60, block_size: int = 32) -> pd.DataFrame:
    """One row per (T, kind, variant): error, density and features (see the module docstring)."""
    tables = []
    for i, T in enumerate(lengths):
        kinds = {}
        for kind, locality in (("random", 0.0), ("local", 2.0)):
            pairs = [attention_inputs(T, 32, head, locality) for head in range(2)]
            q, k = (torch.stack(part)[None] for part in zip(*pairs))
            kinds[kind] = (q * 32 ** 0.5, k, False)
        if i == 0 and trained_steps:
            kinds["trained"] = (*trained_queries_keys(T, steps=trained_steps, seed=0), True)
        budget = PixelflyAttention(64, 2, T, block_size=block_size).density + 2 * 16 / T
        table = layer_error_table(kinds, VARIANTS, budget=budget, block_size=block_size)
        table["T"] = T
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--trained-steps", type=int, default=60, help="0: no trained GPT")
    args = parser.parse_args()
    torch.set_num_threads(1)
    table = error_table(args.lengths, trained_steps=args.trained_steps)
    print(table.pivot_table(index=["T", "kind"], columns="variant", values="error")[list(VARIANTS)].round(3).to_string())
    print(table.groupby(["T", "variant"])[["density", "features"]].first().to_string())


if __name__ == "__main__":
    main()
