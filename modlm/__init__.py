"""modlm: Mixture-of-Depths transformer language models (Raposo et al., 2024, arXiv:2404.02258).

The library is import-light: `import modlm` loads nothing else. Start from `modlm.model.MoDLM`
with a config from `modlm.presets`, `modlm.train.train` for training, and `modlm.flops` for
compute accounting; the `modlm` command wraps them.
"""

__version__ = "0.1.0"
