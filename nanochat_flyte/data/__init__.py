"""Data: FineWeb-Edu shards downloaded and tokenized into token files (download, tokenizer, prepare, dataloader),
and the chat stages' conversations from the hub (hub, conversation, chat_data, packing).
Imports the top-level modules (errors, schema, config, files, hostile_text) only."""

# Every prepared data directory (pretraining's tokens, a chat stage's conversations or problems) ends with this file,
# written last: a directory without it is partial, or not one.
MANIFEST_FILE = "manifest.json"
# The fields of a RunConfig that say where pretraining's documents came from, recorded in its manifest: a run on the
# directory must name the same, or its checkpoint's config.json would name other data than it trained on.
SOURCE_FIELDS = ("data_url", "num_shards", "val_shard", "only_needed_shards")
