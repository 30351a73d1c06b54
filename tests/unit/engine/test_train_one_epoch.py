"""engine_transdiff.train_one_epoch's conventions, pinned: the EMA moves at --ema_rate after every optimizer step
(e <- rate * e + (1 - rate) * w), and the callback sees every optimizer step."""
import logging

import pytest
import torch

import main
from engine_transdiff import TrainingMonitor, train_one_epoch
from models.tokenizers import PixelTokenizer
from tests.support.runs import TINY
from util.execution.wrap import wrap_model
from util.logger import TensorboardWriter
from util.optim import EMA, build_optimizer
from util.settings import get_args_parser, resolve_args


@pytest.mark.parametrize("rate", [0.0, 0.9])
def test_the_ema_moves_at_its_rate_after_every_optimizer_step(rate):
    args = resolve_args(get_args_parser().parse_args([*TINY, "--ema_rate", str(rate), "--lr", "1e-2",
                                                      "--warmup_epochs", "0", "--label_drop_prob", "0"]))
    torch.manual_seed(0)
    model = main.build_model(args)
    torch.nn.init.normal_(model.diffdecoder.net.final_layer.linear.weight, std=0.02)  # gradients everywhere
    ema, optimizer = EMA(model), build_optimizer(model, args.lr, args.weight_decay)
    images = torch.rand(2, 4, 3, 16, 16) * 2 - 1  # 2 batches of 4 images [B, 3, H, W]
    loader = [(images[k], torch.tensor([0, 1, 2, 0])) for k in range(2)]
    seen = []

    def after_step(done):
        seen.append((done, {n: p.detach().clone() for n, p in model.named_parameters()},
                     {n: p.detach().clone() for n, p in ema.module.named_parameters()}))

    expected = {n: p.detach().clone() for n, p in ema.module.named_parameters()}
    train_one_epoch(wrap_model(model, torch.device("cpu")), ema, PixelTokenizer(stride=2), loader, optimizer,
                    torch.amp.GradScaler("cpu", enabled=False), 0, args, torch.device("cpu"),
                    main.autocast_context("fp32", "cpu"), TensorboardWriter(None, enabled=False),
                    logging.getLogger("test"), TrainingMonitor(torch.device("cpu"), 4, 1.0), steps_per_epoch=2,
                    after_optimizer_step=after_step)
    assert [done for done, _, _ in seen] == [1, 2]
    for _, weights, averaged in seen:
        assert any(not torch.equal(weights[n], expected[n]) for n in weights)  # the weights did move
        for name in expected:
            expected[name] = expected[name] * rate + weights[name] * (1 - rate)
            torch.testing.assert_close(averaged[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)  # rounding
    if rate == 0.0:
        assert all(torch.equal(seen[-1][2][n], seen[-1][1][n]) for n in expected)
