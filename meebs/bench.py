"""`make bench`: how fast the trainer is, and how far from the floor.

Each case runs in its own process so peak memory belongs to that case alone:
- demo: the demo recipe through the real trainer (samples off);
- sd15-128: the full-size SD 1.5 architecture (random weights) at 128 px, batch 2, the
  1.3 network settings, through the real trainer, a few steps;
- floor: the same model, network and optimizer in a bare loop with latents and text
  embeddings precomputed (no data loading, no logging): what a step costs at least.
The trainer's overhead is its seconds per step over the floor's, first step excluded.

    python -m meebs.bench                 # all cases (the SD 1.5 ones take minutes on CPU)
    python -m meebs.bench --cases demo demo-floor --steps 20
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CASES = ("demo", "demo-floor", "sd15-128", "sd15-128-floor")


def bench_data(root: Path, images: int) -> Path:
    """A one-folder dataset of `images` demo images, 1 repeat: steps = images / batch."""
    source = sorted((REPO / "data/demo/train").glob("*/*.png"))
    folder = root / "train" / "1_meeb person"
    folder.mkdir(parents=True)
    for i in range(images):
        image = source[i % len(source)]
        shutil.copy(image, folder / f"{i:03d}.png")
        shutil.copy(image.with_suffix(".txt"), folder / f"{i:03d}.txt")
    return root / "train"


def case_overrides(case: str, data_dir: Path, out_dir: Path) -> tuple[str, list[str]]:
    common = [
        f"data.train_dir={data_dir}",
        "data.reg_dir=null",
        f"output.dir={out_dir}",
        "sample.every_n_epochs=0",
        "train.epochs=1",
        "train.batch_size=2",
        "train.lr_warmup=0",
        "train.lr_scheduler=constant",
    ]
    if case.startswith("sd15"):
        common += ["model.builtin=sd15-random", "data.resolution=128"]
    return str(REPO / "recipes/demo.yaml"), common


def run_trainer(recipe_path: str, overrides: list[str]) -> dict[str, float]:
    from rich.console import Console

    from meebs.recipe import load_recipe
    from meebs.train import train

    result = train(load_recipe(recipe_path, overrides), Console(quiet=True))
    return result.perf


def run_floor(recipe_path: str, overrides: list[str], steps: int) -> dict[str, float]:
    """The bare loop: same model, network, optimizer; latents and text states precomputed."""
    import torch
    import torch.nn.functional as F

    from meebs.metadata import network_spec
    from meebs.models import load_base_model
    from meebs.network import build_network
    from meebs.optim import build_optimizer, param_groups
    from meebs.perf import PerfMeter
    from meebs.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    torch.set_num_threads(recipe.train.threads)
    base = load_base_model(builtin=recipe.model.builtin, path=None, sha256=None, allow_pickle=False)
    torch.manual_seed(0)
    network = build_network(base.unet, base.text_encoder, network_spec(recipe))
    network.train()
    optimizer, _, _ = build_optimizer(param_groups(network, recipe), recipe)
    width, height = recipe.data.resolution
    batch = recipe.train.batch_size
    latents = torch.randn(batch, 4, height // 8, width // 8)
    hidden = torch.randn(batch, 77, base.text_encoder.config.hidden_size)
    meter = PerfMeter()
    for _ in range(steps):
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (batch,))
        noisy = base.noise_scheduler.add_noise(latents, noise, timesteps)
        pred = base.unet(noisy, timesteps, hidden).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.step_done()
    return meter.summary()


def run_case(case: str, steps: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = bench_data(root / "data", images=2 * steps)
        recipe_path, overrides = case_overrides(case, data, root / "out")
        if case.endswith("floor"):
            perf = run_floor(recipe_path, overrides, steps)
        else:
            perf = run_trainer(recipe_path, overrides)
    return perf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--steps", type=int, default=0, help="steps per case (default per case)")
    parser.add_argument("--one", choices=CASES, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.one:
        steps = args.steps or (4 if args.one.startswith("sd15") else 30)
        print(json.dumps(run_case(args.one, steps)))
        return
    results = {}
    for case in args.cases:
        command = [sys.executable, "-m", "meebs.bench", "--one", case, "--steps", str(args.steps)]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"bench case {case} failed:\n{done.stderr[-3000:]}")
        results[case] = json.loads(done.stdout.strip().splitlines()[-1])
        results[case]["wall_s"] = time.perf_counter() - started
    print_table(results)


def print_table(results: dict[str, dict[str, float]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="sd-meebs bench (CPU threads per recipe)")
    columns = ("case", "steps", "s/step", "steps/s", "first step*", "peak RSS", "vs floor")
    for column in columns:
        table.add_column(column, justify="right" if column != "case" else "left")
    for case, perf in results.items():
        floor = results.get(f"{case}-floor")
        overhead = (
            f"{perf['seconds_per_step'] / floor['seconds_per_step'] - 1:+.1%}" if floor else ""
        )
        table.add_row(
            case,
            f"{perf['steps']:.0f}",
            f"{perf['seconds_per_step']:.3f}",
            f"{perf['steps_per_second']:.2f}",
            f"{perf['process_to_first_step_s']:.1f} s",
            f"{perf['peak_rss_gib']:.2f} GiB",
            overhead,
        )
    console = Console()
    console.print(table)
    console.print("* seconds from process start (imports, model build, caching) to the first step")
    print(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
