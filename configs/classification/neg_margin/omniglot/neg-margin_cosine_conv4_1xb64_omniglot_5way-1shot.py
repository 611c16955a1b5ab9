# Neg-Margin with a Conv4 backbone on Omniglot (Lake split), 28×28 grayscale.
# Base classes: the 964 characters of images_background (no rotated copies; set
# data.options.rotations=True for the ×4 rotation classes, 4× the epoch length).
# Val: 5 evaluation alphabets (144 characters); novel: the other 15 (515 characters),
# see negmargin/datasets/omniglot.py. Drawers 17-20 of every base character are held out
# (split train_holdout) to measure base-class accuracy. Meta-test protocol as for the
# benchmarks: 2000 5-way episodes, 15 queries, 150 / 600 fine-tune steps.
# The data root is given on the command line (--data-root ../shared/data/omniglot).

data = dict(
    dataset="omniglot",
    root="data/omniglot",
    image_size=28,
    channels=1,
    mean=(235.0,),
    std=(55.5,),
    test_resize=28,  # no centre crop: characters reach the border
    train_store_size=28,
    options=dict(base_holdout=4),
)
model = dict(backbone="conv4", head="cosine", num_classes=None, margin=-0.01, temperature=10.0)
# Mild crops only: a 0.08-area crop of a 28-px character keeps ~8 px. No flips (a
# mirrored character can be another character) and no colour jitter (binary images).
augment = dict(
    crop_scale=(0.6, 1.0),
    crop_ratio=(0.8, 1.25),
    flip_prob=0.0,
    brightness=0.0,
    contrast=0.0,
    saturation=0.0,
    interpolation="pil",
)
train = dict(
    epochs=30,
    batch_size=64,
    lr=0.05,
    milestones=[20, 26],
    warmup_iters=300,
    log_interval=100,
    checkpoint_interval=30,
)
val = dict(interval=5, n_way=5, n_shot=1, n_query=15, n_episodes=100)
meta_test = dict(n_way=5, n_shot=1, n_query=15, n_episodes=2000, steps=150)
