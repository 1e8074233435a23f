"""amvl: the model layer of Asymmetric Mutual Variational Learning over Hugging Face models.

The kernels it builds on live in :mod:`amvl_kernels`; the objectives, heads, model wrapper,
Trainer integration and the ``amvl`` command land here (see README.md for what is ready).
"""

__version__ = "0.1.0"
