"""The GAN family: `model` (`TapeGAN`), `losses` (the loss families and
penalties), `evaluation` (FID, KID, precision/recall on feature arrays),
`quality` (`GANQuality`, scores during `fit()`), `extractors` (the
feature models it scores with) and `callbacks` (`SampleGrid`).

May import: nothing (its modules are imported by name).
"""
