"""Server flags (the engine's come from `EngineArgs.add_cli_args`)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

from strata import settings


@dataclass
class ServerArgs:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: list[str] = field(default_factory=list)
    allowed_origins: list[str] = field(default_factory=list)
    allow_credentials: bool = False
    max_request_bytes: int = 16 * 1024 * 1024
    max_file_bytes: int = 512 * 1024 * 1024
    max_queued_requests: int | None = 4096
    shutdown_timeout: float = 30.0
    register_with: str | None = None
    region: str | None = None
    router_key: str | None = None
    advertise_url: str | None = None
    heartbeat_interval: float = 5.0
    state_dir: str | None = None       # None: preflight.default_state_dir(port), resolved by the CLI
    batch_concurrency: int = 256
    chat_template: str | None = None
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    log_level: str = "info"
    disable_access_log: bool = False
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "ServerArgs":
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in vars(args).items() if k in names and v is not None}
        keys = []
        for k in kw.get("api_key", []) or []:
            keys.extend(x for x in k.split(",") if x)
        keys.extend(x for x in settings.API_KEY.get().split(",") if x)
        kw["api_key"] = keys
        origins = []
        for o in kw.get("allowed_origins", []) or []:
            origins.extend(x.strip() for x in o.split(",") if x.strip())
        kw["allowed_origins"] = origins
        if getattr(args, "max_queued_requests", None) is not None and args.max_queued_requests <= 0:
            kw["max_queued_requests"] = None
        return cls(**kw)


def add_server_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("server")
    d = ServerArgs()
    g.add_argument("--host", default=d.host, help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    g.add_argument("--port", type=int, default=d.port)
    g.add_argument("--api-key", action="append", default=None,
                   help="accepted API key for /v1/* (repeat or comma-separate for several; also $STRATA_API_KEY)")
    g.add_argument("--allowed-origins", action="append", default=None,
                   help="CORS origins allowed (repeat or comma-separate; '*' for any)")
    g.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    g.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                   help="largest request body accepted (413 beyond)")
    g.add_argument("--max-file-bytes", type=int, default=d.max_file_bytes,
                   help="largest file accepted by POST /v1/files (413 beyond)")
    g.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests,
                   help="requests allowed to wait for the engine; beyond, 429 with Retry-After (0: no limit)")
    g.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout,
                   help="seconds in-flight requests get to finish after SIGTERM")
    g.add_argument("--register-with", default=None, metavar="ROUTER_URL",
                   help="router to register with at start-up (heartbeats, deregistration at shutdown)")
    g.add_argument("--region", default=None, help="region reported to the router")
    g.add_argument("--router-key", default=None, help="key the router asks of replicas that register")
    g.add_argument("--advertise-url", default=None,
                   help="URL the router should use to reach this server (default http://HOST:PORT)")
    g.add_argument("--heartbeat-interval", type=float, default=d.heartbeat_interval)
    g.add_argument("--state-dir", "--batch-dir", dest="state_dir", default=None,
                   help="where the Batch API keeps its files and batches, so they survive a restart; one server "
                        "per directory (locked) (default: $XDG_STATE_HOME/strata/serve/HOSTNAME-PORT, "
                        "XDG_STATE_HOME defaulting to ~/.local/state)")
    g.add_argument("--batch-concurrency", type=int, default=d.batch_concurrency,
                   help="requests of Batch API jobs in flight at once")
    g.add_argument("--chat-template", default=None, help="Jinja chat template (file path or the template itself)")
    from strata.serve.tool_parsers import TOOL_PARSERS
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="let the model decide whether to call tools (tool_choice 'auto', the default when tools are "
                        "given); needs --tool-call-parser")
    g.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                   help="how the model writes tool calls: hermes (<tool_call>{json}</tool_call>: Hermes, Qwen 2.5/3) "
                        "or llama3_json (Llama 3.1+ JSON calls)")
    g.add_argument("--log-level", default=d.log_level, choices=["critical", "error", "warning", "info", "debug"])
    g.add_argument("--disable-access-log", action="store_true", help="no per-request log lines")
    g.add_argument("--ssl-keyfile", default=None)
    g.add_argument("--ssl-certfile", default=None)
    return parser
