"""Data: FineWeb-Edu shards downloaded and tokenized into token files (download, tokenizer, prepare, dataloader),
and the chat stages' conversations from the hub (hub, conversation, chat_data, packing).
Imports errors, schema and config only."""
