"""Command line: argv -> config -> Daemon. Exit codes: 0 ok, 1 runtime failure, 2 bad configuration."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable

from .config import (
    DEFAULT_MODEL,
    DTYPES,
    GENERATE,
    parse_size,
    PASSWORD_ENV,
    DaemonConfig,
    load_daemon_config,
    load_stations,
    looks_like_daemon_config,
)
from .errors import ConfigError, RadioError
from .native import bound_kernel_caches
from .tools import SHAPES

logger = logging.getLogger("radio")

EXIT_OK, EXIT_RUNTIME, EXIT_CONFIG = 0, 1, 2


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT, e.g. 127.0.0.1:8000")
    return host, int(port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="radio", description="Endless MusicGen radio for Icecast.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the station daemon")
    run.add_argument("--config", help="daemon config YAML (flags override it)")
    run.add_argument("--stations", help="directory of station YAML files (default: stations)")
    run.add_argument("--model", help=f"hub id or local checkpoint directory (default: {DEFAULT_MODEL})")
    run.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: auto)")
    run.add_argument("--dtype", choices=DTYPES, help="decoder dtype (default: auto)")
    run.add_argument("--memory-budget", metavar="SIZE",
                     help="memory for all models together, e.g. 6GiB; auto (default) or off")
    run.add_argument("--seed", type=int, help="sampling seed, for reproducible runs")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--icecast", type=_host_port, metavar="HOST:PORT", help="an existing Icecast server")
    where.add_argument("--local-icecast", action="store_true", help="start our own icecast2 on loopback")
    run.add_argument("--port", type=int, help="port for --local-icecast (default 8000, or a free one)")
    run.add_argument("--icecast-xml", help="icecast.xml template for --local-icecast (default: the repository's)")
    run.add_argument("--api", type=_host_port, metavar="HOST:PORT",
                     help="control API and web player address (default 127.0.0.1:8765)")
    run.add_argument("--no-api", action="store_true", help="do not start the control API")
    run.add_argument("--public-url", help="how listeners reach Icecast, for the web player's links "
                                          "(default http://HOST:PORT of --icecast)")
    run.add_argument("--generate", choices=GENERATE,
                     help="listened (default): generate only for stations someone listens to; always: every one")
    run.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    check = sub.add_parser("check", help="validate station files/directories and daemon configs")
    check.add_argument("paths", nargs="*", default=["stations"], help="files or directories (default: stations)")

    bench = sub.add_parser("bench", help="measure generation speed against the prototype loop and raw generate")
    src = bench.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint directory or hub id")
    src.add_argument("--shape", choices=("tiny", "small", "small-stereo", "medium", "large"), default="tiny",
                     help="use (and make once, in ~/.cache/radio) a random-weight checkpoint of this shape "
                          "(small, medium, large: facebook/musicgen-*'s shapes; small-stereo: "
                          "facebook/musicgen-stereo-small's)")
    bench.add_argument("--mounts", default="1,2,3,4,8", help="comma-separated mount counts (default 1,2,3,4,8)")
    bench.add_argument("--frames", type=int, default=200, help="frames per chunk (50 = 1 s; default 200 = the engine's 4 s chunk)")
    bench.add_argument("--chunks", type=int, default=3, help="measured steady-state chunks (default 3)")
    bench.add_argument("--proto-steps", type=int, default=2, help="measured prototype rounds (default 2)")
    bench.add_argument("--dtypes", default="float32,auto", help="dtypes for our engine (default float32,auto)")
    bench.add_argument("--quality", action="store_true",
                       help="measure quantized weights (int8, int4 or those in --weights) against dense bf16 ones")
    bench.add_argument("--weights", default="auto",
                       help="decoder weights for our engine, e.g. bfloat16,int8,int4 (default auto)")
    bench.add_argument("--kv", default="auto",
                       help="KV cache of our dynamic path, e.g. full,8bit (default auto: 8bit where radio's CPU "
                            "kernels read it, else full); with --quality, 8bit is also measured against full")
    bench.add_argument("--codec", default="auto",
                       help="EnCodec's dtype, e.g. float32,bfloat16 to measure both (default auto)")
    bench.add_argument("--kernels", default="auto",
                       help="CPU kernels of quantized weights and an 8-bit cache, e.g. torch,auto to measure PyTorch's "
                            "and radio's (default auto)")
    bench.add_argument("--compile", default="auto",
                       help="the CPU step's layer compiled, e.g. always,never to measure both (default auto); "
                            "with --quality, auto,always also measures radio's layer loop against the compiled layers")
    bench.add_argument("--scenarios", default="prototype,generate,ours")
    bench.add_argument("--context-seconds", type=float, default=10.0,
                       help="engine context kept per station; the window is 3x this (default 10 -> 30 s)")
    bench.add_argument("--json", help="also write the report as JSON to this file")
    bench.add_argument("--capacity", action="store_true",
                       help="also find the most mounts that each stay at or above real time (GPU sizing)")
    bench.add_argument("--decoder", choices=("auto", "static", "dynamic"), default="auto",
                       help="decode path of ours: auto (static on CUDA, dynamic on CPU), or force one")

    soak = sub.add_parser("soak", help="run the daemon for a long time and report underruns, drift, RSS slope")
    soak_src = soak.add_mutually_exclusive_group()
    soak_src.add_argument("--model", help="checkpoint directory or hub id (default: the tiny test model)")
    soak_src.add_argument("--shape", choices=("tiny", "small"), default="tiny")
    soak.add_argument("--minutes", type=float, default=30.0)
    soak.add_argument("--stations", type=int, default=4)
    soak.add_argument("--warmup", type=float, default=60.0, help="seconds before measuring (default 60)")
    soak.add_argument("--json", help="also write the report as JSON to this file")
    soak.add_argument("--settle-minutes", type=float, default=None,
                      help="minutes after warm-up before the RSS slope is measured (default: 10, or a third of a "
                           "shorter run)")
    soak.add_argument("--trace", action="store_true",
                      help="also report the allocation sites and object types that grew most (slower)")
    soak.add_argument("--churn", action="store_true",
                      help="also create, edit and delete a station file every minute")

    make = sub.add_parser("make-test-model", help="write a random-weight MusicGen checkpoint for tests/benchmarks")
    make.add_argument("dir")
    make.add_argument("--shape", choices=SHAPES, default="tiny",
                      help="tiny: for tests; tiny-alt: another tiny shape (model-swap tests); tiny-stereo: a stereo "
                           "one; small, medium, large: facebook/musicgen-small's, -medium's and -large's shapes, "
                           "small-stereo: musicgen-stereo-small's (benchmarks)")
    make.add_argument("--seed", type=int, default=0)
    return p


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    for noisy in ("urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_check(paths: list[str]) -> int:
    problems: list[str] = []
    station_paths: list[Path] = []
    checked = 0
    for raw in paths:
        path = Path(raw)
        if path.is_file() and looks_like_daemon_config(path):
            checked += 1
            try:
                load_daemon_config(path)
            except ConfigError as exc:
                problems.extend(exc.problems)
        else:
            station_paths.append(path)
    stations, station_problems = load_stations(station_paths)
    problems.extend(station_problems)
    checked += len(stations)
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return EXIT_CONFIG
    print(f"ok: {checked} file(s), {len(stations)} station(s)")
    return EXIT_OK


def _daemon_config(args: argparse.Namespace) -> DaemonConfig:
    cfg = load_daemon_config(args.config)
    icecast = cfg.icecast
    if args.icecast:
        icecast = replace(icecast, host=args.icecast[0], port=args.icecast[1], local=False)
    if args.public_url:
        icecast = replace(icecast, public_url=args.public_url)
    if args.local_icecast:
        icecast = replace(icecast, local=True, port=args.port or (icecast.port if args.config else 8000))
    elif args.port:
        icecast = replace(icecast, port=args.port)
    api = cfg.api
    if args.api:
        api = replace(api, host=args.api[0], port=args.api[1])
    if args.no_api:
        api = replace(api, enabled=False)
    problem = api.token_problem()
    if problem:
        raise ConfigError([f"api.host: {problem}"])
    cfg = replace(
        cfg,
        api=api,
        stations_dir=args.stations or cfg.stations_dir,
        model=args.model or cfg.model,
        device=args.device or cfg.device,
        dtype=args.dtype or cfg.dtype,
        memory_budget=args.memory_budget or cfg.memory_budget,
        seed=args.seed if args.seed is not None else cfg.seed,
        log_level=args.log_level or cfg.log_level,
        icecast=icecast,
        engine=replace(cfg.engine, generate=args.generate) if args.generate else cfg.engine,
    )
    if args.memory_budget:
        try:
            parse_size(args.memory_budget)
        except ValueError as exc:
            raise ConfigError([f"--memory-budget: {exc}"]) from None
    if not icecast.local and not icecast.password:
        raise ConfigError([f"icecast.password: no source password for {icecast.host}:{icecast.port}; set "
                           f"{PASSWORD_ENV}, or icecast.password_file in the config, or use --local-icecast"])
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon import Daemon  # torch and transformers load only when running

    try:
        cfg = _daemon_config(args)
    except ConfigError as exc:
        _setup_logging("INFO")
        for line in exc.problems:
            logger.error("%s", line)
        return EXIT_CONFIG
    _setup_logging(cfg.log_level)
    if not Path(cfg.stations_dir).is_dir():
        logger.error("%s: stations: not a directory; pass --stations DIR", cfg.stations_dir)
        return EXIT_CONFIG
    stations, problems = load_stations([cfg.stations_dir])
    for line in problems:
        logger.error("%s (station skipped)", line)
    if not stations:
        logger.error("%s: no valid station to run; fix the files above or add one (see README)", cfg.stations_dir)
        return EXIT_CONFIG
    daemon = Daemon(cfg, stations, icecast_xml=args.icecast_xml)
    try:
        daemon.run()
    except RadioError as exc:
        logger.error("%s", exc)
        return EXIT_RUNTIME
    return EXIT_OK


def _listed(text: str) -> tuple[str, ...]:
    """A comma-separated option's values (``--weights int8,int4``), blanks dropped."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def cmd_bench(args: argparse.Namespace) -> int:
    _setup_logging("INFO")
    from .tools.bench import format_table, run_bench, write_json

    try:
        mounts = [int(x) for x in args.mounts.split(",") if x.strip()]
        if not mounts or min(mounts) < 1 or max(mounts) > 512:
            raise ValueError
    except ValueError:
        logger.error("--mounts: %r is not a list of whole numbers from 1 to 512, e.g. 1,2,4,8", args.mounts)
        return EXIT_CONFIG
    model = args.model
    if model is None:
        from .tools.testing import cached_test_model

        model = str(cached_test_model(args.shape))
    try:
        report = run_bench(model, mounts, frames=args.frames, chunks=args.chunks, proto_steps=args.proto_steps,
                           dtypes=_listed(args.dtypes), weights_list=_listed(args.weights),
                           quality=args.quality, kv_list=_listed(args.kv), compile_list=_listed(args.compile),
                           codec_list=_listed(args.codec), kernels_list=_listed(args.kernels),
                           scenarios=_listed(args.scenarios),
                           context_seconds=args.context_seconds, capacity=args.capacity, decoder=args.decoder)
    except RadioError as exc:
        logger.error("%s", exc)
        return EXIT_RUNTIME
    _emit(format_table(report), report, args.json, write_json)
    return EXIT_OK


