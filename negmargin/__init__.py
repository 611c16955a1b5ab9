"""negmargin: few-shot image classification with Negative-Margin (Liu et al., ECCV 2020).

The public API::

    from negmargin import Config, load_config, build_model, FewShotClassifier, run_meta_test

Training and the meta-test of a checkpoint: ``negmargin.train.run(cfg, work_dir)`` and
``negmargin.evaluate.run_test(cfg, checkpoint, work_dir)``.
"""

from ._version import __version__
from .config import Config, load_config
from .meta_test import MetaTestResult, run_meta_test
from .model import FewShotModel, build_model
from .predict import FewShotClassifier

__all__ = [
    "__version__",
    "Config",
    "FewShotClassifier",
    "FewShotModel",
    "MetaTestResult",
    "build_model",
    "load_config",
    "run_meta_test",
]
