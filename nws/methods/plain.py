"""What the baselines share: a plain (unsearched) backbone, its parts and masks on disk, its reader and source stage.

A baseline's manifest names its ``model`` (builder name and arguments). Memory is counted from the files that
must be kept to serve every task: the method's shared files plus one file per task; the source-pretrained
network (``source.safetensors``) is the common starting point and is not counted, as NWS does not count its
own. A network that changes with every task (fine-tuning, PackNet) is never rewritten in place: the one after
task ``i`` is a new ``network_00i.safetensors``, current once task ``i`` is listed, and only then is the
previous one removed, so a crash leaves every listed task servable.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from nws.config import ConfigError, RunConfig
from nws.errors import StoreError
from nws.engine import task_seed
from nws.methods.base import Context, Method, Saved, classifier_name
from nws.models import create_model
from nws.store import SOURCE, RunStore, task_file
from nws.spec import is_int
from nws.container import (STATE_STORAGE, check_state, flatten_state, is_number, meta_entry, nbytes, pack_file,
                           unflatten_state)

# ----------------------------------------------------------------------------------- model parts


def masked_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers PackNet prunes and Piggyback masks: every Conv2d and Linear except the classifier."""
    head = classifier_name(model)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n != head]


def state_parts(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """The float state split into ``head`` (classifier), ``batchnorm`` and ``body`` (everything else).

    Integer buffers (BatchNorm's ``num_batches_tracked``) are left out: inference does not use them.
    """
    head = classifier_name(model) + "."
    bn = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, _BatchNorm))
    parts: dict[str, dict[str, Tensor]] = {"head": {}, "batchnorm": {}, "body": {}}
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            continue
        part = "head" if key.startswith(head) else "batchnorm" if key.startswith(bn) else "body"
        parts[part][key] = value.detach().clone()
    return parts


def pack_masks(masks: dict[str, Tensor]) -> Tensor:
    """Binary masks, one bit per weight (layer order, row-major), as a uint8 tensor."""
    flat = np.concatenate([m.detach().cpu().numpy().astype(bool).ravel() for m in masks.values()]) \
        if masks else np.zeros(0, bool)
    return torch.from_numpy(np.packbits(flat))


