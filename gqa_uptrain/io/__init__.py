"""I/O stage: checkpoint sources and tensor readers (safetensors, pickle, GGUF), the planned sharded
safetensors writer, temporary-folder-then-rename outputs, and portable config/tokenizer files.

Nothing here knows about attention heads: that is :mod:`gqa_uptrain.architectures`.
"""
