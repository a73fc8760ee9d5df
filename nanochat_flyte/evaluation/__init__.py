"""Evaluation: validation bits per byte (bpb), CORE for base models (core, with its eval bundle in bundle), the chat
evaluation (chat_eval) and the sandbox HumanEval runs model-written code in (sandbox). Imports inference/,
reporting/, model/, data/ and the top-level modules (errors, schema, config, files, hostile_text)."""
