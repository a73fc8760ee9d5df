"""The pipeline's tasks as plain functions: what a Flyte task does between its inputs and its outputs. Both Flyte
fronts (workflows/) call these, so their results JSON, report cards and closing words are the same. Imports every
package above it but cli/."""
