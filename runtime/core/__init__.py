"""The engine core: step loop, scheduler, KV cache manager, request records, detokenizer, stop checks."""
