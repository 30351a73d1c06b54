"""util.lr_sched and util.optim: schedule values, decay groups, EMA maths and precision."""
import math

import pytest
import torch

import util.optim
from util.lr_sched import LrSchedule, absolute_lr, adjust_learning_rate, lr_at
from util.optim import (
    EMA,
    build_grad_scaler,
    build_optimizer,
    full_state_dict,
    param_groups_weight_decay,
)


def _schedule(schedule="constant"):
    return LrSchedule(lr=8e-4, warmup_epochs=10, epochs=110, schedule=schedule, min_lr=1e-5)


def test_warmup_is_linear_per_iteration():
    assert lr_at(0.0, 1.0, 10, 100) == 0.0
    assert lr_at(2.5, 1.0, 10, 100) == pytest.approx(0.25)
    assert lr_at(9.99, 1.0, 10, 100) == pytest.approx(0.999)


def test_constant_after_warmup():
    assert lr_at(10.0, 1.0, 10, 100) == 1.0
    assert lr_at(99.5, 1.0, 10, 100, min_lr=0.1) == 1.0


def test_cosine_decays_from_lr_to_min_lr():
    assert lr_at(10.0, 1.0, 10, 110, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_at(60.0, 1.0, 10, 110, "cosine", 0.1) == pytest.approx(0.55)
    assert lr_at(35.0, 1.0, 10, 110, "cosine", 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110.0, 1.0, 10, 110, "cosine", 0.1) == pytest.approx(0.1)


def test_unknown_schedule_raises():
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_at(20.0, 1.0, 10, 100, "linear")


def test_adjust_learning_rate_sets_groups_and_respects_lr_scale():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:], "lr_scale": 0.5}], lr=1.0)
    lr = adjust_learning_rate(optimizer, 5.0, _schedule())
    assert lr == pytest.approx(4e-4)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([4e-4, 2e-4])
    assert adjust_learning_rate(optimizer, 60.0, _schedule("cosine")) == pytest.approx(
        1e-5 + (8e-4 - 1e-5) * 0.5 * (1 + math.cos(math.pi / 2)))


def test_absolute_lr_scales_blr_only_when_lr_is_missing():
    assert absolute_lr(None, 1e-4, 2048) == pytest.approx(8e-4)
    assert absolute_lr(5e-5, 1e-4, 2048) == 5e-5


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, 4))
        self.proj = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, 3, 4))
        self.diffdecoder = torch.nn.Sequential(torch.nn.Linear(4, 4))
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return sorted(name for name, p in model.named_parameters() if id(p) in ids)


def test_weight_decay_groups_follow_the_original_rule():
    model = _Toy()
    groups, summary = param_groups_weight_decay(model, 0.02, skip_list=("pos_embed",))
    no_decay, decay = groups
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.02
    assert _names(model, no_decay) == ["diffdecoder.0.bias", "diffdecoder.0.weight", "norm.bias",
                                       "norm.weight", "pos_embed", "proj.bias"]
    assert _names(model, decay) == ["mask_token", "proj.weight"]
    assert summary == "weight decay 0.02 on 2 tensors (20 params); none on 6 tensors (44 params)"


def test_build_optimizer_is_adamw_with_original_betas():
    optimizer = build_optimizer(_Toy(), lr=1e-4, weight_decay=0.02)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["betas"] for g in optimizer.param_groups] == [(0.9, 0.95)] * 2
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.02]


def test_build_optimizer_keeps_empty_decay_group_when_only_decoder_trains():
    model = _Toy()
    for name, param in model.named_parameters():
        param.requires_grad_("diffdecoder" in name)
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.02)
    assert [len(g["params"]) for g in optimizer.param_groups] == [2, 0]


def test_ema_update_math_covers_all_parameters():
    torch.manual_seed(0)
    model = _Toy()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    ema = EMA(model)
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(1.0)
    ema.update(model, decay=0.9)
    ema.update(model, decay=0.5)
    state = ema.state_dict()
    assert set(state) == set(initial)
    for name, start in initial.items():  # frozen parameters are averaged too
        expected = 0.5 * (0.9 * start + 0.1) + 0.5
        assert torch.allclose(state[name], expected), name
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_update_is_bit_identical_to_the_per_parameter_loop():
    torch.manual_seed(0)
    model = _Toy()
    ema = EMA(model)
    expected = {name: p.detach().clone() for name, p in ema.module.named_parameters()}
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()
    ema.update(model, decay=0.9999)
    for name, param in model.named_parameters():  # the original's loop
        expected[name].mul_(0.9999).add_(param.detach(), alpha=1 - 0.9999)
    for name, value in ema.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_ema_stays_float32_for_a_bfloat16_model():
    model = _Toy().to(torch.bfloat16)
    ema = EMA(model)
    assert all(p.dtype == torch.float32 for p in ema.module.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        model.proj.weight.fill_(1.0)
        ema.module.proj.weight.fill_(0.0)
    for _ in range(10):
        ema.update(model, decay=0.9999)
    # 10 steps of 1e-4 towards 1.0; a bfloat16 average could not resolve these increments.
    assert torch.allclose(ema.module.proj.weight, torch.full((4, 4), 1 - 0.9999 ** 10), rtol=1e-4)
    assert ema.state_dict()["proj.weight"].dtype == torch.float32


def test_ema_load_state_dict_round_trip():
    ema = EMA(_Toy())
    other = EMA(_Toy())
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), other.state_dict().values(), strict=True))
    with pytest.raises(RuntimeError):
        other.load_state_dict({"proj.weight": torch.zeros(4, 4)})


