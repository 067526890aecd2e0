"""The Lightning engine: pool EMA under DDP (2 gloo processes), mixed precision without NaN, checkpoints
and resuming a task from its last epoch, precision and logger checks."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

from nws.cli import main
from nws.config import TrainConfig, TrainerConfig
from nws.convert import convert, nws_layers
from nws.devices import shutdown_distributed
from nws.engine import LossTerm, NonFiniteError, ParamGroup, StepAction, check_precision, fit, revert_sync_batchnorm
from nws.logs import last_checkpoint, make_logger
from nws.errors import NWSError
from nws.methods.nws import PoolEMA, nws_loss_terms
from nws.models import create_model
from nws.pool import KernelPool, all_reduce_step_statistics
from nws.exhaustive import brute_force_nearest
from nws.methods.nws import TaskStore

CPU = dict(accelerator="cpu", logger="none", progress_bar=False)


class TinyNet(nn.Module):
    """Convs and a classifier without BatchNorm, so a DDP step equals a single-process step on the global
    batch up to float rounding (per-rank BatchNorm statistics would differ)."""

    classifier_name = "fc"

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return convert(TinyNet(), pool_size=16, init="kernels", seed=3)


def nws_fit(model: nn.Module, data, cfg: TrainConfig, trainer_cfg: TrainerConfig, pretrain: bool = False,
            callbacks: list = (), **kwargs):
    """``fit`` as the NWS method trains: its loss terms, and with ``pretrain`` the pools' EMA after every step."""
    callbacks = [*([PoolEMA()] if pretrain else []), *callbacks]
    return fit(model, data, cfg, trainer_cfg, loss_terms=nws_loss_terms(model, cfg), callbacks=callbacks, **kwargs)


def tiny_data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 1, 6, 6, generator=g), torch.randint(3, (n,), generator=g))


DDP_CFG = TrainConfig(epochs=2, batch_size=16, lr=0.1)


def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    model = nws_fit(tiny_model(), tiny_data(), DDP_CFG, TrainerConfig(devices=2, strategy="ddp", checkpoint=False,
                                                                      **CPU),
                    pretrain=True, log_dir=Path(out), name="ddp", seed=7).model
    torch.save(model.state_dict(), Path(out) / f"rank{rank}.pt")
    # The reduction itself, on statistics that differ per rank: every rank ends with their mean.
    pools = [KernelPool(4, 2), KernelPool(3, 5)]
    for i, p in enumerate(pools):
        p.step_count.fill_(float(rank + i))
        p.step_sum.fill_(10.0 * rank - i)
    all_reduce_step_statistics(pools)
    torch.save([(p.step_count, p.step_sum) for p in pools], Path(out) / f"stats{rank}.pt")
    shutdown_distributed()
    assert not torch.distributed.is_initialized()


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_ddp_pools_identical_on_ranks_and_equal_to_one_process(tmp_path):
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # identical pools (and weights) on both
    # One process on the same global batch (16 = 2 ranks x 8), the same data order.
    single = nws_fit(tiny_model(), tiny_data(), DDP_CFG, TrainerConfig(checkpoint=False, **CPU), pretrain=True,
                     log_dir=tmp_path, name="one", seed=7).model.state_dict()
    start = tiny_model().state_dict()
    for key, value in ranks[0].items():
        if ".pool." in key:
            assert not torch.equal(value, start[key]), key  # the pools did move
        if key.endswith("cluster_size"):
            assert torch.equal(value, single[key]), key  # counts exactly: a sum over ranks would double them
        else:
            torch.testing.assert_close(value, single[key], rtol=0, atol=1e-6)
    for r in (0, 1):
        stats = torch.load(tmp_path / f"stats{r}.pt", weights_only=True)
        assert torch.equal(stats[0][0], torch.full((4,), 0.5)) and torch.equal(stats[0][1], torch.full((4, 2), 5.0))
        assert torch.equal(stats[1][0], torch.full((3,), 1.5)) and torch.equal(stats[1][1], torch.full((3, 5), 4.0))


def _big_model() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("convnet", num_classes=4, in_channels=3, widths=(16, 32))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(300.0 / m.weight.abs().mean())  # |w| ~ 300: a kernel's squared norm ~ 1e6
    return convert(model, pool_size=32, init="kernels", seed=1)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_pretraining_stays_finite(tmp_path, precision):
    """Weights of |w| ~ 300, where the reference's half-precision search overflows: the pools stay fp32, finite,
    and every searched entry is the exact nearest one."""
    model = _big_model()
    kernels = next(layer for _, layer in nws_layers(model)).kernels().detach()
    assert torch.isinf((kernels.half() ** 2).sum(1)).any()  # squared distances overflow in half precision
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 8, 8, generator=g), torch.randint(4, (32,), generator=g))
    out = nws_fit(model, data, TrainConfig(epochs=1, batch_size=8, lr=1e-4),
                  TrainerConfig(precision=precision, checkpoint=False, **CPU), pretrain=True, log_dir=tmp_path,
                  name="amp").model
    for name, layer in nws_layers(out):
        pool = layer.pool
        assert pool.codebook.dtype == pool.cluster_size.dtype == pool.embed_sum.dtype == torch.float32, name
        assert layer.weight.dtype == torch.float32, name
        assert torch.isfinite(pool.codebook).all() and torch.isfinite(pool.embed_sum).all(), name
        assert torch.equal(layer.search(), brute_force_nearest(layer.kernels().detach(), pool.codebook)), name


