"""What a run leaves for people to read: W&B and metrics files (tracking), the report card and deck HTML (report),
the results JSON (results), and the machine's description (environment). Imports data/ and the top-level modules
(errors, schema, config, files, hostile_text)."""