def test_a_bias_of_any_shape_is_not_decayed():
    model = torch.nn.Module()
    model.scale = torch.nn.Module()
    model.scale.bias = torch.nn.Parameter(torch.zeros(2, 3))  # 2-D, yet a bias
    model.weight = torch.nn.Parameter(torch.zeros(2, 3))
    model.biased = torch.nn.Parameter(torch.zeros(2, 3))  # the name must end in ".bias"
    no_decay, decay = param_groups_weight_decay(model, 0.1)[0]
    assert (_names(model, no_decay), _names(model, decay)) == (["scale.bias"], ["biased", "weight"])


def test_build_optimizer_passes_its_settings_and_prints_them(capsys):
    optimizer = build_optimizer(_Toy(), lr=3e-4, weight_decay=0.02, skip_list=("pos_embed",))
    assert optimizer.defaults["lr"] == 3e-4 and optimizer.defaults["fused"] is True  # CPU is the default device
    assert len(optimizer.param_groups[0]["params"]) == 6  # pos_embed skipped, as asked
    assert capsys.readouterr().out == ("optimizer: AdamW (fused) lr 0.0003 betas (0.9, 0.95); weight decay 0.02 on 2 "
                                       "tensors (20 params); none on 6 tensors (44 params)\n")
    elsewhere = build_optimizer(_Toy(), lr=1e-4, weight_decay=0.0, device_type="xpu")  # no fused AdamW there
    assert elsewhere.defaults["foreach"] is True and not elsewhere.defaults["fused"]
    assert capsys.readouterr().out.startswith("optimizer: AdamW (foreach) lr 0.0001 ")


@pytest.fixture
def one_rank_group(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_zero1_is_the_same_adamw_in_a_process_group_and_consolidates_to_its_format(one_rank_group, capsys):
    assert isinstance(build_optimizer(_Toy(), lr=1e-4, weight_decay=0.02), torch.optim.AdamW)  # only when asked
    torch.manual_seed(0)
    plain_model, sharded_model = _Toy(), _Toy()
    sharded_model.load_state_dict(plain_model.state_dict())
    plain = build_optimizer(plain_model, lr=1e-2, weight_decay=0.02)
    capsys.readouterr()
    sharded = build_optimizer(sharded_model, lr=1e-2, weight_decay=0.02, shard_state=True)
    assert isinstance(sharded, torch.distributed.optim.ZeroRedundancyOptimizer)
    assert capsys.readouterr().out.startswith("optimizer: AdamW (fused, ZeRO-1) lr 0.01 betas (0.9, 0.95); ")
    assert isinstance(sharded.optim, torch.optim.AdamW) and sharded.optim.defaults["fused"] is True
    for model, optimizer in ((plain_model, plain), (sharded_model, sharded)):
        (model.proj.weight.sum() + model.mask_token.sum()).backward()
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(plain_model.parameters(), sharded_model.parameters(), strict=True))
    consolidated, expected = full_state_dict(sharded), full_state_dict(plain)
    assert consolidated["param_groups"] == expected["param_groups"]
    assert consolidated["state"].keys() == expected["state"].keys()
    for index, state in expected["state"].items():
        assert all(torch.equal(state[key], consolidated["state"][index][key]) for key in state)


def test_the_optimizer_state_is_whole_on_rank_0_and_absent_elsewhere(monkeypatch):
    optimizer = build_optimizer(_Toy(), lr=1e-4, weight_decay=0.02)
    assert full_state_dict(optimizer)["param_groups"][1]["weight_decay"] == 0.02
    monkeypatch.setattr(util.optim, "is_main_process", lambda: False)
    assert full_state_dict(optimizer) is None


def test_the_grad_scaler_scales_only_when_enabled_on_its_device():
    scaler = build_grad_scaler(True, "cpu")
    assert scaler.is_enabled() and scaler.get_scale() == 2.0**16 and scaler._device == "cpu"
    assert scaler.scale(torch.ones(1)).item() == 2.0**16
    assert not build_grad_scaler(False, "cpu").is_enabled()