def unpack_masks(bits: Tensor, shapes: dict[str, list[int]], what: str) -> dict[str, Tensor]:
    """Inverse of :func:`pack_masks` for layers of ``shapes``."""
    sizes = [int(np.prod(s)) for s in shapes.values()]
    if bits.dtype != torch.uint8 or bits.dim() != 1:
        raise StoreError(f"{what}: masks are not a 1-D uint8 tensor")
    flat = np.unpackbits(bits.numpy())
    if len(flat) != 8 * ((sum(sizes) + 7) // 8):
        raise StoreError(f"{what}: masks have {len(flat)} bits, the layers need {sum(sizes)}")
    out, pos = {}, 0
    for (name, shape), size in zip(shapes.items(), sizes):
        out[name] = torch.from_numpy(flat[pos : pos + size].astype(bool)).reshape(shape)
        pos += size
    return out


def mask_density(masks: dict[str, Tensor]) -> float:
    """Fraction of the masked weights the masks keep."""
    return sum(int(m.sum()) for m in masks.values()) / max(sum(m.numel() for m in masks.values()), 1)


def prefixed(prefix: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def batchnorm_tensors(state: dict[str, Tensor], storage: str) -> dict[str, Tensor]:
    """A network's BatchNorm ``state`` as its file stores it (``model.bn_dtype``): float32, one tensor per entry
    (``batchnorm.<key>``); otherwise flattened (:func:`nws.container.flatten_state`: float16, bfloat16, or int8
    for BatchNorm folded onto its grid)."""
    return prefixed("batchnorm", state) if storage == "float32" else flatten_state("batchnorm", state, storage)


def batchnorm_state(tensors: dict[str, Tensor], model: nn.Module, what: str) -> dict[str, Tensor]:
    """Inverse of :func:`batchnorm_tensors` for ``model``'s BatchNorm."""
    mine = {k: v for k, v in tensors.items() if k.startswith("batchnorm.")}
    if not any(k.removeprefix("batchnorm.") in STATE_STORAGE + ("exp",) for k in mine):
        return unprefixed("batchnorm", mine)
    return unflatten_state(mine, "batchnorm", state_parts(model)["batchnorm"], what)


def unprefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def weight_key(name: str) -> str:
    """The state-dict key of layer ``name``'s weight."""
    return f"{name}.weight" if name else "weight"


def network_file(index: int) -> str:
    """The shared network after task ``index`` of a method that changes it with every task."""
    return f"network_{index:03d}.safetensors"


def task_sizes(size: int, tensors: dict[str, Tensor]) -> dict[str, int]:
    """A task file's size split into ``weights`` / ``masks`` / ``batchnorm`` / ``other`` (header), summing to it."""
    sizes = {"weights": nbytes(v for k, v in tensors.items() if k.startswith(("head.", "body."))),
             "masks": nbytes(v for k, v in tensors.items() if k == "masks"),
             "batchnorm": nbytes(v for k, v in tensors.items() if k.startswith("batchnorm."))}
    sizes["other"] = size - sum(sizes.values())
    return sizes


# ----------------------------------------------------------------------------------- the reader


class PlainStore(RunStore):
    """A baseline's run directory; ``rewrites_network``: a network file per task, the last listed one current."""

    shared: ClassVar[tuple[str, ...]] = ()  # written once
    rewrites_network: ClassVar[bool] = False

    @classmethod
    def manifest_problem(cls, manifest: dict[str, Any]) -> str | None:
        """The run's ``model`` (builder name and arguments) and each task's ``mask_density``."""
        model = manifest.get("model", {"name": "", "kwargs": {}})
        if not (isinstance(model, dict) and isinstance(model.get("name"), str)
                and isinstance(model.get("kwargs"), dict)):
            return "bad model entry"
        if not all(is_number(t.get("mask_density", 0)) for t in manifest["tasks"]):
            return "bad mask density"
        return None

    def shared_files(self) -> list[str]:
        tasks = self.manifest["tasks"]
        current = [network_file(max(t["index"] for t in tasks))] if self.rewrites_network and tasks else []
        return [*self.shared, *current]

    def kind(self, kind: str) -> str:
        return f"nws-{self.method}-{kind}"

    def network(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors and metadata of the current network (after the last listed task)."""
        return self.file(self.shared_files()[-1], self.kind("network"))

    def layer_shapes(self, meta: dict[str, Any], what: str) -> dict[str, list[int]]:
        """The masked layers' shapes recorded in a network or backbone file's metadata."""
        shapes = meta_entry(meta, "layers", what)
        if not (isinstance(shapes, dict) and all(isinstance(s, list) and all(is_int(v) and v >= 0 for v in s)
                                                 for s in shapes.values())):
            raise StoreError(f"{what} has a bad 'layers' record")
        return shapes

    def task_tensors(self, index: int) -> dict[str, Tensor]:
        """The tensors of task ``index``'s file, whose metadata must name that task."""
        entry = self.task_entry(index)
        what = str(self.root / entry["file"])
        tensors, meta = self.file(entry["file"], self.kind("task"))
        if meta_entry(meta, "index", what) != index or meta_entry(meta, "name", what) != entry["name"]:
            raise StoreError(f"{what} holds another task than the manifest lists as task {index}")
        return tensors

    def plain(self, num_classes: int) -> nn.Module:
        """A fresh plain network of the run's architecture."""
        spec = self.manifest.get("model")
        if spec is None:
            raise StoreError(f"{self.root}: its manifest lacks the run's model")
        try:
            return create_model(spec["name"], num_classes=num_classes, **spec["kwargs"])
        except (TypeError, ValueError) as err:
            raise StoreError(f"{self.root}: cannot build the run's model ({err})") from None

    def load_state(self, model: nn.Module, state: dict[str, Tensor], what: str) -> nn.Module:
        """Load ``state`` into ``model``; it must cover exactly its float entries with matching shapes and finite
        values (integer buffers may lack)."""
        expected = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        check_state(state, expected, what)
        model.load_state_dict(state, strict=False)
        return model

    def source(self, num_classes: int) -> nn.Module:
        """The source-pretrained backbone."""
        tensors, _ = self.file(SOURCE, "nws-source-plain")
        model = self.plain(num_classes)
        return self.load_state(model, {k: v for k, v in tensors.items() if v.is_floating_point()},
                               str(self.root / SOURCE))


# ----------------------------------------------------------------------------------- the method


class PlainMethod(Method):
    """A baseline: the plain backbone trained on the source task with the ``pretrain`` schedule is the common
    start, the same for every baseline (:meth:`source_key`): ``nws demo --compare`` trains it once and hands it
    to the others as ``shared_source``."""

    store_class: ClassVar[type[PlainStore]]
    source_files = (SOURCE,)

    @classmethod
    def check(cls, config: RunConfig) -> None:
        if config.pretrained:
            raise ConfigError(f"pretrained: method {cls.name} pretrains its plain backbone on the source task "
                              "itself; unset pretrained (a pool-pretraining run serves NWS only)")
        if str(config.trainer.devices) not in ("1", "auto") or config.trainer.num_nodes != 1:
            raise ConfigError(f"trainer.devices: method {cls.name} trains in one process; set trainer.devices 1 "
                              "and trainer.num_nodes 1")
        for stage in ("pretrain", "task"):
            if getattr(config, stage).sparsity:
                raise ConfigError(f"{stage}.sparsity: method {cls.name} has no pools to pull kernels towards; set "
                                  f"{stage}.sparsity 0")

    def __init__(self, ctx: Context, shared_source: nn.Module | None = None):
        super().__init__(ctx, shared_source)
        if ctx.benchmark.source is None:
            raise ConfigError(f"data.source is none: method {self.name} trains its plain backbone on a source task; "
                              "choose a data.source")

    @classmethod
    def source_key(cls, config: RunConfig) -> str:
        return "plain backbone"

    def manifest_fields(self) -> dict[str, Any]:
        return {"model": {"name": self.config.model.name,
                          "kwargs": {"in_channels": self.ctx.benchmark.in_channels, **self.config.model.kwargs}}}

    def pretrain(self, store: PlainStore) -> nn.Module:
        source = self.ctx.benchmark.source
        if self.shared_source is None:
            model = store.plain(len(source.classes))
            model = self.fit(model, source, self.config.pretrain, "pretrain", self.config.seed,
                             what="training the plain network on")
        else:
            model = copy.deepcopy(self.shared_source)
        store.write(SOURCE, pack_file("nws-source-plain", model.state_dict(), {"model": store.manifest["model"]}))
        self.record_source(store, model)
        return model

    def load_source(self, store: PlainStore) -> nn.Module:
        return store.source(len(self.ctx.benchmark.source.classes))

    def train_task(self, model: nn.Module, index: int, stage: str = "", **kwargs: Any) -> nn.Module:
        """Train ``model`` on task ``index`` (seeded by the run seed and the index alone)."""
        task = self.ctx.benchmark.tasks[index]
        cfg = kwargs.pop("cfg", self.config.task)
        return self.fit(model, task, cfg, f"task_{index:03d}{stage}", task_seed(self.config.seed, index), **kwargs)

    def saved(self, store: PlainStore, index: int, tensors: dict[str, Tensor], network: dict[str, Tensor] | None = None,
              network_meta: dict[str, Any] | None = None, masks: dict[str, Tensor] | None = None) -> Saved:
        """Task ``index``'s file from ``tensors``, and (methods that change it) the network after it."""
        task = self.ctx.benchmark.tasks[index]
        data = pack_file(store.kind("task"), tensors, {"index": index, "name": task.name})
        files = {task_file(index): data}
        if network is not None:
            files[network_file(index)] = pack_file(store.kind("network"), network,
                                                   {"after_task": index, **(network_meta or {})})
        record: dict[str, Any] = {"file": task_file(index), "bytes": task_sizes(len(data), tensors)}
        if masks:
            record["mask_density"] = mask_density(masks)
        return Saved(files, record)
