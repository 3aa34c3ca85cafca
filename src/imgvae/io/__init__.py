"""Files of models: checkpoints, what a model path is and opening it, diffusers folders in and
out, export, latents on disk, picture grids."""
