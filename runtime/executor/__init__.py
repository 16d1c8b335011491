"""The model executor: forward batch, model, KV storage, sampler."""
