"""Inference: the one engine every front end generates with (engine, with its calculator tool), the server's
scheduler (scheduler) and the chat server with its page (serve, static/). Imports model/, data/ and the top-level
modules (errors, schema, config, files, hostile_text)."""
