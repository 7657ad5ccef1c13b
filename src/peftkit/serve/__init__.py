"""Serving adapters: ``peftkit serve`` (one base, many adapters, OpenAI's API; docs/serving.md) and
``peftkit export --check vllm`` (would vLLM serve this adapter; docs/vllm.md).

The server needs the ``serve`` extra (FastAPI, uvicorn), imported only when it is built; the vLLM check
needs nothing beyond peftkit.
"""
