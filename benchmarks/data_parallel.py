"""Data-parallel training on this machine: 1 process against 2 (`torchrun`, gloo), and BatchTopK over the
whole batch (what mtc does) against BatchTopK within each rank's share. Prints tokens/s, final FVU, L0 and
dead share of each, and the largest weight difference between 1 and 2 processes.

    python benchmarks/data_parallel.py [--steps 100] [-- any `python -m mtc train` flags]

Runs the demo preset (offline Gemma-3-270M, layer 6) in a temporary folder. With `--per-rank-topk` as
the first argument this file is instead a torchrun worker that trains with BatchTopK per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def per_rank_worker(argv: list[str]) -> int:
    """`python -m mtc train` with BatchTopK inside each rank's share (k * its own rows) instead of over the
    whole batch."""
    from mtc.cli import main
    from mtc.kernels import batch_topk_indices
    from mtc.parallel import ProcessGroupReduction

    ProcessGroupReduction.batch_topk = lambda self, pre_acts, k: batch_topk_indices(pre_acts, k)
    return main(argv)


def run(command: list[str], threads: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return result.stdout


def summary(run_dir: Path) -> dict:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last, seconds, previous = lines[-1], 0.0, 0
    for m in lines:  # every interval, fills (the language model) included
        seconds += (m["tokens"] - previous) / m["tokens_per_s"]
        previous = m["tokens"]
    return {"tokens_per_s": last["tokens"] / seconds, "fvu": last["fvu"],
            "fvu_prefix_1": last["fvu/prefix_1"], "l0": last["l0"], "dead_pct": last["dead_pct"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="mtc-dp-") as work:
        base = ["train", "--preset", "demo", "--total-tokens", str(512 * args.steps), "--log-every", "10",
                "--buffer-tokens", "16384",  # several fills, so the language model's share of the time shows
                "--checkpoint-every", str(args.steps), "--drive-dir", "none", "--wandb-mode", "disabled",
                "--samples-every", "0", "--no-progress", "--output-dir", work, *extra]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        runs = {
            f"1 process, {cores} threads": ([sys.executable, "-m", "mtc", *base, "--run-name", "one"], cores, "one"),
            f"2 processes, {max(1, cores // 2)} thread(s) each": (
                [*torchrun, "-m", "mtc", *base, "--run-name", "two"], max(1, cores // 2), "two"),
            "2 processes, BatchTopK per rank": (
                [*torchrun, __file__, "--per-rank-topk", *base, "--run-name", "per-rank"], max(1, cores // 2),
                "per-rank"),
        }
        results = {}
        for name, (command, threads, folder) in runs.items():
            run(command, threads)
            results[name] = summary(Path(work) / folder)
        from mtc.checkpoint import load

        one, two = (load(Path(work) / name / "final").state_dict() for name in ("one", "two"))
        difference = max(float((one[k] - two[k]).abs().max() / one[k].abs().max().clamp_min(1e-12)) for k in one)
    print(f"| run ({args.steps} steps of 512 tokens, demo preset, 16,384-token fills) | tokens/s, whole run | FVU | "
          f"FVU prefix 1 | L0 | dead % |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['fvu']:.4f} | {r['fvu_prefix_1']:.4f} | {r['l0']:.1f} | "
              f"{r['dead_pct']:.1f} |")
    print(f"\nlargest weight difference, 1 vs 2 processes (relative to each tensor's largest entry): {difference:.1e}")
    print(f"torch {torch.__version__}, {cores} CPU cores")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--per-rank-topk":
        sys.exit(per_rank_worker(sys.argv[2:]))
    sys.exit(main())