def _emit(table: str, report: dict, json_path: str | None, write_json: Callable[[dict, str], None]) -> None:
    print(table)
    if json_path:
        write_json(report, json_path)


def cmd_soak(args: argparse.Namespace) -> int:
    _setup_logging("INFO")
    from .tools.soak import format_soak, run_soak, write_json
    from .tools.testing import cached_test_model

    if args.stations < 1 or args.minutes <= 0:
        logger.error("--stations must be >= 1 and --minutes > 0")
        return EXIT_CONFIG
    model = args.model or str(cached_test_model(args.shape))
    try:
        report = run_soak(model, args.minutes, args.stations, warmup=args.warmup, settle_minutes=args.settle_minutes,
                          trace=args.trace, churn=args.churn)
    except RadioError as exc:
        logger.error("%s", exc)
        return EXIT_RUNTIME
    _emit(format_soak(report), report, args.json, write_json)
    return EXIT_OK if all(report["targets"].values()) else EXIT_RUNTIME


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bound_kernel_caches()  # before any command runs a model (bench and soak too)
    if args.command == "check":
        return cmd_check(args.paths)
    if args.command == "make-test-model":
        _setup_logging("INFO")
        from .tools.testing import make_test_model

        out = make_test_model(args.dir, shape=args.shape, seed=args.seed)
        print(out)
        return EXIT_OK
    if args.command == "run":
        return cmd_run(args)
    if args.command == "bench":
        return cmd_bench(args)
    if args.command == "soak":
        return cmd_soak(args)
    return EXIT_CONFIG


def entry() -> None:
    """The console script. After ``radio run`` has stopped everything it owns (in ``finally``: API, mounts,
    engine, local Icecast), the interpreter's own teardown of torch and its thread pools still takes seconds,
    which would hold up a service manager's stop; the process ends without it."""
    argv = sys.argv[1:]
    code = main(argv)
    if argv[:1] == ["run"]:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
