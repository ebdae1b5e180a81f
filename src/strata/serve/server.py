"""Process lifecycle: load the engine, serve with uvicorn, drain on SIGTERM/SIGINT, exit 0.

Shutdown sequence on the first SIGTERM or SIGINT:
1. the server turns unhealthy (`/health` 503) and answers new API requests 503 (open connections too);
2. it deregisters from its router, if it registered, and stops its Batch API jobs where they are (the lines in
   flight are aborted; the jobs stay on disk and resume when a server starts on the same --state-dir);
3. in-flight requests get up to `--shutdown-timeout` seconds to finish; what is left is aborted (streams
   get an SSE error event, non-streaming requests a 503);
4. uvicorn stops; the engine thread stops; the process exits 0.
A second SIGINT exits at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

from strata.engine.async_llm import AsyncLLM
from strata.serve.args import ServerArgs
from strata.serve.metrics import ServerMetrics
from strata.serve.prompts import ServerTokenizer
from strata.serve.state import ServerState

logger = logging.getLogger("strata.serve")


def build_state(engine, args: ServerArgs) -> ServerState:
    """Wrap a synchronous LLMEngine (already built) into the server's shared state."""
    cfg = engine.config
    model_name = engine.model_name
    metrics = ServerMetrics(model_name, cfg.max_model_len)
    async_llm = AsyncLLM(engine, observers=[metrics])
    aliases = {cfg.model_path} if getattr(cfg, "model_path", None) else set()
    return ServerState(engine=async_llm, args=args, metrics=metrics,
                       tokenizer=ServerTokenizer(engine.tokenizer, args.chat_template,
                                                 vocab_size=getattr(getattr(engine, "model_config", None),
                                                                    "vocab_size", None)),
                       model_name=model_name,
                       aliases=aliases, max_model_len=cfg.max_model_len)


def make_lifespan(state: ServerState):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.engine.start()
        if state.batches is not None:
            state.batches.resume()
        if state.args.register_with:
            from strata.serve.registration import RouterRegistration, advertised_url
            url = advertised_url(state.args.host, state.args.port, state.args.advertise_url,
                                 ssl=bool(state.args.ssl_certfile))

            def load():
                s = state.engine.stats()
                return {"num_requests_running": s.num_running, "num_requests_waiting": s.num_waiting,
                        "kv_cache_usage_perc": s.kv_cache_usage}

            state.registration = RouterRegistration(state.args.register_with, url, state.args.region,
                                                    state.model_name, key=state.args.router_key,
                                                    interval=state.args.heartbeat_interval, load=load)
            await state.registration.start()
        try:
            yield
        finally:
            await drain(state)  # no-op when a signal already drained
            if state.batches is not None:
                await state.batches.shutdown()
            state.engine.shutdown()
    return lifespan


async def drain(state: ServerState) -> None:
    if getattr(state, "_drained", False):
        return
    state._drained = True  # type: ignore[attr-defined]
    state.draining = True
    if state.registration is not None:
        await state.registration.stop()
    if state.batches is not None:
        await state.batches.shutdown()
    t0 = time.monotonic()
    n_in = state.engine.num_in_flight
    failed = await state.engine.drain(state.args.shutdown_timeout)
    logger.info("drained %d in-flight request(s) in %.2f s (%d aborted at the timeout)", n_in,
                time.monotonic() - t0, failed)


def _uvicorn_server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn.Server whose first SIGTERM/SIGINT drains before stopping, and which exits 0 after it."""

        state: ServerState

        def handle_exit(self, sig, frame):  # runs on the main (event loop) thread
            if self.should_exit or getattr(self, "_draining", False):
                if sig == signal.SIGINT:
                    self.force_exit = True
                    self.should_exit = True
                return
            self._draining = True
            logger.info("received %s: draining (up to %.0f s)", signal.Signals(sig).name,
                        self.state.args.shutdown_timeout)
            self.state.draining = True
            loop = asyncio.get_event_loop()
            loop.call_soon_threadsafe(lambda: loop.create_task(self._drain_then_exit()))

        async def _drain_then_exit(self):
            try:
                await drain(self.state)
                await asyncio.sleep(0.05)  # let the last bytes of finished responses go out
            finally:
                self.should_exit = True

    return DrainingServer


def serve(engine, args: ServerArgs, *, sock=None, state_dir=None) -> int:
    """Serve until SIGTERM/SIGINT. `sock` (bound, not listening) and `state_dir` (a locked `StateDir`) come
    from the CLI's checks before the model loaded; made here when not given."""
    import uvicorn

    from strata.serve.app import build_app
    from strata.serve.batch_api import BatchManager
    from strata.serve.preflight import StateDir, bind_socket, default_state_dir

    if sock is None:
        sock = bind_socket(args.host, args.port)
    if state_dir is None:
        args.state_dir = args.state_dir or default_state_dir(sock.getsockname()[1])
        state_dir = StateDir(args.state_dir)
    state = build_state(engine, args)
    state.batches = BatchManager(state, state_dir.path)
    app = build_app(state)
    app.router.lifespan_context = make_lifespan(state)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=not args.disable_access_log, timeout_graceful_shutdown=5,
                            timeout_keep_alive=5, ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
                            lifespan="on", loop="asyncio", http="h11" if _no_httptools() else "auto")
    server = _uvicorn_server_class()(config)
    server.state = state
    logger.info("serving %s on http://%s:%d (max_model_len=%d; Batch API state in %s)", state.model_name,
                args.host, sock.getsockname()[1], state.max_model_len, state_dir.path)
    server.run(sockets=[sock])
    state_dir.release()
    return 0


def _no_httptools() -> bool:
    try:
        import httptools  # noqa: F401
        return False
    except ImportError:
        return True
