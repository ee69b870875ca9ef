from setuptools import find_packages, setup

setup(
    name="llama",
    version="0.1.0",
    description="A PyTorch engine for LLaMA-family models with Meta's Llama API, on any hardware",
    packages=find_packages(include=["llama", "llama.*"]),
    # the native kernels' C++ sources are compiled at first use
    package_data={"llama.native": ["csrc/*.cpp", "csrc/*.h"]},
    python_requires=">=3.10",  # zip(strict=) in the tests, walrus in the package; torch>=2.6 needs 3.9+
    # Loose on purpose: GPU users need their own CUDA build of torch.
    install_requires=[
        "torch>=2.6",
        "fairscale",
        "fire",
        "sentencepiece",
        "tiktoken",
        "tokenizers",
        "safetensors",
        "gguf",
        "numpy",
        "tqdm",
        "filelock",  # OS-level locks: concurrent first starts, native builds, one writer per batch output
    ],
    extras_require={
        # References for parity tests, never runtime deps: transformers/accelerate, and
        # pillow/pydantic so Meta's own llama_models chat format can be imported.
        # The OpenAI-compatible server (python -m llama.serve), its /metrics, and the client
        # the docs' snippets use.
        "serve": ["fastapi", "uvicorn", "prometheus-client", "openai"],
        "test": ["pytest", "hypothesis", "pexpect", "transformers", "accelerate", "pillow", "pydantic",
                 # the server, and real clients to test it
                 "fastapi", "uvicorn", "prometheus-client", "openai", "httpx"],
    },
)
