"""The pipeline's tasks as plain functions: what a Flyte task does between its inputs and its outputs. Both Flyte
fronts (workflows/) call these, so their checks, results JSON, report cards and closing words are the same. In
pipeline order: setup, prepare, train, evaluate, finish; secrets names what the tasks may read. Imports every package
above it.

A task that has a report card to show takes `show`: how its front shows one, a title and self-contained HTML (a
flytekit Deck, a Flyte 2 report tab).
"""

from collections.abc import Callable

Show = Callable[[str, str], None]
