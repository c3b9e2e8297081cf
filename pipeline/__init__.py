"""Entry points: `python -m pipeline.export` (make a model directory) and `python -m pipeline.run` (the job)."""
