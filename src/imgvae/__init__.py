"""imgvae: train, inspect and compare VAEs on natural-scene images.

`imgvae.load_config` builds a run's config; `imgvae.workflow.train_and_evaluate` is what
`imgvae train` runs. README's "Architecture" lists the modules layer by layer.
"""

from .config import Config, load_config

__version__ = "0.1.0"
__all__ = ["Config", "load_config", "__version__"]
