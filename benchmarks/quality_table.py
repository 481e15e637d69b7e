"""Tables (and an L0-FVU plot) from `quality_sweep.py` lines and `quality_sparsify.py` results: the tables
of `docs/training.md`.

    python benchmarks/quality_table.py --sweep frontier.jsonl --sparsify sp-k16.json sp-k32.json \\
        --plot docs/img/l0_fvu_frontier.png

Each sweep line becomes one row (`plain` in its `--run` text marks a plain transcoder, otherwise Matryoshka);
each sparsify JSON one row. With `--plot`, held-out FVU is drawn against held-out L0, one line per trainer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def sweep_rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        run = json.loads(line)
        rows.append({"trainer": "mtc plain" if "plain" in run["run"].split() else "mtc Matryoshka",
                     "d_sae": run["d_sae"], "k": run["k"], "tokens": run["train_tokens"], "fvu": run["fvu"],
                     "first": None if "plain" in run["run"].split() else run["fvu_first"],
                     "first_latents": run["first_latents"], "l0": run["l0"], "dead_eval": run["dead_pct_eval"],
                     "dead_100k": run["dead_pct_train_100k"], "seconds": run["seconds"], "run": run["run"]})
    return rows


def sparsify_row(path: Path) -> dict:
    result = json.loads(path.read_text())
    settings = result["settings"]
    first = settings["first_latents"]
    return {"trainer": f"sparsify ({settings['normalize']})", "d_sae": settings["d_sae"], "k": settings["k"],
            "tokens": settings["train_tokens"], "fvu": result["fvu"], "first": result[f"fvu_first_{first}"],
            "first_latents": first, "l0": result["l0"], "dead_eval": result["dead_pct_eval"],
            "dead_100k": result["dead_pct_train"], "seconds": result["train_seconds"], "run": path.name}


def markdown(rows: list[dict]) -> str:
    lines = ["| trainer | latents | k | tokens | FVU | first group | L0 | dead (eval) | dead (100k) | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        first = "" if r["first"] is None else f"{r['first']:.4f} ({r['first_latents']})"
        lines.append(f"| {r['trainer']} | {r['d_sae']:,} | {r['k']} | {r['tokens']:,} | {r['fvu']:.4f} | {first} | "
                     f"{r['l0']:.1f} | {r['dead_eval']:.1f}% | {r['dead_100k']:.1f}% | {r['seconds']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for trainer in dict.fromkeys(r["trainer"] for r in rows):
        points = sorted((r["l0"], r["fvu"]) for r in rows if r["trainer"] == trainer)
        ax.plot(*zip(*points), marker="o", label=trainer)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("held-out L0")
    ax.set_ylabel("held-out FVU")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", nargs="*", default=[], type=Path, help="quality_sweep.py --jsonl files")
    parser.add_argument("--sparsify", nargs="*", default=[], type=Path, help="quality_sparsify.py --json files")
    parser.add_argument("--plot", type=Path, help="write the L0-FVU plot here (.png)")
    args = parser.parse_args()
    rows = [row for path in args.sweep for row in sweep_rows(path)] + [sparsify_row(p) for p in args.sparsify]
    rows.sort(key=lambda r: (r["trainer"], r["tokens"], r["d_sae"], r["k"]))  # stable: a sweep's order within
    if not rows:
        raise SystemExit("give --sweep and/or --sparsify files")
    print(markdown(rows))
    if args.plot:
        plot(rows, args.plot)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
