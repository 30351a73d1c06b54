"""util.execution.wrap under a real 2-process gloo group: DDP with this project's options trains bit for bit as
DDP with torch's defaults, with gradient accumulation and an MRAR model (its mask is the one buffer)."""
import faulthandler
import os
import socket

import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from tests.support.tiny_runs import LABELS, tiny_model, training_images
from util import distributed as du
from util.execution.wrap import DDP_OPTIONS, wrap_model


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(train_module, model, rank):
    """Three optimizer steps of two accumulated micro-batches each; every rank its own data and draws."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(6):
        sync = step % 2 == 1
        with du.ddp_sync(train_module, sync):
            torch.manual_seed(100 * rank + step)  # dropout
            images = training_images(model, seed=10 * rank + step)
            loss = train_module(images, LABELS, generator=torch.Generator().manual_seed(step))
            loss.backward()
        if sync:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _worker(rank, port):
    faulthandler.enable()
    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    du.init_distributed("cpu", timeout_minutes=1)
    try:
        for mrar in (False, True):
            defaults = tiny_model(mrar=mrar, attn_dropout=0.1, proj_dropout=0.1)
            ours = tiny_model(mrar=mrar, attn_dropout=0.1, proj_dropout=0.1)
            expected = train(DistributedDataParallel(defaults), defaults, rank)
            execution = wrap_model(ours, torch.device("cpu"))
            assert isinstance(execution.train_module, DistributedDataParallel)
            ddp = execution.train_module
            assert ddp.gradient_as_bucket_view and not getattr(ddp, "forward_sync_buffers", ddp.broadcast_buffers)
            got = train(execution.train_module, ours, rank)
            for name, value in expected.items():
                assert torch.equal(got[name], value), (mrar, name)
        du.barrier()
    finally:
        du.cleanup()
    os._exit(0)  # skip the interpreter's teardown, as tests/unit/util/test_distributed.py does


def test_ddp_options_train_bit_for_bit_as_torchs_defaults():
    assert DDP_OPTIONS["gradient_as_bucket_view"] and False in DDP_OPTIONS.values()
    mp.spawn(_worker, args=(_free_port(),), nprocs=2, join=True)
