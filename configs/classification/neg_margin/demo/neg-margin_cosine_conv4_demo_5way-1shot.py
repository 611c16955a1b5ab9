# The built-in demo: Neg-Margin with a Conv4 backbone on procedurally drawn pictures
# (negmargin/datasets/demo.py: 120 classes, 72 base / 18 val / 30 novel, generated on first
# use under data/demo). Small images (32 px) and a short schedule so that training and the
# 1-shot + 5-shot meta-test take 1.5-3 minutes on 2 CPU cores. Same method, head,
# augmentation and meta-test protocol as the benchmark configs.

data = dict(dataset="demo", root="data/demo", image_size=32, train_store_size=0)
model = dict(backbone="conv4", head="cosine", num_classes=None, margin=-0.01, temperature=10.0)
augment = dict(crop_scale=(0.25, 1.0))  # 0.08 of a 48-px picture would keep ~13 px
train = dict(
    epochs=12,
    batch_size=64,
    lr=0.05,
    milestones=[9],
    warmup_iters=100,
    log_interval=34,
    checkpoint_interval=12,
)
val = dict(interval=3, n_way=5, n_shot=1, n_query=15, n_episodes=100)
meta_test = dict(n_way=5, n_shot=1, n_query=15, n_episodes=2000, steps=150)
