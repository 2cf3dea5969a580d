"""The serve command, behind the thin `python -m serve` parser (serve/__main__.py): build the server from the
recipe's `serve:` section, bind, print the address, serve until SIGINT or SIGTERM, stop cleanly."""
from __future__ import annotations

import argparse
import asyncio
import gc
import signal
from typing import Any, Callable, Coroutine

from rich.markup import escape
from rich.table import Table

from apprentice.console import CommandConsole
from apprentice.errors import ApprenticeError

from .app import ServeApp
from .config import ServeConfig, load_serve_config
from .learned import HASHED, fit

try:  # the router's event loop where it is installed (serve.event_loop)
    import uvloop
except ImportError:  # Windows, or a build without it: asyncio's own loop
    uvloop = None

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def serve(args: argparse.Namespace) -> int:
    console = CommandConsole(args.verbosity, transcript=False)
    try:
        config = load_serve_config(args.recipe, args.set)
        console.detail_json(config.model_dump(mode="json"))
        if args.fit_router:
            return _fit_router(config, console)
        return event_loop(config.event_loop)(_serve(config, console))
    except (ApprenticeError, OSError) as exc:  # one line naming the fault, and its exit code
        return console.stopped(exc)
    except KeyboardInterrupt:
        return 130


def event_loop(choice: str) -> Callable[[Coroutine[Any, Any, int]], int]:
    """What runs the server: uvloop's loop (8–20 % less CPU per request in the router than asyncio's,
    benchmarks/results/serve_overhead.md) unless serve.event_loop says asyncio or uvloop is not installed."""
    if choice == "asyncio" or (choice == "auto" and uvloop is None):
        return asyncio.run
    if uvloop is None:
        raise ApprenticeError("serve.event_loop: uvloop is not installed; pip install uvloop, or set "
                              "serve.event_loop: auto (asyncio's loop where uvloop is missing)")
    return uvloop.run


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
        # What is loaded by now (the SDKs, pydantic's models: some 120,000 objects) lives as long as the server;
        # frozen, the collector no longer walks it while requests come and go.
        gc.collect()
        gc.freeze()
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


def _fit_router(config: ServeConfig, console: CommandConsole) -> int:
    embedding = config.routing.embedding
    router, report = fit(config.log_dir, embedding)
    path = config.routing.router
    assert path is not None  # the config fills it in
    router.save(path)
    console.print(f"fitted on {report['fitted_on']} shadow comparisons of {escape(str(config.log_dir))}; "
                  f"{report['held_out']} held out (the teacher agreed with {report['held_out_agreement']:.1%} of "
                  "the student's answers there)", highlight=False)
    curves = {"confidence only": report["confidence"]}
    curves.update(("hashed words" if name == HASHED else name, points) for name, points in report["routers"].items())
    table = Table(title="held-out quality (agreement with the teacher) at each share routed to the teacher",
                  caption="hashed words" + (f", {embedding}" if embedding != HASHED else "") + ": the learned "
                  "router with that prompt embedding; mean: over the routed shares")
    table.add_column("routed", justify="right")
    for column in curves:
        table.add_column(escape(column), justify="right")
    for step, (share, _) in enumerate(report["confidence"]):
        table.add_row(f"{share:.0%}", *(f"{points[step][1]:.3f}" for points in curves.values()))
    table.add_row("mean", *(f"{mean_quality(points):.3f}" for points in curves.values()), style="bold")
    console.print(table)
    console.final(f"router ({escape(embedding)} embedding) written to {escape(str(path))}; serve it with routing: "
                  "{mode: learned, min_agreement: 0.5}", highlight=False)
    return 0


def mean_quality(points: list[tuple[float, float]]) -> float:
    """The curve's mean quality over its routed shares: one figure to rank routers by."""
    return sum(quality for _, quality in points) / len(points)


COMMANDS = {"serve": serve}
