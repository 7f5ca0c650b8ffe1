"""Measure where the factored LoHA layer pays: one layer's forward + backward, "fast"
against "factored", over SD 1.5's layer shapes and LoHA ranks (docs/performance.md,
"The factored layer"). The break-even it shows is what `COST_RATIO` in
meebs/network/loha_factored.py encodes.

    .venv/bin/python ci/layer_cost.py             # 128 px, batch 2, this machine's threads
    .venv/bin/python ci/layer_cost.py --pixels 64 # 512 px latents (64 x 64)

Each cell is the median of --repeat timed runs after one warm-up, with nothing else
running (on 2 cores one busy process doubles a time).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from lycoris.modules.loha import LohaModule
from torch import nn

from meebs.network.loha_factored import COST_RATIO, factored_pays
from meebs.network.loha_layer import route

# (name, layer, latent side divisor): SD 1.5's adapted shapes at each UNet level, and a
# text-encoder MLP layer (77 tokens)
SHAPES = [
    ("attn 320x320", lambda: nn.Linear(320, 320), 1),
    ("ff 320x2560", lambda: nn.Linear(320, 2560), 1),
    ("attn 1280x1280", lambda: nn.Linear(1280, 1280), 4),
    ("conv3x3 320", lambda: nn.Conv2d(320, 320, 3, padding=1), 1),
    ("conv3x3 1280", lambda: nn.Conv2d(1280, 1280, 3, padding=1), 4),
    ("te mlp 768x3072", lambda: nn.Linear(768, 3072), 0),
]


def inputs(layer: nn.Module, side: int, batch: int) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return torch.randn(batch, layer.in_channels, side, side)
    tokens = 77 if side == 0 else side * side
    return torch.randn(batch, tokens, layer.in_features)


def time_path(layer: nn.Module, lora: LohaModule, path: str, x: torch.Tensor, repeat: int) -> float:
    """Median seconds of forward + backward through `path`, after one warm-up."""
    route(lora, path)
    times = []
    for i in range(repeat + 1):
        start = time.perf_counter()
        layer(x).square().mean().backward()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pixels", type=int, default=16, help="latent side at level 1")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    args = parser.parse_args()
    print(f"threads {torch.get_num_threads()}, COST_RATIO {COST_RATIO}")
    print(
        f"{'layer':18} {'dim':>4} {'r1*r2':>6} {'fast ms':>9} {'factored ms':>12} {'ratio':>6} rule"
    )
    for name, make, divisor in SHAPES:
        for dim in args.dims:
            torch.manual_seed(0)
            layer = make().requires_grad_(False)
            lora = LohaModule("probe", layer, lora_dim=dim, alpha=1)
            with torch.no_grad():
                for parameter in lora.parameters():
                    parameter.normal_(0, 0.1)
            lora.apply_to()
            side = args.pixels // divisor if divisor else 0
            x = inputs(layer, side, args.batch)
            fast = time_path(layer, lora, "fast", x, args.repeat)
            factored = time_path(layer, lora, "factored", x, args.repeat)
            rule = "factored" if factored_pays(lora) else "fast"
            print(
                f"{name:18} {dim:4} {dim * dim:6} {fast * 1e3:9.2f} {factored * 1e3:12.2f} "
                f"{factored / fast:6.2f} {rule}"
            )


if __name__ == "__main__":
    main()
