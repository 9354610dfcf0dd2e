"""LLaVA data -> tensors: formats, images, VQA items, dataset, collator, sampler."""
