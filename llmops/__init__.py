"""The `llmops` command: the pipeline's commands and serving's, side by side."""
