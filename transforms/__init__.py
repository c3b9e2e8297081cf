"""Beam PTransforms and DoFns: read -> validate -> tokenize -> batch -> generate -> detokenize -> write.

For your own pipelines: `GenerateText` (dict rows in, completion and error rows out), `ScoreText` (dict rows in,
log-likelihood and error rows out) and `GPT2ModelHandler` (for Beam's RunInference). All are imported on first use:
importing this package (or its reading and validating modules) loads neither TensorFlow nor Beam's ML modules.
"""
from __future__ import annotations

__all__ = ["GenerateText", "GenerateTextResult", "ScoreText", "ScoreTextResult", "GPT2ModelHandler"]


def __getattr__(name: str):
    if name in ("GenerateText", "GenerateTextResult"):
        from transforms import generate_text

        return getattr(generate_text, name)
    if name in ("ScoreText", "ScoreTextResult"):
        from transforms import score_text

        return getattr(score_text, name)
    if name == "GPT2ModelHandler":
        from transforms.handler import GPT2ModelHandler

        return GPT2ModelHandler
    raise AttributeError(f"module 'transforms' has no attribute {name!r}")
