"""Export a checkpoint to a generation-graph model directory: GPT-2 (OpenAI TF or Hugging Face safetensors), or the
Llama family (Hugging Face llama, qwen2, mistral: config.json, safetensors or shards, tokenizer.json).

  python -m pipeline.export --checkpoint DIR --output MODEL_DIR [--weights external|frozen] [--dtype ...]
  python -m pipeline.export --random tiny|124M|355M|774M|1558M --output MODEL_DIR   (random weights, for demos)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="OpenAI GPT-2 checkpoint dir (hparams.json) or Hugging Face dir (config.json: "
                          "gpt2, llama, qwen2 or mistral)")
    src.add_argument("--random", choices=["tiny", "124M", "355M", "774M", "1558M"],
                     help="random weights of this size with the real GPT-2 vocabulary (demos and tests)")
    p.add_argument("--output", required=True, help="model directory to write")
    p.add_argument("--weights", default="external", choices=["external", "frozen"],
                   help="external (default): graphs for float32, bfloat16 and float16, weights in "
                        "weights.safetensors bound at load in the precision the worker picks (124M: loads in ~2 s, "
                        "~1.5 GB); frozen: one graph with the weights as constants (124M: ~25 s, 8-10 GB to load)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="dtype the weight matrices are stored in (external) or baked in (frozen); auto: the "
                        "checkpoint's own (a bfloat16 checkpoint stays bfloat16, half float32's bytes; float32 for "
                        "--random and OpenAI checkpoints); each worker casts them to its precision at load. Norms, "
                        "biases, activations and softmax stay float32")
    p.add_argument("--name", help="model name recorded in the manifest and in every output row")
    p.add_argument("--seed", type=int, default=0, help="with --random: the weights' seed")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lmgraph import import_tensorflow

    import_tensorflow()  # before lmgraph.export imports it: quietly (lmgraph/__init__.py)
    from lmgraph import checkpoint, export
    from lmgraph.config import SIZES
    from lmgraph.tokenizer import default_vocab_dir

    start = time.perf_counter()
    if args.random:
        args.dtype = "float32" if args.dtype == "auto" else args.dtype
        cfg = SIZES[args.random]
        weights = checkpoint.random_tensors(cfg, seed=args.seed)  # generated a tensor at a time as written
        vocab_dir, name = default_vocab_dir(), args.name or f"gpt2-{args.random}-random"
        source = {"random": True, "size": args.random, "seed": args.seed}
    else:
        try:
            cfg, weights, fmt = checkpoint.read_checkpoint(args.checkpoint)  # read a tensor at a time as written
        except (checkpoint.CheckpointError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        vocab_dir, name = Path(args.checkpoint), args.name or Path(args.checkpoint).resolve().name
        if args.dtype == "auto":
            args.dtype = checkpoint.checkpoint_dtype(args.checkpoint)
        source = {"random": False, "format": fmt, "path": str(Path(args.checkpoint).resolve())}
    try:
        manifest = export.export(cfg, weights, args.output, vocab_dir, dtype=args.dtype,
                                 weights_mode=args.weights, source=source, name=name)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError and TensorFileError too: tensors are read here
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"output": args.output, "name": name, "weights": manifest["weights"]["mode"],
                      "dtype": args.dtype, "seconds": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
