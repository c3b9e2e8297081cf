"""Beam PTransforms and DoFns: read -> validate -> tokenize -> batch -> generate -> detokenize -> write."""
