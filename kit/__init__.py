"""kit: private, parameter-efficient adaptation of LLaVA vision-language models."""

__version__ = "0.1.0"
