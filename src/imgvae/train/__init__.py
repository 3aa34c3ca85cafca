"""The engine that trains any model (engine.py, with the Task interface in task.py) and its
parts; the VAE is one task (vae.py)."""
