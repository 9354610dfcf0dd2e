"""Deployment formats: a merged model as llama.cpp GGUF files (LLM + mmproj) and an Ollama Modelfile."""
