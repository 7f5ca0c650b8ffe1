"""`make bench`: how fast the trainer is, and how far from the floor.

Each case runs in its own process so peak memory belongs to that case alone:
- demo: the demo model and network through the real trainer, one epoch on a plain
  one-folder data set (samples and validation off);
- demo-full: the demo recipe as `make demo` runs it (samples off, validation on): what
  validation costs, as a share of the run's time;
- sd15: the full-size SD 1.5 architecture (random weights) at 128 px, batch 2, the
  1.3 network settings, through the real trainer (`--set data.resolution=512` for the
  real size on a GPU; ci/gpu_bench.sh does that with the 1.3 recipe's settings);
- sd15-lycoris, sd15-low-memory, sd15-fast, sd15-factored: the same with each LoHA layer
  path (meebs.network.loha_layer): lycoris' own forward (the reference), low-memory, fast
  and factored, whichever the default is;
- demo-floor, sd15-floor: the same model, network, layer path, optimizer, device and
  precision in a bare loop with latents and caption tokens made once (no data loading,
  caching, logging or saving): what a step costs at least.
Seconds per step are the median step (the first excluded; saving and validation are not
step time); each case runs several times (interleaved) and the median run is shown,
because on a small shared machine one process can be 20% slower than the next for no
reason of its own.

    python -m meebs.training.bench                 # all cases (the SD 1.5 ones take minutes on CPU)
    python -m meebs.training.bench --cases demo demo-floor --repeat 5
    python -m meebs.training.bench --cases demo demo-floor --steps 20
    python -m meebs.training.bench --cases sd15 sd15-floor --set train.mixed_precision=bf16
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

from meebs.models.quiet import quiet_libraries

REPO = Path(__file__).resolve().parents[2]
CASES = (
    "demo",
    "demo-floor",
    "demo-full",
    "sd15",
    "sd15-floor",
    "sd15-lycoris",
    "sd15-low-memory",
    "sd15-fast",
    "sd15-factored",
)
LAYER_CASES = {
    "sd15-lycoris": "lycoris",
    "sd15-low-memory": "low-memory",
    "sd15-fast": "fast",
    "sd15-factored": "factored",
}


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
    if case == "demo-full":
        return str(REPO / "recipes/demo.yaml"), [f"output.dir={out_dir}", "sample.every_n_epochs=0"]
    common = [
        f"data.train_dir={data_dir}",
        "data.reg_dir=null",
        f"output.dir={out_dir}",
        "sample.every_n_epochs=0",
        "train.epochs=1",
        "train.batch_size=2",
        "train.lr_warmup=0",
        "train.lr_scheduler=constant",
        "validation.enabled=false",
    ]
    if case.startswith("sd15"):
        common += ["model.builtin=sd15-random", "data.resolution=128"]
    if case in LAYER_CASES:
        common += [f"train.loha_layer={LAYER_CASES[case]}"]
    return str(REPO / "recipes/demo.yaml"), common


def run_trainer(recipe_path: str, overrides: list[str]) -> dict[str, float]:
    from rich.console import Console

    from meebs.recipe.loading import load_recipe
    from meebs.training.train import train

    result = train(load_recipe(recipe_path, overrides), Console(quiet=True))
    manifest = json.loads(result.manifest.read_text())
    return {
        **result.perf,
        "run_s": manifest["duration_s"],
        "validation_s": result.validation_s,
        "fallbacks": manifest["fallbacks"],
    }


def run_floor(recipe_path: str, overrides: list[str], steps: int) -> dict[str, float]:
    """The bare loop: the trainer's model, network, optimizer, device and precision, with
    latents and caption tokens made once; no data loading, caching, logging or saving."""
    import torch
    import torch.nn.functional as F

    from meebs.data.latents import latent_shape
    from meebs.models.loading import load_base_model
    from meebs.models.machine import make_accelerator, place_models
    from meebs.models.text_encoding import encode, tokenize
    from meebs.network.build import build_network
    from meebs.network.loha_layer import use_layer_path
    from meebs.network.optim import build_optimizer, param_groups
    from meebs.plan.metadata import network_spec
    from meebs.recipe.loading import load_recipe
    from meebs.training.determinism import apply_determinism
    from meebs.training.perf import PerfMeter

    recipe = load_recipe(recipe_path, overrides)
    train = recipe.train
    apply_determinism(recipe)  # the trainer's kernel settings (and threads), so alike is timed
    accelerator, _ = make_accelerator(recipe)
    base = load_base_model(builtin=recipe.model.builtin, path=None, sha256=None, allow_pickle=False)
    torch.manual_seed(train.seed)
    network = build_network(base.unet, base.text_encoder, network_spec(recipe))
    use_layer_path(network.loras, train.loha_layer)
    place_models(base, network, accelerator, recipe, train_te=True)
    optimizer, _, _ = build_optimizer(param_groups(network, recipe), recipe)
    optimizer = accelerator.prepare(optimizer)
    device = accelerator.device
    width, height = recipe.data.resolution
    batch = train.batch_size
    latents = torch.randn(batch, *latent_shape(base.vae.config, width, height), device=device)
    ids = tokenize(base.tokenizer, ["meeb person"] * batch, 75, False).to(device)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    meter = PerfMeter(device)
    for _ in range(steps):
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (batch,), device=device)
        noisy = base.noise_scheduler.add_noise(latents, noise, timesteps)
        with accelerator.autocast():
            hidden = encode(base.text_encoder, ids, train.clip_skip)
            pred = base.unet(noisy, timesteps, hidden).sample
        loss = F.mse_loss(pred.float(), noise)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.step_done()
    return meter.summary()


def run_case(case: str, steps: int, extra: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = bench_data(root / "data", images=2 * steps)
        recipe_path, overrides = case_overrides(case, data, root / "out")
        overrides += extra
        if case.endswith("floor"):
            perf = run_floor(recipe_path, overrides, steps)
        else:
            perf = run_trainer(recipe_path, overrides)
    return perf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--steps", type=int, default=0, help="steps per case (default per case)")
    parser.add_argument("--set", nargs="*", default=[], help="recipe overrides for every case")
    parser.add_argument(
        "--repeat", type=int, default=0, help="runs per case, median kept (default: demo 3, sd15 1)"
    )
    parser.add_argument("--one", choices=CASES, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.one:
        quiet_libraries()
        steps = args.steps or (11 if args.one.startswith("sd15") else 30)
        print(json.dumps(run_case(args.one, steps, args.set)))
        return
    runs: dict[str, list[dict[str, float]]] = {case: [] for case in args.cases}
    rounds = args.repeat or 3
    for round_index in range(rounds):  # interleaved, so a slow spell hits every case alike
        for case in args.cases:
            if round_index < (args.repeat or (1 if case.startswith("sd15") else 3)):
                runs[case].append(run_child(case, args.steps, args.set))
    results = {
        case: sorted(perfs, key=lambda p: p["seconds_per_step"])[len(perfs) // 2]
        for case, perfs in runs.items()
    }
    print_table(results)


def run_child(case: str, steps: int, overrides: list[str]) -> dict[str, float]:
    command = [sys.executable, "-m", "meebs.training.bench", "--one", case, "--steps", str(steps)]
    command += ["--set", *overrides]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"bench case {case} failed:\n{done.stderr[-3000:]}")
    perf = json.loads(done.stdout.strip().splitlines()[-1])
    perf["wall_s"] = time.perf_counter() - started
    return perf


def print_table(results: dict[str, dict[str, float]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="sd-meebs bench")
    columns = (
        "case",
        "steps",
        "s/step",
        "steps/s",
        "first step*",
        "peak RSS",
        "peak GPU",
        "vs floor",
    )
    for column in columns:
        table.add_column(column, justify="right" if column != "case" else "left")
    for case, perf in results.items():
        floor = results.get(f"{case}-floor")
        overhead = f"{ratio(perf, floor, 'seconds_per_step')}" if floor else ""
        table.add_row(
            case,
            f"{perf['steps']:.0f}",
            f"{perf['seconds_per_step']:.3f}",
            f"{perf['steps_per_second']:.2f}",
            f"{perf['process_to_first_step_s']:.1f} s",
            f"{perf['peak_rss_gib']:.2f} GiB",
            f"{perf['peak_cuda_gib']:.2f} GiB" if "peak_cuda_gib" in perf else "",
            overhead,
        )
    console = Console(soft_wrap=True)  # a path or command to copy is never cut in two
    console.print(table)
    console.print("* seconds from process start (imports, model build, caching) to the first step")
    for line in ratio_lines(results):
        console.print(line)
    print(json.dumps(results, indent=2, sort_keys=True))


def ratio(perf: dict, reference: dict, key: str) -> str:
    return f"{perf[key] / reference[key]:.2f}x"


def ratio_lines(results: dict[str, dict]) -> list[str]:
    """The ratios we track: LoHA layer paths against lycoris' own, validation's share."""
    lines = []
    stock = results.get("sd15-lycoris")
    memory = ["peak_rss_gib"] + (["peak_cuda_gib"] if stock and "peak_cuda_gib" in stock else [])
    pairs = [(f"sd15-{path}", "sd15-lycoris") for path in ("fast", "low-memory", "factored")]
    for case, reference in [*pairs, ("sd15-factored", "sd15-fast")]:
        if case in results and reference in results:
            parts = [f"s/step {ratio(results[case], results[reference], 'seconds_per_step')}"]
            parts += [f"{key} {ratio(results[case], results[reference], key)}" for key in memory]
            name = reference.removeprefix("sd15-")
            lines.append(f"{case.removeprefix('sd15-')} layer / {name}: {', '.join(parts)}")
    full = results.get("demo-full")
    if full:
        share = full["validation_s"] / full["run_s"]
        lines.append(
            f"demo validation: {full['validation_s']:.1f} s of the {full['run_s']:.1f} s run "
            f"({share:.1%})"
        )
    return lines


if __name__ == "__main__":
    main()