class _Overflow(L.Callback):
    """Makes the loss of step ``at`` overflow in fp16 (its inputs scaled far beyond fp16's range)."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            batch[0].mul_(1e30)


def _tiny_fit(tmp_path, precision: str, callbacks: list, **trainer):
    return nws_fit(tiny_model(), tiny_data(), TrainConfig(epochs=1, batch_size=16, lr=0.1),
                   TrainerConfig(precision=precision, checkpoint=False, **CPU, **trainer), log_dir=tmp_path, name="t",
                   callbacks=callbacks)


def test_an_overflowing_step_is_skipped_and_counted_under_the_scaler(tmp_path):
    fitted = _tiny_fit(tmp_path, "16-mixed", [_Overflow(1)])
    assert fitted.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in fitted.model.parameters())


def test_overflow_stops_at_once_without_a_scaler(tmp_path):
    with pytest.raises(NonFiniteError, match=r"non-finite loss \(ce [^,]+, commit "):
        _tiny_fit(tmp_path, "32-true", [_Overflow(1)])


def test_too_many_skipped_steps_in_a_row_stop(tmp_path):
    class Always(_Overflow):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            batch[0].mul_(1e30)

    with pytest.raises(NonFiniteError, match="in a row overflowed"):
        _tiny_fit(tmp_path, "16-mixed", [Always(0)], max_skipped_steps=2)


def test_a_non_finite_weight_stops_under_the_scaler_too(tmp_path):
    class Poison(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            with torch.no_grad():
                pl_module.model.conv2.weight[0, 0, 0, 0] = float("nan")

    with pytest.raises(NonFiniteError, match="non-finite weight conv2.weight"):
        _tiny_fit(tmp_path, "16-mixed", [Poison()])


def test_a_method_adds_loss_terms_parameter_groups_and_step_actions(tmp_path):
    """The engine's hooks, with no method behind them: an extra loss term is added with its weight and logged;
    a parameter group is stepped by its own optimizer, and a non-finite value in it is named by the group; a
    step action runs after every optimizer step."""
    torch.manual_seed(0)
    extra = nn.Parameter(torch.zeros(3))
    pull = LossTerm("pull", 2.0, lambda m: (extra - 1).pow(2).sum())  # gradient 4 (extra - 1)
    group = ParamGroup("the shifts", [extra], lambda ps: torch.optim.SGD(ps, lr=0.25))
    steps, logged = [], []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append(set(trainer.callback_metrics))

    fit(TinyNet(), tiny_data(32), TrainConfig(epochs=1, batch_size=16), TrainerConfig(checkpoint=False, **CPU),
        log_dir=tmp_path, name="t", loss_terms=[pull], param_groups=[group],
        callbacks=[StepAction(lambda: steps.append(extra.detach().clone())), Spy()])
    assert [s.tolist() for s in steps] == [[1.0] * 3, [1.0] * 3]  # 0 - 0.25 * 4 * (0 - 1), then at rest
    assert all({"ce", "pull", "loss"} <= names for names in logged) and len(logged) == 2
    with torch.no_grad():
        extra.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="non-finite weight a parameter of the shifts"):
        fit(TinyNet(), tiny_data(32), TrainConfig(epochs=1, batch_size=16), TrainerConfig(checkpoint=False, **CPU),
            log_dir=tmp_path, name="u", param_groups=[group])


@pytest.mark.parametrize("precision", ["16-true", "bf16-true", "fp8"])
def test_half_precision_weights_are_refused(precision):
    with pytest.raises(NWSError, match="pools stay fp32"):
        check_precision(precision)


def test_missing_logger_package_is_one_line(tmp_path, monkeypatch):
    for kind in ("tensorboard", "wandb"):
        monkeypatch.setitem(__import__("sys").modules, kind, None)  # as if the package were not installed
        with pytest.raises(NWSError, match=f"pip install {kind}"):
            make_logger(TrainerConfig(logger=kind), tmp_path, "x")
    with pytest.raises(NWSError, match="trainer.logger must be one of"):
        make_logger(TrainerConfig(logger="mlflow"), tmp_path, "x")


class _Crash(L.Callback):
    """Stops training at the start of epoch ``at`` (after epoch ``at - 1`` was checkpointed)."""

    def __init__(self, at: int):
        self.at = at

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.at:
            raise KeyboardInterrupt


def test_resume_from_a_mid_task_checkpoint_equals_an_uninterrupted_fit(tmp_path):
    model = lambda: convert(create_model("convnet", num_classes=3, in_channels=1, widths=(8, 16)),  # noqa: E731
                            pool_size=16, init="kernels")
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(48, 1, 8, 8, generator=g), torch.randint(3, (48,), generator=g))
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.1, milestones=[0.5])  # lr decays at epoch 1
    trainer_cfg = TrainerConfig(**CPU)
    torch.manual_seed(0)
    full = nws_fit(model(), data, cfg, trainer_cfg, pretrain=True, log_dir=tmp_path, name="a",
                   checkpoint_dir=tmp_path / "a", seed=5).model
    torch.manual_seed(0)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        nws_fit(model(), data, cfg, trainer_cfg, pretrain=True, log_dir=tmp_path, name="b",
                checkpoint_dir=tmp_path / "b", seed=5, callbacks=[_Crash(1)])
    checkpoint = last_checkpoint(tmp_path / "b")
    assert checkpoint is not None and torch.load(checkpoint, weights_only=True)["epoch"] == 0
    torch.manual_seed(1)  # a different start: everything comes from the checkpoint
    resumed = nws_fit(model(), data, cfg, trainer_cfg, pretrain=True, log_dir=tmp_path, name="b",
                      checkpoint_dir=tmp_path / "b", resume_from=checkpoint, seed=5).model
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # weights, pools, EMA, BatchNorm
    with pytest.raises(NWSError, match="does not exist"):
        nws_fit(model(), data, cfg, trainer_cfg, pretrain=True, log_dir=tmp_path, name="c",
                resume_from=tmp_path / "none")
    (tmp_path / "bad.ckpt").write_bytes(b"garbage")
    with pytest.raises(NWSError, match="unreadable"):
        nws_fit(model(), data, cfg, trainer_cfg, pretrain=True, log_dir=tmp_path, name="c",
                resume_from=tmp_path / "bad.ckpt")


SMALL = ["--pretrain.epochs", "1", "--task.epochs", "2", "--model.pool_size", "16", "--trainer.logger", "none",
         "--trainer.progress_bar", "false", "--data.num_tasks", "2"]


def test_resumed_run_continues_the_interrupted_task_from_its_checkpoint(tmp_path, capsys):
    """A real run killed (SIGKILL) once task 1 has an epoch checkpoint resumes that task from it."""
    out = tmp_path / "cut"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nws.cli", "demo", "--out", str(out), *SMALL, "--task.epochs", "30"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint, deadline = out / "checkpoints" / "task_001" / "last.ckpt", time.monotonic() + 600
    while not checkpoint.is_file():
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before {checkpoint} appeared"
        assert time.monotonic() < deadline, f"{checkpoint} did not appear within 600 s"
        time.sleep(0.05)
    proc.kill()
    proc.wait(60)
    assert checkpoint.is_file()
    assert main(["demo", "--out", str(out), "--resume", *SMALL, "--task.epochs", "30"]) == 0
    assert "continuing from" in capsys.readouterr().out
    assert not (out / "checkpoints").exists()


def test_the_progress_bar_names_the_stage_on_a_terminal(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    fit(tiny_model(), tiny_data(32), TrainConfig(epochs=2, batch_size=16),
        TrainerConfig(accelerator="cpu", logger="csv", checkpoint=False), log_dir=tmp_path, name="task_007")
    shown = "".join(capfd.readouterr())  # tqdm writes to stdout under Lightning
    assert "task_007 epoch 1/2" in shown and "task_007 epoch 2/2" in shown and "v_num" not in shown
    assert "[task_007] epoch" not in shown


def test_elsewhere_each_epoch_is_one_line(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    fit(tiny_model(), tiny_data(32), TrainConfig(epochs=2, batch_size=16),
        TrainerConfig(accelerator="cpu", logger="csv", checkpoint=False), log_dir=tmp_path, name="task_007")
    out, err = capfd.readouterr()
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["[task_007] epoch 1/2", "[task_007] epoch 2/2"], out
    assert all(re.fullmatch(r"\[task_007\] epoch \d/2: loss \d+\.\d{4}, \d+\.\d s", line) for line in lines)
    assert "\r" not in out + err and "%" not in out + err


def test_revert_sync_batchnorm():
    model = create_model("convnet", num_classes=2, in_channels=1, widths=(4,))
    model.features[1].running_mean.fill_(3.0)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    plain = revert_sync_batchnorm(synced)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in plain.modules())
    assert torch.equal(plain.features[1].running_mean, torch.full((4,), 3.0))
    assert plain(torch.randn(2, 1, 8, 8)).shape == (2, 2)


def test_ddp_run_of_the_whole_learner(tmp_path):
    """``nws run`` on 2 CPU processes (Lightning's DDP launcher re-runs the command): rank 0 writes the run,
    rank 1 follows; the run is complete and readable."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "nws.cli", "run", "--config", "configs/digits_convnet.yaml",
                           "--out", str(tmp_path / "ddp"), *SMALL, "--task.epochs", "1", "--trainer.accelerator", "cpu",
                           "--trainer.devices", "2", "--trainer.strategy", "ddp"],
                          capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("[task_001] learning") == 1  # only rank 0 reports
    store = TaskStore(tmp_path / "ddp")
    assert [t["index"] for t in store.tasks()] == [0, 1]
    assert all(t["acc_from_storage"] == t["acc_after_training"] for t in store.tasks())
