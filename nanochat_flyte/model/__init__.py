"""The model: the GPT (gpt) and its loss a chunk of tokens at a time (chunked_loss), its optimizers (optim),
checkpoints (checkpoint), and the device and precision it runs in (device). Imports data/ (the tokenizer saved with
a checkpoint) and the top-level modules (errors, schema, config, files, hostile_text)."""
