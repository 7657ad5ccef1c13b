"""Serving one base model with many adapters: ``peftkit serve`` (docs/serving.md).

Imported only by the command line: it needs the ``serve`` extra (FastAPI, uvicorn).
"""
