"""Data: FineWeb-Edu shards downloaded and tokenized into token files (download, tokenizer, prepare, dataloader),
and the chat stages' conversations from the hub (hub, conversation, chat_data, packing).
Imports the top-level modules (errors, schema, config, files) only."""

# Every prepared data directory (pretraining's tokens, a chat stage's conversations or problems) ends with this file,
# written last: a directory without it is partial, or not one.
MANIFEST_FILE = "manifest.json"
