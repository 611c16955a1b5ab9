"""negmargin: few-shot image classification with Negative-Margin (Liu et al., ECCV 2020).

The public API::

    from negmargin import Config, load_config, build_model, FewShotClassifier, meta_test

Training and the meta-test of a checkpoint: ``negmargin.train.run(cfg, work_dir)`` and
``negmargin.evaluate.run_test(cfg, checkpoint, work_dir)``.
"""

__version__ = "0.1.0"

from .config import Config, load_config  # noqa: E402
from .meta_test import MetaTestResult, meta_test  # noqa: E402
from .model import FewShotModel, build_model  # noqa: E402
from .predict import FewShotClassifier  # noqa: E402

__all__ = [
    "Config",
    "FewShotClassifier",
    "FewShotModel",
    "MetaTestResult",
    "build_model",
    "load_config",
    "meta_test",
]
