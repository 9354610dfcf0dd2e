"""Defaults and choices of kit's commands, in one torch-free place: the CLI's options read them
here (so `kit --help` stays light) and so do the library functions behind the commands."""

from __future__ import annotations

# kit serve / kit chat
SERVE_HOST = "127.0.0.1"
SERVE_PORT = 8000
MAX_REQUEST_BYTES = 20 * 2**20
MAX_TOKENS_LIMIT = 1024
MAX_QUEUE = 64
MAX_BATCH = 8
CHAT_MAX_NEW_TOKENS = 256
CHAT_TEMPERATURE = 0.0

# kit review
REVIEW_PORT = 8200
UNDECIDED = ("exclude", "include")  # conversations nobody decided on: left out, or trained as generated

# kit generate
GENERATE_TYPES = ("conversation", "detail", "complex")
GENERATE_BACKENDS = ("openai", "hf")
GENERATE_DOMAIN = "general"
GENERATE_BACKEND = "hf"
GENERATE_CONCURRENCY = 8
GENERATE_MAX_TOKENS = 1024
GENERATE_TEMPERATURE = 0.7
GROUNDING = ("reject", "flag", "off")

# kit merge / kit export
MERGE_PRECISIONS = ("dequantized", "full")
MERGE_METHODS = ("linear", "ties", "dare", "svd")
MERGE_DENSITY = 0.5
MERGE_TOLERANCE = 0.5  # max |Δlogit| between the merged and the unmerged model
EXPORT_FORMATS = ("gguf",)
EXPORT_QUANTS = ("f16", "q8_0", "q4_k_m")


def choices(values: tuple[str, ...]) -> str:
    """'a, b or c' for help texts and errors."""
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"
