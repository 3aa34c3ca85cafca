"""Looking at trained models: metrics, the run report, `compare` and its page."""
