"""The CPU's matrix-product rate for the image tower's linears, fp32 and bf16, in torch on every core.

    python bench/linear_rate.py [--threads N] [--reps 10]

ViT-B/32 at batch 64 multiplies 3200 tokens by its 768 x 2304 (q, k, v), 768 x 3072 and 3072 x 768 (MLP) and
768 x 768 (attention output) weights. This prints each product's GFLOP/s per core: the ceiling a tower built from
them can reach, against which the image towers of bench/photo_stages.py are read (docs/performance.md, "Photos:
where the core seconds go").
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own, every core)")
    p.add_argument("--reps", type=int, default=10, help="timed products per shape (after 3 untimed)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cores = torch.get_num_threads()
    print(f"| dtype | tokens x in -> out | ms | GFLOP/s per core ({cores} threads) |")
    print("|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for m, k, n in ((3200, 768, 2304), (3200, 768, 3072), (3200, 3072, 768), (3200, 768, 768)):
            x, w, b = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype), torch.randn(n).to(dtype)
            with torch.inference_mode():
                for _ in range(3):
                    torch.nn.functional.linear(x, w, b)
                t = time.perf_counter()
                for _ in range(args.reps):
                    torch.nn.functional.linear(x, w, b)
                seconds = (time.perf_counter() - t) / args.reps
            rate = 2 * m * k * n / seconds / 1e9 / cores
            print(f"| {str(dtype).removeprefix('torch.')} | {m} x {k} -> {n} | {seconds * 1e3:.1f} | {rate:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
