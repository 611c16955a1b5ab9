import math

import pytest
import torch
import torch.nn.functional as F

from negmargin.backbones import BACKBONES, build_backbone
from negmargin.config import TrainConfig
from negmargin.errors import ConfigError
from negmargin.head import NegMarginHead
from negmargin.schedule import lr_at

# Feature size at 84×84 and trainable parameters of every backbone in the registry.
EXPECTED = {"conv4": (1600, 113_088), "resnet12": (640, 12_424_320)}


def test_every_registered_backbone_has_expected_numbers():
    assert set(EXPECTED) == set(BACKBONES)  # a new backbone must add its numbers here


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_shape_params_and_gradients(name):
    dim, params = EXPECTED[name]
    torch.manual_seed(0)
    model = build_backbone(name)
    assert model.num_features == dim
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == params
    x = torch.randn(2, 3, 84, 84)
    out = model(x)
    assert out.shape == (2, dim)
    out.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_conv4_other_sizes_and_channels():
    model = build_backbone("conv4", in_channels=1, image_size=28)
    assert model.num_features == 64 and model(torch.zeros(3, 1, 28, 28)).shape == (3, 64)


def test_reference_key_names():
    assert "layers.0.layers.0.weight" in BACKBONES["conv4"]().state_dict()
    keys = BACKBONES["resnet12"]().state_dict()
    assert "layer1.0.conv1.weight" in keys and "layer4.0.downsample.1.running_mean" in keys


def _model_forward(model, x):
    return model(x)


def _reference_forward(model, x):
    """The reference's order, activation before pooling, with the model's own modules."""
    if isinstance(model, BACKBONES["conv4"]):
        for block in model.layers:
            conv, bn = block.layers[0], block.layers[1]
            x = F.max_pool2d(F.relu(bn(conv(x))), 2)
        return x.flatten(1)
    for i in range(1, 5):
        b = getattr(model, f"layer{i}")[0]
        out = b.relu(b.norm1(b.conv1(x)))
        out = b.relu(b.norm2(b.conv2(out)))
        out = b.norm3(b.conv3(out))
        x = F.max_pool2d(b.relu(out + b.downsample(x)), 2)
    return x.mean(dim=(2, 3))


# ResNet12 channels-last only (~12 s): the layout where pooling before its LeakyReLU was
# measured to change a gradient, so the case guards against that reordering.
@pytest.mark.parametrize(("name", "channels_last"), [("conv4", False), ("conv4", True), ("resnet12", True)])
def test_backbones_are_bit_identical_to_the_reference_order(name, channels_last):
    # Conv4 pools before its ReLU (the reference: after). Five SGD steps of the model and
    # of the reference order from the same weights, on inputs made of flat 4×4 patches
    # so that pooling windows hold exact ties and all-negative maxima: every output,
    # running statistic and weight must be equal to the last bit.
    torch.manual_seed(0)
    fast = build_backbone(name, image_size=32)
    ref = build_backbone(name, image_size=32)
    ref.load_state_dict(fast.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    fast, ref = fast.to(memory_format=fmt), ref.to(memory_format=fmt)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (fast, ref)]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(6, 3, 8, 8, generator=g).repeat_interleave(4, 2).repeat_interleave(4, 3)
        x = x.contiguous(memory_format=fmt)
        outs = []
        for model, forward, opt in ((fast, _model_forward, opts[0]), (ref, _reference_forward, opts[1])):
            opt.zero_grad()
            out = forward(model, x)
            (out.sin().sum()).backward()  # a gradient of both signs
            opt.step()
            outs.append(out.detach())
        assert torch.equal(outs[0], outs[1])
    if name == "conv4":  # Conv4 pools before its ReLU: the inputs did reach the ≤ 0 windows
        assert (outs[0] == 0).any()
    for (k, a), b in zip(fast.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ConfigError, match="valid names: conv4, resnet12"):
        build_backbone("resnet18")


def test_margin_shifts_only_the_target_logit_by_exactly_T_times_m():
    torch.manual_seed(0)
    T, m = 10.0, -0.02
    head = NegMarginHead(16, 5, margin=m, temperature=T)
    x = torch.randn(4, 16)
    labels = torch.tensor([0, 3, 3, 1])
    cos = F.normalize(x) @ F.normalize(head.weight).T
    with_margin = head(x, labels)
    no_labels = head(x)
    torch.testing.assert_close(no_labels, T * cos)
    diff = with_margin - no_labels
    expected = torch.zeros_like(diff)
    expected[torch.arange(4), labels] = -T * m  # T·(cos_y − m) − T·cos_y = +0.2 for m = −0.02
    torch.testing.assert_close(diff, expected)
    assert torch.allclose(diff[torch.arange(4), labels], torch.full((4,), 0.2))


def test_positive_margin_is_refused_unless_allowed():
    with pytest.raises(ConfigError, match="margin ≤ 0"):
        NegMarginHead(8, 3, margin=0.01)
    assert NegMarginHead(8, 3, margin=0.01, allow_positive_margin=True).margin == 0.01


def test_softmax_variant_subtracts_row_minimum():
    torch.manual_seed(1)
    head = NegMarginHead(6, 4, metric="softmax", margin=-0.5, temperature=2.0)
    x = torch.randn(3, 6)
    s = x @ head.weight.T
    s = s - s.min(dim=1, keepdim=True).values
    assert torch.allclose(head.similarity(x).min(dim=1).values, torch.zeros(3))
    labels = torch.tensor([2, 0, 1])
    expected = s.clone()
    expected[torch.arange(3), labels] += 0.5
    torch.testing.assert_close(head(x, labels), 2.0 * expected)


def test_head_init_is_kaiming_uniform_bound():
    head = NegMarginHead(1600, 100)
    bound = 1 / math.sqrt(1600)
    assert head.weight.abs().max() <= bound and head.weight.abs().max() > 0.9 * bound


def test_lr_schedule_matches_reference_formula():
    cfg = TrainConfig()  # lr 0.05, warm-up 3000 from 0.25, steps at epochs 60 and 120
    assert lr_at(cfg, 0, 0) == pytest.approx(0.0125)  # start of warm-up: 0.25·lr
    assert lr_at(cfg, 1500, 15) == pytest.approx(0.05 * (1 - 0.5 * 0.75))
    assert lr_at(cfg, 2999, 31) == pytest.approx(0.05 * (1 - 0.75 / 3000))
    assert lr_at(cfg, 3000, 31) == pytest.approx(0.05)  # end of warm-up
    assert lr_at(cfg, 10_000, 59) == pytest.approx(0.05)
    assert lr_at(cfg, 10_000, 60) == pytest.approx(0.005)  # first step
    assert lr_at(cfg, 20_000, 119) == pytest.approx(0.005)
    assert lr_at(cfg, 20_000, 120) == pytest.approx(0.0005)  # second step
    tiered = TrainConfig(epochs=100, milestones=(30, 60), warmup_iters=5000)
    assert lr_at(tiered, 4000, 10) == pytest.approx(0.05 * (1 - 0.2 * 0.75))
    assert lr_at(tiered, 9000, 30) == pytest.approx(0.005)
