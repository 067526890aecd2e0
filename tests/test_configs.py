"""The paper's benchmark configs: their full settings against the reference page's numbers, and each config
end to end on generated data with tiny overrides; ``nws launch`` with local jobs and ``nws report``."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from scale_data import make_cifar100_archive, make_cub2sketches, make_image_folders

from nws.cli import main
from nws.config import BaselineConfig
from nws.config_parser import parse_run_config
from nws.convert import convert, nws_layers
from nws.data.cifar100 import SUPERCLASSES
from nws.data.folders import CUB2SKETCHES
from nws.models import create_model
from nws.methods.nws import TaskStore

CONFIGS = Path(__file__).parent.parent / "configs"

# The reference page (shared/nws-reference.md, "Benchmarks and settings").
SGD = {"optimizer": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 4e-5, "gamma": 0.1, "sparsity": 0.0}
TASK_CIFAR = {**SGD, "epochs": 100, "batch_size": 32, "lr": 0.01, "beta": 0.5, "decay_epochs": [50, 80]}
TASK_CUB = {**SGD, "epochs": 100, "batch_size": 32, "lr": 0.001, "beta": 0.1, "decay_epochs": [50, 80]}
PRETRAIN = {**SGD, "epochs": 160, "batch_size": 2048, "lr": 0.01, "beta": 0.5, "decay_epochs": [100]}
MODEL = {"name": "resnet18", "kwargs": {"stem": "imagenet", "maxpool": False}, "pool_size": 512, "group_size": 1,
         "exclude": [], "init": "normal", "decay": 0.99, "eps": 1e-5, "zero_entry": False,
         "code_reference": "source", "key_every": 10, "task_start": "previous",
         # storage, rate, BatchNorm's end: nws's own, off
         "bn_stats": 0, "bn_dtype": "float32", "rate": 0.0, "rate_warmup": 0.0}
# MobileNetV2 and VGG16-BN (the reference's funcs/module_funcs.py:7-8,28-29 and its *_adam.sh scripts): Adam(lr)
# with torch's default betas and eps and no weight decay, x0.1 at half the epochs; momentum and nesterov unused.
ADAM = {**SGD, "optimizer": "adam", "weight_decay": 0.0}
TASK_CIFAR_ADAM = {**TASK_CIFAR, **ADAM, "decay_epochs": [50]}
TASK_CUB_ADAM = {**TASK_CUB, **ADAM, "decay_epochs": [50]}
# The reference's builders (models/NwsMobileNet.py, models/NwsVGG.py) are nws's defaults: MobileNetV2 with its
# stride-2 stem (also on 32x32) and no dropout, VGG16-BN with dropout 0.2; no biases (tests/test_models.py).
ADAM_ARCHS = ("mobilenet_v2", "vgg16_bn")
TASK_ORDER_CIFAR = ["aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
                    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
                    "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
                    "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
                    "vehicles_1", "vehicles_2"]
CUB_CLASSES = [200, 196, 102, 195, 250]  # CUB-200 cropped, Cars cropped, Flowers, WikiArt, Sketches


def decay_epochs(cfg) -> list[int]:
    """The epochs after which the learning rate drops, read off the schedule the engine trains with."""
    import warnings

    from torch import nn

    from nws.engine import TrainModule

    (optimizer,), (scheduler,) = TrainModule(nn.Linear(1, 1), cfg).configure_optimizers()
    epochs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the scheduler steps here without training
        for epoch in range(1, cfg.epochs + 1):
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            if optimizer.param_groups[0]["lr"] < lr:
                epochs.append(epoch)
    return epochs


def stage(cfg) -> dict:
    """A training stage as the reference states it: decay epochs instead of fractions."""
    d = dataclasses.asdict(cfg)
    del d["milestones"]
    return {**d, "decay_epochs": decay_epochs(cfg)}


def load(name: str):
    return parse_run_config(["--config", str(CONFIGS / name)])


def test_split_cifar100_config_is_the_reference():
    c = load("split_cifar100_resnet18.yaml")
    assert dataclasses.asdict(c.model) == MODEL
    assert stage(c.task) == TASK_CIFAR and stage(c.pretrain) == PRETRAIN
    assert (c.data.name, c.data.source, c.data.num_tasks) == ("split_cifar100", "none", None)
    assert c.pretrained == load("pretrain_pools_imagenet_resnet18.yaml").out  # ImageNet-pretrained pools
    t = c.trainer
    assert (t.precision, t.devices, t.strategy, t.sync_batchnorm, t.logger, t.checkpoint) == \
        ("32-true", 1, "auto", False, "csv", True)
    assert list(SUPERCLASSES) == TASK_ORDER_CIFAR and c.method == "nws"


def test_cub2sketches_config_is_the_reference():
    c = load("cub2sketches_resnet18.yaml")
    assert dataclasses.asdict(c.model) == MODEL
    assert stage(c.task) == TASK_CUB and stage(c.pretrain) == PRETRAIN
    assert (c.data.name, c.data.source, c.data.image_size) == ("cub2sketches", "none", None)  # 224
    assert c.pretrained == load("pretrain_pools_imagenet_resnet18.yaml").out
    assert c.trainer.precision == "16-mixed" and c.trainer.devices == 1
    assert [n for _, n in CUB2SKETCHES] == CUB_CLASSES


@pytest.mark.parametrize("name", [f"{b}_{a}.yaml" for b in ("split_cifar100", "cub2sketches")
                                  for a in ("resnet18", *ADAM_ARCHS)])
def test_paper_configs_give_the_baselines_their_papers_settings(name):
    """PackNet prunes 75% and retrains for half the task's epochs; Piggyback's masks as in its paper."""
    c = load(name)
    assert c.baseline == BaselineConfig(prune_ratio=0.75, retrain_epochs=c.task.epochs // 2, mask_init=1e-2,
                                        mask_threshold=5e-3, mask_lr=1e-4)


@pytest.mark.parametrize("arch", ADAM_ARCHS)
def test_adam_configs_are_the_reference(arch):
    """MobileNetV2 and VGG16-BN on both benchmarks: the reference's Adam recipe with the benchmark's lr, beta,
    epochs, batch and precision (its configs/splitcifar.yaml and cub2sketches.yaml), pools from a pool-pretraining
    run of the same backbone."""
    model = {**MODEL, "name": arch, "kwargs": {}}
    pretraining = load(f"pretrain_pools_subimagenet_{arch}.yaml")
    for name, task, precision in ((f"split_cifar100_{arch}.yaml", TASK_CIFAR_ADAM, "32-true"),
                                  (f"cub2sketches_{arch}.yaml", TASK_CUB_ADAM, "16-mixed")):
        c = load(name)
        assert dataclasses.asdict(c.model) == model and c.model == pretraining.model, name
        assert stage(c.task) == task and stage(c.pretrain) == PRETRAIN, name
        assert (c.data.source, c.data.num_tasks, c.data.image_size, c.method) == ("none", None, None, "nws"), name
        assert c.pretrained == pretraining.out, name
        t = c.trainer
        assert (t.precision, t.devices, t.strategy, t.sync_batchnorm, t.logger, t.checkpoint) == \
            (precision, 1, "auto", False, "csv", True), name
    assert load(f"split_cifar100_{arch}.yaml").data.name == "split_cifar100"
    assert load(f"cub2sketches_{arch}.yaml").data.name == "cub2sketches"


@pytest.mark.parametrize("name, arch", [("pretrain_pools_imagenet_resnet18.yaml", "resnet18"),
                                        *((f"pretrain_pools_subimagenet_{a}.yaml", a) for a in ADAM_ARCHS)])
def test_pretraining_config_is_the_reference(name, arch):
    """Pool pretraining as the reference's configs/pretrain_kernel_pool.yaml and pretrain_KP.py: 160 epochs,
    SGD lr 0.01 (x0.1 at epoch 100), batch 2048 over 8 GPUs, DDP, synchronised BatchNorm, fp16 autocast, K 512."""
    c = load(name)
    assert dataclasses.asdict(c.model) == ({**MODEL, "name": arch, "kwargs": {}} if arch in ADAM_ARCHS else MODEL)
    assert stage(c.pretrain) == PRETRAIN
    assert stage(c.task) == (TASK_CIFAR_ADAM if arch in ADAM_ARCHS else TASK_CIFAR)  # unused: no tasks
    assert (c.data.name, c.pretrained) == ("imagenet", None)
    t = c.trainer
    assert (t.accelerator, t.devices, t.num_nodes, t.strategy, t.sync_batchnorm, t.precision) == \
        ("gpu", 8, 1, "ddp", True, "16-mixed")
    assert c.pretrain.batch_size // t.devices == 256


def test_resnet18_sizes_match_the_reference():
    model = convert(create_model("resnet18", num_classes=1000, **MODEL["kwargs"]), pool_size=16)
    layers = dict(nws_layers(model))
    convs = {n: layer for n, layer in layers.items() if n != "fc"}
    assert len(layers) == 21 and model.maxpool.__class__.__name__ == "Identity"
    assert sum(layer.num_kernels for layer in convs.values()) == 1_392_832
    assert sum(layer.weight.numel() for layer in convs.values()) == 11_166_912
    assert layers["fc"].num_kernels == 512 * 1000


TINY = ["--model.pool_size", "16", "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy",
        "auto", "--trainer.sync_batchnorm", "false", "--trainer.precision", "32-true", "--trainer.logger", "none",
        "--trainer.progress_bar", "false", "--data.num_workers", "0"]


PRETRAINING = {"resnet18": "pretrain_pools_imagenet_resnet18.yaml",
               **{a: f"pretrain_pools_subimagenet_{a}.yaml" for a in ADAM_ARCHS}}


@pytest.fixture(scope="module")
def pretraining_runs(tmp_path_factory) -> Callable[[str], Path]:
    """The pool-pretraining config of a backbone on generated ImageNet folders (4 classes), tiny; each run once."""
    tmp = tmp_path_factory.mktemp("imagenet")
    root = make_image_folders(tmp / "data", [f"n0{i}" for i in range(4)], {"train": 6, "val": 2}, size=(40, 30))
    runs: dict[str, Path] = {}

    def run(arch: str) -> Path:
        if arch not in runs:
            out = tmp / f"pretrain_{arch}"
            assert main(["run", "--config", str(CONFIGS / PRETRAINING[arch]), "--data.root", str(root),
                         "--out", str(out), "--data.image_size", "32", "--pretrain.epochs", "1",
                         "--pretrain.batch_size", "8", *TINY]) == 0
            runs[arch] = out
        return runs[arch]

    return run


@pytest.fixture(scope="module")
def pretrained(pretraining_runs) -> Path:
    return pretraining_runs("resnet18")


@pytest.mark.parametrize("arch", PRETRAINING)
def test_pretraining_alone_writes_pools_and_network(pretraining_runs, arch):
    pretrained = pretraining_runs(arch)
    store = TaskStore(pretrained)
    assert store.tasks() == [] and store.spec().num_classes == 4 and store.spec().name == arch
    assert store.manifest["source"]["name"] == "imagenet" and 0 <= store.manifest["source"]["accuracy"] <= 1
    assert not (pretrained / "checkpoints").exists()


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    make_cifar100_archive(root, train=3, test=1)
    return root


@pytest.fixture(scope="module")
def cub_root(tmp_path_factory) -> Path:
    return make_cub2sketches(tmp_path_factory.mktemp("cub") / "data")


# Tasks learned per backbone: ResNet-18 two (task 1 starts from task 0 rebuilt from storage), the others one,
# which keeps CI short (MobileNetV2 and VGG16-BN take about as long as ResNet-18 on a CPU).
CIFAR_TASKS = {"resnet18": 2, "mobilenet_v2": 1, "vgg16_bn": 1}


@pytest.mark.parametrize("arch", PRETRAINING)
def test_split_cifar100_config_end_to_end(pretraining_runs, arch, cifar_root, tmp_path):
    pretrained, out = pretraining_runs(arch), tmp_path / "run"
    assert main(["run", "--config", str(CONFIGS / f"split_cifar100_{arch}.yaml"), "--data.root", str(cifar_root),
                 "--out", str(out), "--pretrained", str(pretrained), "--data.num_tasks", str(CIFAR_TASKS[arch]),
                 "--task.epochs", "1", *TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [t["name"] for t in results["tasks"]] == ["aquatic_mammals", "fish"][: CIFAR_TASKS[arch]]
    assert all(len(t["classes"]) == 5 and t["acc_from_storage"] == t["acc_after_training"] for t in results["tasks"])
    # The run's pools are the pretraining run's, byte for byte.
    assert (out / "pools.safetensors").read_bytes() == (pretrained / "pools.safetensors").read_bytes()
    assert results["source"]["pretrained"] == str(pretrained)
    assert results["config"]["task"]["optimizer"] == ("sgd" if arch == "resnet18" else "adam")


@pytest.mark.parametrize("arch", PRETRAINING)
def test_cub2sketches_config_end_to_end(pretraining_runs, arch, cub_root, tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--config", str(CONFIGS / f"cub2sketches_{arch}.yaml"), "--data.root", str(cub_root),
                 "--out", str(out), "--pretrained", str(pretraining_runs(arch)), "--data.num_tasks", "1",
                 "--task.epochs", "1", "--data.image_size", "32", *TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [(t["name"], len(t["classes"])) for t in results["tasks"]] == [("cubs_cropped", 200)]
    assert results["config"]["task"]["optimizer"] == ("sgd" if arch == "resnet18" else "adam")


def test_pretrained_run_must_match_the_model(pretrained, cifar_root, tmp_path, capsys):
    assert main(["run", "--config", str(CONFIGS / "split_cifar100_resnet18.yaml"), "--data.root", str(cifar_root),
                 "--out", str(tmp_path / "run"), "--pretrained", str(pretrained), *TINY,
                 "--model.pool_size", "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "K=16" in err and "K=32" in err
    assert main(["run", "--config", str(CONFIGS / "split_cifar100_resnet18.yaml"), "--data.root", str(cifar_root),
                 "--out", str(tmp_path / "run"), "--pretrained", "null", *TINY]) == 2
    assert "data.source is none" in capsys.readouterr().err


def test_launch_two_seeds_locally_then_report(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["launch", "--config", str(CONFIGS / "digits_convnet.yaml"), "--seeds", "1993", "1994", "--out", str(out),
                 "--parallel", "--pretrain.epochs", "1", "--task.epochs", "1", "--model.pool_size", "16",
                 "--trainer.logger", "none", "--trainer.progress_bar", "false", "--data.num_tasks", "1"]) == 0
    printed = capsys.readouterr().out
    for seed in (1993, 1994):
        results = json.loads((out / f"seed_{seed}" / "results.json").read_text())
        assert results["seed"] == seed and len(results["tasks"]) == 1
    assert "seed 1993: job" in printed and "seed 1994: job" in printed
    assert "±" in printed and (out / "report" / "report.md").is_file()


def test_launch_errors_are_one_line(tmp_path, capsys):
    base = ["launch", "--config", str(CONFIGS / "digits_convnet.yaml"), "--out", str(tmp_path)]
    assert main([*base, "--seeds", "1", "1"]) == 2
    assert main([*base, "--seeds", "1", "--slurm", "partition=gpu,gpu=8"]) == 2
    assert main([*base, "--seeds", "1", "--task.epochs", "many"]) == 2
    assert main([*base, "--seeds", "1", "--no_wait"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 4 and all(e.startswith("nws: error:") for e in errors)
    assert "distinct" in errors[0] and "gpu=8" in errors[1] and "task.epochs" in errors[2] and "--slurm" in errors[3]


def test_launch_on_slurm_submits_one_array_job(tmp_path, monkeypatch, capsys):
    """With SLURM's commands stubbed: one array job of three seeds, one task per GPU, the asked resources."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$(dirname "$1")/sbatch_script.sh"\n'
                                    'echo "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    out = tmp_path / "runs"
    assert main(["launch", "--config", str(CONFIGS / "split_cifar100_resnet18.yaml"), "--seeds", "1993", "1994", "1995",
                 "--out", str(out), "--slurm", "partition=gpu,gpus=2,nodes=1,hours=1.5,cpus=8", "--no_wait",
                 "--data.root", "/data/cifar"]) == 0
    printed = capsys.readouterr().out
    assert [f"seed {s}: SLURM job 4242_{i}" in printed for i, s in enumerate((1993, 1994, 1995))] == [True] * 3
    assert f"nws report {out / 'seed_1993'} {out / 'seed_1994'} {out / 'seed_1995'}" in printed
    script = (out / "launch" / "sbatch_script.sh").read_text()
    for line in ("--array=0-2", "--partition=gpu", "--gpus-per-node=2", "--ntasks-per-node=2", "--nodes=1",
                 "--cpus-per-task=8", "--time=90"):
        assert f"#SBATCH {line}" in script, line
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["launch", "--config", str(CONFIGS / "digits_convnet.yaml"), "--seeds", "1", "--out", str(tmp_path / "x"),
                 "--slurm", "gpus=1"]) == 2
    assert "no SLURM here" in capsys.readouterr().err
