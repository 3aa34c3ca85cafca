"""imgvae: train, inspect and compare VAEs on natural-scene images.

`imgvae.load_config` builds a run's config; `imgvae.commands.workflow.train_and_evaluate` is what
`imgvae train` runs. README's "Architecture" shows the packages floor by floor.
"""

from imgvae.config import Config, load_config

__version__ = "0.3.0"
__all__ = ["Config", "load_config", "__version__"]
