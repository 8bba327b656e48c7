"""fitcustom: custom GradientTape training steps that keep `fit()`."""

from fitcustom import architectures as architectures
from fitcustom import checks as checks
from fitcustom import distribute as distribute
from fitcustom import gan_losses as gan_losses
from fitcustom.callbacks import SampleGrid as SampleGrid
from fitcustom.classifier import ClassifierLoss as ClassifierLoss
from fitcustom.classifier import TapeClassifier as TapeClassifier
from fitcustom.engine import TapeModel as TapeModel
from fitcustom.gan import TapeGAN as TapeGAN
from fitcustom.transforms import ClipByGlobalNorm as ClipByGlobalNorm
from fitcustom.transforms import GradientTransform as GradientTransform
from fitcustom.transforms import ScaleByLayer as ScaleByLayer

__version__ = "0.1.0"

__all__ = [
    "ClassifierLoss",
    "ClipByGlobalNorm",
    "GradientTransform",
    "SampleGrid",
    "ScaleByLayer",
    "TapeClassifier",
    "TapeGAN",
    "TapeModel",
    "architectures",
    "checks",
    "distribute",
    "gan_losses",
]
