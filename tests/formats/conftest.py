"""Model-file parsers (GGUF, safetensors, sharded checkpoints) against files written by
the reference packages (``tests.support.formatgen``)."""
