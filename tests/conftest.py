import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; the variable
# must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _gloo_process(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


@pytest.fixture
def gloo():
    """``gloo(fn, world, *args)`` runs ``fn(rank, world, *args)`` (a module-level function) in
    ``world`` spawned CPU processes joined in a gloo process group, and waits for them."""

    def run(fn, world, *args):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_gloo_process, args=(world, port, fn, args), nprocs=world, join=True)

    return run
