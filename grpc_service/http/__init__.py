"""The OpenAI-compatible HTTP face (FastAPI + uvicorn, in the gRPC server's process and event loop).

schema.py parses request bodies, prompts.py turns them into prompt ids and
SamplingParams, tool_calls.py renders / parses tool calls, responses.py builds
the response JSON, app.py routes, streams and maps errors, serve.py runs uvicorn.
"""
