"""`nexus-gguf serve`: llama-cpp-python's OpenAI-compatible server (python -m llama_cpp.server)
with NxkvDiskCache as its prompt cache, so that prompt states survive restarts and are shared
by every server on one cache directory. Needs the server extra: pip install 'nexus-gguf[server]'.

GET /nexus-gguf/stats reports what the cache saves: prompt tokens llama.cpp really evaluated,
cache entries and bytes."""

from __future__ import annotations

from typing import Any

from .errors import NxkvError


def create_app(model: str, cache_dir: str, cache_bytes: int, preset: str = "high", **model_options: Any):
    """The llama-cpp-python FastAPI app serving `model`, every Llama it loads given an
    NxkvDiskCache on `cache_dir`."""
    try:
        from llama_cpp.server import app as server_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as e:
        raise NxkvError(f"the server needs llama-cpp-python's server extra ({e}); run: pip install 'nexus-gguf[server]'") from None

    from .prompt_cache import NxkvDiskCache

    stats = {"evaluated_tokens": 0}
    caches: list = []

    def with_cache(llm):
        cache = NxkvDiskCache(cache_dir, cache_bytes, preset=preset, model=llm)
        llm.set_cache(cache)
        caches.append(cache)
        real_eval = llm.eval

        def counted(tokens):
            stats["evaluated_tokens"] += len(tokens)
            return real_eval(tokens)

        llm.eval = counted
        return llm

    server = ServerSettings(host="127.0.0.1", port=8000)
    settings = ModelSettings(model=model, verbose=False, cache=False, **model_options)
    app = server_app.create_app(server_settings=server, model_settings=[settings])
    proxy = server_app._llama_proxy
    load = proxy.load_llama_from_model_settings
    proxy.load_llama_from_model_settings = lambda s: with_cache(load(s))  # models loaded later, too
    with_cache(proxy._current_model)

    @app.get("/nexus-gguf/stats")
    def nexus_stats() -> dict:
        cache = caches[-1]
        return {**stats, "cache_entries": len(cache), "cache_bytes": cache.cache_size, "preset": preset}

    return app


def serve(model: str, cache_dir: str, cache_bytes: int, preset: str, host: str, port: int, **model_options: Any) -> None:
    import uvicorn

    app = create_app(model, cache_dir, cache_bytes, preset, **model_options)
    uvicorn.run(app, host=host, port=port, log_level="warning")
