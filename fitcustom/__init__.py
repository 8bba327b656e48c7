"""fitcustom: custom GradientTape training steps that keep `fit()`."""

from fitcustom import architectures as architectures
from fitcustom import checkpoints as checkpoints
from fitcustom import checks as checks
from fitcustom import distribute as distribute
from fitcustom import evaluation as evaluation
from fitcustom import gan_losses as gan_losses
from fitcustom import quality as quality
from fitcustom import testing as testing
from fitcustom._version import __version__ as __version__
from fitcustom.callbacks import SampleGrid as SampleGrid
from fitcustom.checkpoints import BackupAndRestore as BackupAndRestore
from fitcustom.checkpoints import ModelCheckpoint as ModelCheckpoint
from fitcustom.checkpoints import load_model as load_model
from fitcustom.classifier import ClassifierLoss as ClassifierLoss
from fitcustom.classifier import TapeClassifier as TapeClassifier
from fitcustom.distiller import TapeDistiller as TapeDistiller
from fitcustom.engine import TapeModel as TapeModel
from fitcustom.gan import TapeGAN as TapeGAN
from fitcustom.quality import GANQuality as GANQuality
from fitcustom.transforms import ClipByGlobalNorm as ClipByGlobalNorm
from fitcustom.transforms import GradientTransform as GradientTransform
from fitcustom.transforms import ScaleByLayer as ScaleByLayer

__all__ = [
    "BackupAndRestore",
    "ClassifierLoss",
    "ClipByGlobalNorm",
    "GANQuality",
    "GradientTransform",
    "ModelCheckpoint",
    "SampleGrid",
    "ScaleByLayer",
    "TapeClassifier",
    "TapeDistiller",
    "TapeGAN",
    "TapeModel",
    "architectures",
    "checkpoints",
    "checks",
    "distribute",
    "evaluation",
    "gan_losses",
    "load_model",
    "quality",
    "testing",
]
