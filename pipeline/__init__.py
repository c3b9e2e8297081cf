"""Entry points: `python -m pipeline.export` (make a model directory), `python -m pipeline.run` (the generation
job) and `python -m pipeline.score` (the scoring job)."""
