"""Optimizers and LR schedules named by the recipe, including the fallbacks: every name of
the schema's OPTIMIZERS builds the class kohya sd-scripts builds (or the documented
fallback, with its note), takes a step, and goes through Ctrl-C and `--resume` in the real
trainer to the bytes of a run that never stopped."""

import builtins
import hashlib
import shutil
import typing
from pathlib import Path

import pytest
import torch
from engine_runs import interrupt_at
from rich.console import Console
from safetensors.torch import load_file

from meebs.errors import RecipeError
from meebs.interop.kohya_keys import parse_optimizer_args
from meebs.network.optim import build_lr_scheduler, build_optimizer
from meebs.recipe.loading import load_recipe
from meebs.recipe.schema import TrainSection

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "recipes" / "demo.yaml"
OPTIMIZERS = typing.get_args(typing.get_type_hints(TrainSection)["optimizer"])
CPU_NOTE = "{} on CPU: using bitsandbytes' CPU implementation"
# On this CPU-only machine: name -> (class built, name recorded, notes).
EXPECTED = {
    "AdamW": ("torch.optim.adamw.AdamW", "AdamW", []),
    "AdamW8bit": ("bitsandbytes.optim.adamw.AdamW8bit", "AdamW8bit", [CPU_NOTE]),
    "PagedAdamW8bit": (
        "bitsandbytes.optim.adamw.AdamW8bit",
        "AdamW8bit",
        ["PagedAdamW8bit on CPU: using bitsandbytes' AdamW8bit CPU implementation (not paged)"],
    ),
    "Lion": ("lion_pytorch.lion_pytorch.Lion", "Lion", []),
    "Lion8bit": ("bitsandbytes.optim.lion.Lion8bit", "Lion8bit", [CPU_NOTE]),
    "PagedLion8bit": (
        "bitsandbytes.optim.lion.Lion8bit",
        "Lion8bit",
        ["PagedLion8bit on CPU: using bitsandbytes' Lion8bit CPU implementation (not paged)"],
    ),
    "SGDNesterov": ("torch.optim.sgd.SGD", "SGDNesterov", []),
    "SGDNesterov8bit": ("bitsandbytes.optim.sgd.SGD8bit", "SGDNesterov8bit", [CPU_NOTE]),
    "Adafactor": (
        "transformers.optimization.Adafactor",
        "Adafactor",
        [
            "Adafactor with relative_step (kohya's default; optimizer_args relative_step=False "
            "turns it off): Adafactor sets its own LR, so train.learning_rate, unet_lr, "
            "text_encoder_lr and lr_scheduler cosine are not used"
        ],
    ),
    "DAdaptation": (
        "dadaptation.experimental.dadapt_adam_preprint.DAdaptAdamPreprint",
        "DAdaptation",
        [],
    ),
    "DAdaptAdam": ("dadaptation.dadapt_adam.DAdaptAdam", "DAdaptAdam", []),
    "DAdaptAdaGrad": ("dadaptation.dadapt_adagrad.DAdaptAdaGrad", "DAdaptAdaGrad", []),
    "DAdaptAdan": ("dadaptation.dadapt_adan.DAdaptAdan", "DAdaptAdan", []),
    "DAdaptLion": ("dadaptation.dadapt_lion.DAdaptLion", "DAdaptLion", []),
    "DAdaptSGD": ("dadaptation.dadapt_sgd.DAdaptSGD", "DAdaptSGD", []),
    "Prodigy": ("prodigyopt.prodigy.Prodigy", "Prodigy", []),
}
# D-Adaptation and Prodigy scale their own estimate by the LR: kohya_ss users write 1.0.
ADAPTIVE = {name for name in OPTIMIZERS if name.startswith("DAdapt") or name == "Prodigy"}


def groups(lr: float = 1e-3) -> list[dict]:
    """Two groups as the trainer makes them; 64 x 64 = bitsandbytes' smallest 8-bit tensor."""
    torch.manual_seed(0)
    return [
        {"params": [torch.nn.Parameter(torch.randn(64, 64))], "lr": lr, "name": "unet"},
        {"params": [torch.nn.Parameter(torch.randn(8))], "lr": lr, "name": "text_encoder"},
    ]


def take_a_step(params: list[dict], optimizer, schedule=None) -> None:
    """As the trainer's step: backward, the optimizer, the schedule, clear the gradients."""
    sum((p**2).sum() for g in params for p in g["params"]).backward()
    optimizer.step()
    if schedule is not None:
        schedule.step()
    optimizer.zero_grad(set_to_none=True)


