"""Beam PTransforms and DoFns: read -> prepare (validate, tokenize) -> batch -> generate or score -> format -> write.

For your own pipelines: `GenerateText` (dict rows in, completion and error rows out), `ScoreText` (dict rows in,
log-likelihood and error rows out) and `GPT2ModelHandler` (for Beam's RunInference). All are imported on first use:
importing this package (or its reading and validating modules) loads neither TensorFlow nor Beam's ML modules.
"""
from __future__ import annotations

import importlib

_HOMES = {"GenerateText": "generate_text", "GenerateTextResult": "generate_text", "ScoreText": "score_text",
          "ScoreTextResult": "score_text", "GPT2ModelHandler": "handler"}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'transforms' has no attribute {name!r}")
    return getattr(importlib.import_module(f"transforms.{_HOMES[name]}"), name)
