"""The serve command, behind the thin `python -m serve` parser (serve/__main__.py): build the server from the
recipe's `serve:` section, bind, print the address, serve until SIGINT or SIGTERM, stop cleanly."""
from __future__ import annotations

import argparse
import asyncio
import signal

from rich.markup import escape

from apprentice.console import CommandConsole
from apprentice.errors import ApprenticeError

from .app import ServeApp
from .config import ServeConfig, load_serve_config

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def serve(args: argparse.Namespace) -> int:
    console = CommandConsole(args.verbosity, transcript=False)
    try:
        config = load_serve_config(args.recipe, args.set)
        console.detail_json(config.model_dump(mode="json"))
        return asyncio.run(_serve(config, console))
    except (ApprenticeError, OSError) as exc:  # one line naming the fault, and its exit code
        return console.stopped(exc)
    except KeyboardInterrupt:
        return 130


async def _serve(config: ServeConfig, console: CommandConsole) -> int:
    def warn(message: str) -> None:
        console.final(f"[yellow]{escape(message)}[/]", highlight=False)

    if config.host not in LOOPBACK and config.api_keys_env is None:
        warn(f"serve.host {config.host}: reachable from the network with no key asked; set serve.api_keys_env")
    app = ServeApp(config, warn)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        try:
            host, port = await app.start()
        except OSError as exc:
            if exc.filename is not None:  # the served log's folder
                raise
            raise ApprenticeError(f"serve.host {config.host}, serve.port {config.port}: {exc.strerror or exc}; "
                                  "choose another (--set serve.port=0 takes any free port)") from None
        teacher = f", teacher {config.teacher.model}" if config.teacher is not None else ""
        console.print(f"student {escape(config.student.model)}{escape(teacher)}; routing "
                      f"{config.routing.mode}; log {escape(str(config.log_dir))}", highlight=False)
        # The line a script (and the tests) wait for: the address actually bound, port 0 resolved.
        console.final(f"serving {escape(config.model)} on http://{host}:{port}/v1", highlight=False)
        await stop.wait()
    finally:
        await app.stop()
    console.final("stopped", highlight=False)
    return 0


COMMANDS = {"serve": serve}
