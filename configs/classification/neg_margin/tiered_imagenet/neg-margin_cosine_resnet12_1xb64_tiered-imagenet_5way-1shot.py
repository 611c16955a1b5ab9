# Neg-Margin, cosine head, ResNet12 backbone, tieredImageNet, batch 64 on one device.
# Base training, validation on 100 fixed 5-way 1-shot val episodes every 5 epochs,
# then 2000 5-way 1-shot test episodes (15 queries, 150 fine-tune steps).
# Reference: mmfewshot v0.1.0 configs/classification/neg_margin/tiered_imagenet/; its table reports
# 65.88 ± 0.53 (mean ± 95% CI). Values not set here are the protocol defaults
# of negmargin/config.py (SGD momentum 0.9, wd 1e-4, warm-up from 0.25·lr, the reference
# augmentation, meta-test SGD lr 0.01 / momentum 0.9 / dampening 0.9 / wd 1e-3, T = 5).

data = dict(dataset="tiered_imagenet", root="data/tiered_imagenet", image_size=84)
model = dict(
    backbone="resnet12",
    head="cosine",
    num_classes=351,
    margin=-0.01,
    temperature=10.0,
)
train = dict(
    epochs=100,
    batch_size=64,
    lr=0.05,
    milestones=[30, 60],
    warmup_iters=5000,
    checkpoint_interval=50,
)
val = dict(interval=5, n_way=5, n_shot=1, n_query=15, n_episodes=100)
meta_test = dict(n_way=5, n_shot=1, n_query=15, n_episodes=2000, steps=150)
