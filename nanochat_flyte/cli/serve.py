"""Serve a checkpoint: a chat page in the browser and an OpenAI-compatible chat-completions API.

examples:
  nanochat serve --checkpoint runs/chat
  NANOCHAT_API_KEY=secret nanochat serve --checkpoint s3://bucket/chat --host 0.0.0.0 --port 8000

  GET  /                     the chat page
  POST /v1/chat/completions  OpenAI's chat completions, streamed (server-sent events) or not
  GET  /v1/models            the one model served
  GET  /health               liveness, the mode (chat or plain completion) and the load

It listens on 127.0.0.1 unless told otherwise; with NANOCHAT_API_KEY set, every /v1 request needs
`Authorization: Bearer <that key>` (with --require-api-key it does not start without one). A connection must send
a request's headers within --request-timeout seconds, and its body within as many again; a client that reads
nothing of a full buffer for as long is cut off; beyond --max-connections open connections, a new one gets a
plain-text 503.
docs/serving.md has the details.
"""

import errno
import functools
import ipaddress
import logging
import os
import socket

import uvicorn

from nanochat_flyte.cli.usage import (
    ArgumentParser,
    add_checkpoint_flag,
    add_compile_flag,
    add_device_flag,
    require_checkpoint_flag,
)
from nanochat_flyte.errors import UserError
from nanochat_flyte.inference.engine import Engine
from nanochat_flyte.inference.serve import (
    API_KEY_ENV,
    LOOPBACK_HOSTS,
    MAX_CONNECTIONS,
    REQUEST_TIMEOUT,
    BoundedHttp,
    create_app,
    log,
    model_name_of,
)

SHUTDOWN_GRACE_S = 10  # as long as `docker stop` waits, and within Kubernetes' 30 s, before they kill the process


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser("serve", __doc__)
    add_checkpoint_flag(parser)
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (the default) is reachable from this "
                                                            "machine only; 0.0.0.0 exposes the server")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-concurrent", type=int, default=4, help="answers generated at once; more get 429")
    parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                        help="open connections at once; more get 503 (default: %(default)s)")
    parser.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT,
                        help="seconds a connection has to send a request's headers, again its body, and again to "
                             "read from a full buffer (default: %(default)s)")
    parser.add_argument("--model-name", help="the model id in responses (default: from the checkpoint path)")
    parser.add_argument("--require-api-key", action="store_true",
                        help=f"refuse to start without {API_KEY_ENV} (a deployment whose key must never be missing)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="also answer requests addressed to NAME (a reverse proxy's public name); on a loopback "
                             "--host, only 127.0.0.1, localhost, [::1] and --host are answered otherwise. Given with "
                             "another --host, it turns that check on there too")
    add_device_flag(parser)
    add_compile_flag(parser)
    args = parser.parse_args(argv)
    for flag, value in (("--max-concurrent", args.max_concurrent), ("--max-connections", args.max_connections),
                        ("--request-timeout", args.request_timeout)):
        if not value > 0:
            parser.error(f"{flag} must be > 0, got {value}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0..65535, got {args.port}")
    api_key = os.environ.get(API_KEY_ENV, "").strip() or None  # (a secret file written by `echo` ends in a newline)
    if args.require_api_key and api_key is None:
        raise UserError(f"--require-api-key: {API_KEY_ENV} is not set (or empty): refusing to serve without a key")
    if api_key is not None and not (api_key.isascii() and api_key.isprintable()):  # (the key is never printed)
        raise UserError(f"{API_KEY_ENV}: a client can send only printable ASCII in its Authorization header; "
                        "choose a key of those characters")
    check_can_listen(args.host, args.port)
    require_checkpoint_flag(parser, args.checkpoint)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    loopback = is_loopback(args.host)
    if not loopback and api_key is None:
        log.warning("listening on %s without an API key: anyone who can reach this port can use the model "
                    "(set %s to require one)", args.host, API_KEY_ENV)
    engine = Engine.from_checkpoint(args.checkpoint, args.device, compile=args.compile)
    name = args.model_name or model_name_of(args.checkpoint)
    if engine.chat_mode:
        log.info("serving %s (chat checkpoint, context %d tokens)", name, engine.context)
    else:
        log.info("serving %s: a BASE checkpoint (no chat fine-tuning): plain completion mode, each request "
                 "continues its last user message as plain text", name)
    allowed_hosts = (*LOOPBACK_HOSTS, args.host, *args.allowed_host) if loopback or args.allowed_host else None
    app = create_app(engine, model_name=name, max_concurrent=args.max_concurrent, api_key=api_key,
                     request_timeout=args.request_timeout, allowed_hosts=allowed_hosts)
    http = functools.partial(BoundedHttp, request_timeout=args.request_timeout, max_connections=args.max_connections)
    # On Ctrl-C or SIGTERM no new request is taken; answers in flight get SHUTDOWN_GRACE_S to finish
    # proxy_headers off: uvicorn would otherwise log a loopback client's X-Forwarded-For as its address, unescaped
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", http=http, proxy_headers=False,
                timeout_graceful_shutdown=SHUTDOWN_GRACE_S)


def is_loopback(host: str) -> bool:
    """Whether every address the host stands for is one of this machine's loopback ones (all of 127.0.0.0/8 and ::1;
    127.0.0.2 and 127.1 are too), which no other machine reaches."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except (socket.gaierror, UnicodeError):
        return False
    return bool(addresses) and all(ipaddress.ip_address(address.partition("%")[0]).is_loopback
                                   for address in addresses)


def check_can_listen(host: str, port: int) -> None:
    """Bind, and let go, what uvicorn will bind (asyncio's create_server: every address of the host): a host that
    is no address here or a port in use then fails in one line naming the flag, before the model loads."""
    if not host.strip():  # uvicorn would listen on every address, as if 0.0.0.0 had been asked for
        raise UserError("--host: empty: give an address to listen on (127.0.0.1, the default; 0.0.0.0: all)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise UserError(f"--host: {host!r} is neither an IP address nor a known host name ({error.strerror})") from None
    bound = 0
    for family, _, _, _, address in set(infos):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as create_server: TIME_WAIT is no obstacle
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRNOTAVAIL:  # create_server skips those; it fails if none is left
                    continue
                problems = {errno.EADDRINUSE: f"--port: {port} is already in use on {host}",
                            errno.EACCES: f"--port: no permission to listen on port {port} (below 1024 needs root)"}
                raise UserError(problems.get(error.errno, f"--host/--port: cannot listen on {host} port {port}: "
                                                          f"{error.strerror}")) from None
            bound += 1
    if not bound:
        raise UserError(f"--host: {host} is not an address of this machine")
