"""Time one training step (forward + backward + optimiser) of a Matryoshka transcoder against a
plain BatchTopK transcoder of the same size, on synthetic activations.

    python benchmarks/bench_transcoder_step.py                 # the issue's size, CPU float32
    python benchmarks/bench_transcoder_step.py --d-sae 4096 --batch 256 --steps 3   # quick
"""

from __future__ import annotations

import argparse
import time

import torch

from mtc import MatryoshkaTranscoder, TranscoderConfig
from mtc.train import make_optimizer, train_step


class StepTimer:
    """One model with its optimiser; `step()` runs and times one full training step."""

    def __init__(self, cfg: TranscoderConfig, device: str):
        self.model = MatryoshkaTranscoder(cfg, device=device)
        self.optimiser = make_optimizer(self.model, cfg)
        self.times: list[float] = []

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        start = time.perf_counter()
        train_step(self.model, self.optimiser, x, y, lr=self.model.cfg.lr)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - start)

    def median_ms(self, skip: int) -> float:
        kept = sorted(self.times[skip:])
        return 1000 * kept[len(kept) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=2304)
    parser.add_argument("--d-sae", type=int, default=18432)
    parser.add_argument("--k", type=int, default=96)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--prefixes", type=int, default=5, help="number of nested prefixes (doubling sizes)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kernels", default="sparse", choices=["sparse", "dense"],
                        help="training maths of both transcoders (dense is the autograd reference)")
    args = parser.parse_args()

    torch.manual_seed(0)
    sizes = [args.d_sae // 2 ** (args.prefixes - 1 - g) for g in range(args.prefixes)]
    common = dict(d_in=args.d_in, d_out=args.d_in, d_sae=args.d_sae, k=args.k, batch_size=args.batch,
                  total_tokens=args.batch * 10, warmup_steps=0, kernels=args.kernels)
    x = torch.randn(args.batch, args.d_in, device=args.device)
    y = torch.randn(args.batch, args.d_in, device=args.device)

    # Alternate the two models step by step so both see the same machine state.
    plain = StepTimer(TranscoderConfig(**common), args.device)
    matryoshka = StepTimer(TranscoderConfig(**common, prefix_sizes=sizes), args.device)
    for _ in range(args.warmup + args.steps):
        plain.step(x, y)
        matryoshka.step(x, y)
    plain_ms, matryoshka_ms = plain.median_ms(args.warmup), matryoshka.median_ms(args.warmup)
    print(f"device={args.device} threads={torch.get_num_threads()} d_in=d_out={args.d_in} d_sae={args.d_sae} "
          f"k={args.k} batch={args.batch} float32 kernels={args.kernels}")
    print(f"plain BatchTopK step  : {plain_ms:8.1f} ms")
    print(f"Matryoshka step ({args.prefixes} prefixes {sizes}): {matryoshka_ms:8.1f} ms")
    print(f"ratio Matryoshka / plain: {matryoshka_ms / plain_ms:.3f}  (target <= 1.25)")


if __name__ == "__main__":
    main()
