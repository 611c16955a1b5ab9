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
