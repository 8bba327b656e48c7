"""fitcustom: custom GradientTape training steps that keep `fit()`."""

from fitcustom import distribute as distribute
from fitcustom.classifier import ClassifierLoss as ClassifierLoss
from fitcustom.classifier import TapeClassifier as TapeClassifier
from fitcustom.engine import TapeModel as TapeModel
from fitcustom.transforms import ClipByGlobalNorm as ClipByGlobalNorm
from fitcustom.transforms import GradientTransform as GradientTransform
from fitcustom.transforms import ScaleByLayer as ScaleByLayer

__version__ = "0.1.0"

__all__ = [
    "ClassifierLoss",
    "ClipByGlobalNorm",
    "GradientTransform",
    "ScaleByLayer",
    "TapeClassifier",
    "TapeModel",
    "distribute",
]
