"""One compute thread per test worker: the suite runs with `-n 2` on 2 cores, and oversubscribed threads
slow small tensor ops several times over. Subprocesses inherit the setting through the environment."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
