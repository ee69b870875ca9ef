"""python -m llama.serve: an OpenAI-compatible HTTP server over the continuous-batching engine.

    python -m llama.serve --ckpt_dir CKPT [--host 127.0.0.1 --port 8000 --api-key KEY]
    torchrun --nproc_per_node 2 -m llama.serve --ckpt_dir CKPT      # model parallel

    protocol.py   request body -> checked job; tokens -> OpenAI's response objects and chunks
    app.py        the HTTP routes (FastAPI), the API-key and body-size guard, streaming
    service.py    the engine loop every rank runs, the request queue in front of it
    __main__.py   the command: the model, the socket, the signals

Concurrent requests share the engine's decode steps. Under torchrun, rank 0 serves HTTP and
every rank runs the engine loop.
"""
