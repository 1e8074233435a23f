"""amvl: the model layer of Asymmetric Mutual Variational Learning over Hugging Face models.

The kernels it builds on live in :mod:`amvl_kernels`. Here: the config (:mod:`amvl.config`),
objectives, Gaussian heads and injector, the model wrapper (:mod:`amvl.model`), data and the
built-in puzzles, diagnostics, training (Trainer integration and an accelerate loop), benchmark
evaluation and the ``amvl`` command (:mod:`amvl.cli`).
"""

__version__ = "0.1.0"
