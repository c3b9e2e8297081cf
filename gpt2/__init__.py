"""GPT-2 as a frozen TensorFlow graph: checkpoints, tokenizer, generation graph, export and safe loading."""
