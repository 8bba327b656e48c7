"""Task models on the step engine: `classifier`, `distiller`, and the GAN
family in `gan/`. Each is a thin layer over `fitcustom.engine.TapeModel`.

May import: the engine, the ground floor, `_keras`, `checkpoints`,
`datasets`.
"""