def test_every_name_of_the_schema_is_covered():
    assert set(EXPECTED) == set(OPTIMIZERS)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_is_kohyas_class_and_takes_a_step(name):
    lr = 1.0 if name in ADAPTIVE else 1e-3
    recipe = load_recipe(DEMO, [f"train.optimizer={name}", f"train.learning_rate={lr}"])
    params = groups(lr)
    before = [p.detach().clone() for g in params for p in g["params"]]
    optimizer, used, notes = build_optimizer(params, recipe)
    cls, expected_used, expected_notes = EXPECTED[name]
    assert f"{type(optimizer).__module__}.{type(optimizer).__qualname__}" == cls
    assert used == expected_used
    assert notes == [note.format(name) for note in expected_notes]
    schedule = build_lr_scheduler(optimizer, recipe, 10, 0)
    for _ in range(2):  # D-Adaptation's SGD moves from its second step on
        take_a_step(params, optimizer, schedule)
    after = [p.detach() for g in optimizer.param_groups for p in g["params"]]
    assert all(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    assert all(isinstance(g["lr"], float) for g in optimizer.param_groups)


@pytest.mark.parametrize(
    ("name", "fallback", "cls"),
    [
        ("AdamW8bit", "AdamW", "AdamW"),
        ("PagedAdamW8bit", "AdamW", "AdamW"),
        ("Lion8bit", "Lion", "Lion"),
        ("PagedLion8bit", "Lion", "Lion"),
        ("SGDNesterov8bit", "SGDNesterov", "SGD"),
    ],
)
def test_missing_bitsandbytes_falls_back_to_32_bits(monkeypatch, name, fallback, cls):
    real_import = builtins.__import__

    def no_bnb(module, *args, **kwargs):
        if module == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(module, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    recipe = load_recipe(DEMO, [f"train.optimizer={name}"])
    params = groups()
    optimizer, used, notes = build_optimizer(params, recipe)
    assert used == fallback and type(optimizer).__name__ == cls
    assert len(notes) == 1 and notes[0].startswith(f"{name} unavailable (ImportError: ")
    if fallback == "SGDNesterov":
        group = optimizer.param_groups[0]
        assert group["nesterov"] and group["momentum"] == 0.9
    take_a_step(params, optimizer)


def kohya_args(text: str) -> str:
    """A kohya_ss optimizer_args string as a recipe override (the import's parser)."""
    return f"train.optimizer_args={parse_optimizer_args(text)}"


def test_kohya_defaults_and_optimizer_args():
    # SGDNesterov: momentum 0.9 unless given; kohya_ss args as its users write them
    recipe = load_recipe(DEMO, ["train.optimizer=SGDNesterov"])
    group = build_optimizer(groups(), recipe)[0].param_groups[0]
    assert group["nesterov"] and group["momentum"] == 0.9
    recipe = load_recipe(DEMO, ["train.optimizer=SGDNesterov", kohya_args("momentum=0.8")])
    assert build_optimizer(groups(), recipe)[0].param_groups[0]["momentum"] == 0.8
    recipe = load_recipe(
        DEMO, ["train.optimizer=Lion", kohya_args("weight_decay=0.01 betas=0.9,0.99")]
    )
    group = build_optimizer(groups(), recipe)[0].param_groups[0]
    assert group["weight_decay"] == 0.01 and list(group["betas"]) == [0.9, 0.99]
    recipe = load_recipe(
        DEMO, ["train.optimizer=DAdaptAdam", kohya_args("decouple=True weight_decay=0.01")]
    )
    group = build_optimizer(groups(), recipe)[0].param_groups[0]
    assert group["decouple"] and group["weight_decay"] == 0.01


def test_adafactor_with_its_own_lr_or_the_recipes():
    # relative_step (the default): no LR of ours, Adafactor's schedule; the LR it reports
    # after a step is its own (relative step 1e-2 times the weights' RMS)
    recipe = load_recipe(DEMO, ["train.optimizer=Adafactor"])
    params = groups(lr=5e-3)
    optimizer, _, notes = build_optimizer(params, recipe)
    assert optimizer.param_groups[0]["relative_step"] and len(notes) == 1
    schedule = build_lr_scheduler(optimizer, recipe, 10, 0)
    assert type(schedule).__name__ == "FloatAdafactorSchedule"
    assert schedule.get_last_lr() == [recipe.train.learning_rate] * 2
    rms = float(params[0]["params"][0].detach().norm() / 64)
    take_a_step(params, optimizer, schedule)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * rms)
    # kohya_ss's usual "scale_parameter=False relative_step=False warmup_init=False": a
    # fixed LR, the recipe's, and the recipe's schedule
    off = "scale_parameter=False relative_step=False warmup_init=False"
    recipe = load_recipe(DEMO, ["train.optimizer=Adafactor", kohya_args(off)])
    optimizer, _, notes = build_optimizer(groups(lr=5e-3), recipe)
    assert notes == [] and optimizer.param_groups[0]["lr"] == 5e-3
    schedule = build_lr_scheduler(optimizer, recipe, 10, 0)
    assert type(schedule).__name__ == "LambdaLR"
    # warmup_init needs relative_step: kohya turns it back on
    recipe = load_recipe(
        DEMO, ["train.optimizer=Adafactor", kohya_args("relative_step=False warmup_init=True")]
    )
    optimizer, _, notes = build_optimizer(groups(), recipe)
    assert optimizer.param_groups[0]["relative_step"] and len(notes) == 1


@pytest.mark.parametrize("name", ["DAdaptAdam", "Prodigy"])
def test_one_lr_optimizers_refuse_two_lrs_before_training(name):
    recipe = load_recipe(DEMO, [f"train.optimizer={name}", "train.text_encoder_lr=0.5"])
    with pytest.raises(RecipeError, match=f"{name} takes one LR.*unet_lr is 0.005"):
        build_optimizer(groups(), recipe)
    recipe = load_recipe(DEMO, [f"train.optimizer={name}", "train.text_encoder_lr=0"])
    build_optimizer(groups()[:1], recipe)  # the text encoder not trained: one LR


@pytest.mark.parametrize(
    ("scheduler", "warmup", "expected"),
    [
        ("constant", 0.0, [1.0, 1.0, 1.0, 1.0, 1.0]),
        ("constant_with_warmup", 0.2, [0.0, 0.5, 1.0, 1.0, 1.0]),  # 2 warmup steps of 10
        ("linear", 0.0, [1.0, 0.9, 0.8, 0.7, 0.6]),
        ("cosine", 0.0, [1.0, 0.97553, 0.90451, 0.79389, 0.65451]),
    ],
)
def test_schedules(scheduler, warmup, expected):
    recipe = load_recipe(
        DEMO,
        [f"train.lr_scheduler={scheduler}", f"train.lr_warmup={warmup}", "train.learning_rate=1"],
    )
    params = groups()[:1]
    params[0]["lr"] = 1.0
    optimizer, _, _ = build_optimizer(params, recipe)
    total = 10
    schedule = build_lr_scheduler(optimizer, recipe, total, int(warmup * total))
    seen = []
    for _ in range(5):
        seen.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert seen == pytest.approx(expected, abs=1e-5)


# ------------------------------------------------------------------ the real trainer


@pytest.fixture(scope="module")
def one_image(tmp_path_factory) -> Path:
    """One demo image (and caption) as `3_meeb`: 3 steps per epoch at batch 1."""
    root = tmp_path_factory.mktemp("one-image")
    (root / "3_meeb").mkdir()
    for twin in sorted((REPO / "data" / "demo" / "train" / "10_meeb").glob("meeb_003.*")):
        shutil.copy(twin, root / "3_meeb" / twin.name)
    return root


def network_files(run: Path) -> dict[str, str]:
    """The epoch files (name -> sha256), without the file a stop adds."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.glob("*.safetensors"))
        if "-step" not in p.name
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_stops_and_resumes_to_the_same_bytes(name, one_image, tmp_path, monkeypatch):
    """2 epochs of 3 steps; Ctrl-C after step 4, `--resume`: the same files, bit for bit,
    as the run that never stopped (fp32 files, so no change hides in a rounding)."""
    from meebs.training.train import resume, train

    monkeypatch.chdir(REPO)
    quiet = Console(quiet=True)
    overrides = [
        "model.builtin=tiny",
        f"data.train_dir={one_image}",
        "data.reg_dir=null",
        "train.epochs=2",
        "train.batch_size=1",
        "train.threads=1",  # a second thread saves nothing on this size, and costs on a busy CPU
        f"train.optimizer={name}",
        f"train.learning_rate={1.0 if name in ADAPTIVE else 5e-3}",
        "output.save_precision=fp32",
        "sample.every_n_epochs=0",
        "validation.enabled=false",
    ]
    whole = train(load_recipe(DEMO, [*overrides, f"output.dir={tmp_path / 'w'}"]), quiet)
    with monkeypatch.context() as patch:
        interrupt_at(patch, 4)
        cut = train(load_recipe(DEMO, [*overrides, f"output.dir={tmp_path / 'c'}"]), quiet)
    assert cut.interrupted and cut.steps == 4
    resume(cut.run_dir, quiet)
    files = network_files(whole.run_dir)
    assert network_files(cut.run_dir) == files and len(files) == 2
    first, last = (load_file(whole.run_dir / f) for f in sorted(files))  # -000001, final
    assert any(not torch.equal(first[k], last[k]) for k in first)  # epoch 2 trained
