"""The CPU kernels an ensemble of int8 [1024, 1024] layers could run on, at batch 1 (Q-gating's shape).

    python bench/int8_kernels.py [--members 10]

Per kernel: microseconds for one member's product when the same member is repeated (its weights stay in the core's
L2) and when the ensemble's members are cycled (their weights stream from beyond L2, as in the critic ensemble), and
the product's error relative to float32. Kernels: torch's weight-only int8 (`_weight_int8pack_mm`, what
robot_rl.compact uses), fbgemm's dynamic int8 linear (activations quantised to 8 bits per call) and torch's int4
weight kernel (group size 64). One torch thread. The last line is the headline.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import bench_main
import torch

SIZE = 1024
GROUP = 64


def per_call_us(fns: list[Callable[[], object]], repeats: int) -> float:
    for fn in fns * 3:
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        for fn in fns:
            fn()
    return (time.perf_counter() - start) / (repeats * len(fns)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=bench_main.positive_int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.relu(torch.randn(1, SIZE))
    weights = [torch.randn(SIZE, SIZE) * 0.03 for _ in range(args.members)]
    ref = x @ weights[0].t()
    kernels: dict[str, list[Callable[[], torch.Tensor]]] = {}

    scales = [w.abs().amax(1) / 127 for w in weights]
    q8 = [torch.round(w / s[:, None]).to(torch.int8) for w, s in zip(weights, scales, strict=True)]
    xb = x.bfloat16()
    kernels["weight-only int8"] = [
        (lambda q=q, s=s: torch._weight_int8pack_mm(xb, q, s.bfloat16())) for q, s in zip(q8, scales, strict=True)
    ]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated; they only carry the weights in here
        packed = [
            torch.ops.quantized.linear_prepack(
                torch._make_per_channel_quantized_tensor(q, s.double(), torch.zeros(SIZE, dtype=torch.long), 0), None
            )
            for q, s in zip(q8, scales, strict=True)
        ]
    kernels["fbgemm dynamic int8"] = [(lambda p=p: torch.ops.quantized.linear_dynamic(x, p, False)) for p in packed]

    int4 = []
    for w in weights:
        groups = w.reshape(SIZE, SIZE // GROUP, GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp_min(1e-8)
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(SIZE, SIZE)
        zero = low + 8 * scale  # the kernel reads (q - 8) * scale + zero
        scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).bfloat16().contiguous()  # [K / group, N, 2]
        int4.append((torch._convert_weight_to_int4pack_for_cpu(q, 1), scales_zeros))
    kernels[f"int4 weights, group {GROUP}"] = [
        (lambda p=p, sz=sz: torch._weight_int4pack_mm_for_cpu(xb, p, GROUP, sz)) for p, sz in int4
    ]

    print(f"{args.members} members of [{SIZE}, {SIZE}], batch 1, torch threads {torch.get_num_threads()}")
    print(f"{'kernel':<24}{'same member us':>16}{'members cycled us':>19}{'rel. error':>12}")
    cycled = {}
    for name, fns in kernels.items():
        hot = per_call_us(fns[:1], 3000)
        cycled[name] = per_call_us(fns, 300)
        err = float((fns[0]().float() - ref).norm() / ref.norm())
        print(f"{name:<24}{hot:>16.1f}{cycled[name]:>19.1f}{err:>12.4f}")
    best = min(cycled, key=cycled.get)
    print(f"headline: members cycled, {best} {cycled[best]:.1f} us per member, weight-only int8 "
          f"{cycled['weight-only int8']:.1f} us")  # fmt: skip


if __name__ == "__main__":
    bench_main.run(main)
