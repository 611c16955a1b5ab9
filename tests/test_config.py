import pytest

from negmargin.config import Config, default_finetune_steps, dump_config, load_config
from negmargin.errors import ConfigError

from .helpers import REPO

SEED_DATASETS = ("cub", "mini_imagenet", "tiered_imagenet")
# The 12 seed configs only; the omniglot and demo configs beside them are ours.
CONFIGS = sorted(
    p
    for d in SEED_DATASETS
    for p in (REPO / "configs/classification/neg_margin" / d).glob("neg-margin_cosine_*_1xb64_*.py")
)


def test_the_twelve_seed_configs_exist_and_load():
    expected = {
        f"neg-margin_cosine_{bb}_1xb64_{ds}_5way-{s}shot.py"
        for bb in ("conv4", "resnet12")
        for ds in ("cub", "mini-imagenet", "tiered-imagenet")
        for s in (1, 5)
    }
    assert {p.name for p in CONFIGS} == expected
    for path in CONFIGS:
        cfg = load_config(path)
        assert cfg.name == path.stem
        assert cfg.meta_test.n_episodes == 2000 and cfg.val.n_episodes == 100 and cfg.val.n_shot == 1
        shot = int(path.stem[-5])
        assert cfg.meta_test.n_shot == shot
        assert cfg.meta_test.resolved_steps == (150 if shot == 1 else 600)
        assert cfg.model.margin <= 0 and cfg.model.temperature == 10.0


@pytest.mark.parametrize(
    ("dataset", "backbone", "margin", "classes", "epochs", "milestones", "warmup"),
    [
        ("cub", "conv4", -0.01, 100, 200, (60, 120), 3000),
        ("mini-imagenet", "resnet12", -0.005, 100, 200, (60, 120), 3000),
        ("tiered-imagenet", "conv4", -0.02, 351, 100, (30, 60), 5000),
        ("tiered-imagenet", "resnet12", -0.01, 351, 100, (30, 60), 5000),
    ],
)
def test_reference_values(dataset, backbone, margin, classes, epochs, milestones, warmup):
    folder = dataset.replace("-", "_")
    cfg = load_config(
        REPO
        / f"configs/classification/neg_margin/{folder}/neg-margin_cosine_{backbone}_1xb64_{dataset}_5way-1shot.py"
    )
    assert (cfg.model.margin, cfg.model.num_classes) == (margin, classes)
    assert (cfg.train.epochs, cfg.train.milestones, cfg.train.warmup_iters) == (epochs, milestones, warmup)
    assert (cfg.train.lr, cfg.train.momentum, cfg.train.weight_decay, cfg.train.batch_size) == (
        0.05,
        0.9,
        1e-4,
        64,
    )
    assert (cfg.finetune.lr, cfg.finetune.momentum, cfg.finetune.dampening, cfg.finetune.weight_decay) == (
        0.01,
        0.9,
        0.9,
        1e-3,
    )
    assert cfg.finetune.temperature == 5.0 and cfg.finetune.batch_size == 4
    assert cfg.test_resize == 96


def test_unknown_key_names_key_and_suggests(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("train = dict(lrr=0.1)\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr'.*did you mean train.lr"):
        load_config(path)


def test_wrong_type_names_key(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("train = dict(epochs='ten')\n")
    with pytest.raises(ConfigError, match=r"'train.epochs' expects an integer, got 'ten'"):
        load_config(path)


def test_config_file_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "c.py"
    path.write_text(f"import os\nos.system('touch {marker}')\n")
    with pytest.raises(ConfigError, match="only contain assignments"):
        load_config(path)
    path.write_text(f"train = dict(epochs=__import__('os').system('touch {marker}'))\n")
    with pytest.raises(ConfigError, match="only literal values"):
        load_config(path)
    assert not marker.exists()


def test_overrides_and_values(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("model = dict(margin=-0.01)\n")
    cfg = load_config(path, ["model.margin=-0.02", "train.milestones=[3,6]", "data.root=somewhere"])
    assert cfg.model.margin == -0.02 and cfg.train.milestones == (3, 6) and cfg.data.root == "somewhere"
    with pytest.raises(ConfigError, match="must be ≤ 0"):
        load_config(path, ["model.margin=0.1"])
    assert load_config(path, ["model.margin=0.1", "model.allow_positive_margin=True"]).model.margin == 0.1
    for bad in ("train.batch_size=0", "train.epochs=-1", "meta_test.n_way=0", "val.n_shot=0"):
        with pytest.raises(ConfigError, match="must be a positive integer"):
            load_config(path, [bad])
    assert load_config(path, ["train.fused_norm=True"]).train.fused_norm is True
    with pytest.raises(ConfigError, match="'train.fused_norm' and 'train.compile' do not combine"):
        load_config(path, ["train.fused_norm=True", "train.compile=True"])


def test_missing_config_file_suggests_close_name(tmp_path):
    (tmp_path / "neg-margin_conv4.py").write_text("")
    with pytest.raises(ConfigError, match=r"does not exist; did you mean .*neg-margin_conv4.py"):
        load_config(tmp_path / "neg-margin_conv5.py")


def test_dumped_config_loads_back_identically(tmp_path):
    cfg = load_config(CONFIGS[0], ["train.lr=0.1"])
    dump_config(cfg, tmp_path / "resolved.py")
    again = load_config(tmp_path / "resolved.py")
    assert again.to_dict() == cfg.to_dict()


def test_default_steps_rule_matches_protocol():
    assert default_finetune_steps(5) == 150 and default_finetune_steps(25) == 600
    assert default_finetune_steps(10) == 240 and default_finetune_steps(100) == 600
    assert Config().val.n_episodes == 100
