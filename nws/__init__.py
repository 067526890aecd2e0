"""Neural Weight Search: task-incremental learning by searching frozen, layer-wise kernel pools.

A task's network is stored as indices into pretrained pools (plus its BatchNorm and biases)::

    model = nws.convert(my_model, pool_size=512)   # every Conv2d/Linear searches a pool
    ...train with loss = ce + beta * nws.commitment_loss(model)...
    codes = nws.encode(model)                      # {layer: LongTensor of pool indices}

Rate-aware search (each kernel minimises distortion + lam * the bits its task file spends, :mod:`nws.rate`)::

    nws.set_rate(model, reference_codes, lam=0.5)  # before training a task; nws.clear_rate(model) after
"""

import os

# Idle OpenMP threads (libgomp, torch's on Linux) spin 300,000 times before they sleep: when another job shares
# the CPUs, the spinning threads take them from the working ones (two demos side by side took 4.7x one alone,
# 1.8x with 1,000: benchmarks/bench_side_by_side.py). Set before torch loads libgomp; a user's setting wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

from nws.codes import code_layout, decode, encode
from nws.convert import commitment_loss, convert, freeze_pools, materialize, nws_layers, update_pools
from nws.errors import NWSError
from nws.layers import NWSConv2d, NWSLayer, NWSLinear
from nws.packing import conditional_entropy_bits, entropy_bits, pack_codes
from nws.unpacking import unpack_codes
from nws.pool import KernelPool
from nws.pool_sources import import_reference, kmeans, pools_from_model
from nws.rate import BitModel, clear_rate, estimate_model, prior_model, refresh_rate, set_rate
from nws.exhaustive import brute_force_nearest
from nws.rate_penalty import RatePenalty
from nws.search import nearest
from nws.sparsity import kernel_sparsity, sparsity_loss

__version__ = "0.1.0"

__all__ = [
    "BitModel", "KernelPool", "NWSConv2d", "NWSError", "NWSLayer", "NWSLinear", "RatePenalty", "brute_force_nearest",
    "clear_rate", "code_layout", "commitment_loss", "conditional_entropy_bits", "convert", "decode", "encode",
    "entropy_bits", "estimate_model", "freeze_pools", "import_reference", "kernel_sparsity", "kmeans", "materialize",
    "nearest", "nws_layers", "pack_codes", "pools_from_model", "prior_model", "refresh_rate", "set_rate",
    "sparsity_loss", "unpack_codes", "update_pools",
]
