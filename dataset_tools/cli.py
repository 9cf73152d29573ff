"""``perceive-shards``: build, verify and inspect WebDataset shard sets.

Examples:
  perceive-shards build out/ --clean photos/ --dataset mine workers=2 tile_size=512
  perceive-shards build s3://bucket/rain --clean norain/ --degraded rain/ --dataset rain100l \\
      --degradation rain --match rain100
  perceive-shards build --config configs/data/build_example.yaml workers=4
  perceive-shards build --config configs/data/bsd400_wed.yaml --config configs/data/rain100l.yaml workers=8
  perceive-shards build --config configs/data/sots_outdoor.yaml data_root=/data/raw output=/data/shards/sots_outdoor
  perceive-shards verify s3://bucket/rain --endpoint-url http://minio:9000
  perceive-shards inspect out/
Settings after the options are ``key=value`` overrides of the build configuration
(see dataset_tools/build.py: BuildConfig; the recipes of configs/data/ take ``data_root=`` for the
raw datasets' folder and ``output=`` for the shard set); with several ``--config`` files the sets are built in
order, each with the same overrides, and a finished set is confirmed, not rebuilt. Every subcommand takes the S3 endpoint as
``--endpoint-url URL`` (default: $AWS_ENDPOINT_URL) and other storage options as
``--option KEY=VALUE``. Exit codes: 0 done, 1 storage unreachable or verification failed,
2 bad arguments or inputs.
"""

from __future__ import annotations

import argparse
import json
import sys

from perceive_ir.config import ConfigError, load_config, parse_overrides
from perceive_ir.data.storage import (
    StorageError,
    add_endpoint_argument,
    close_filesystems,
    is_unreachable,
    set_default_endpoint,
)

from .build import BuildConfig, build_shards
from .inspect_shards import format_report, inspect
from .verify import verify


def _build_configs(args: argparse.Namespace) -> list[BuildConfig]:
    overrides = [p for p in args.positional if "=" in p]
    outputs = [p for p in args.positional if "=" not in p]
    if len(outputs) > 1:
        raise ConfigError(f"one output folder expected, got {outputs}")
    if outputs and len(args.config or []) > 1:
        raise ConfigError(f"an output folder ({outputs[0]}) with several --config files: each file names its own")
    set_output = [o for o in overrides if o.partition("=")[0].strip() == "output"]
    if set_output and len(args.config or []) > 1:
        raise ConfigError(f"'{set_output[0]}' with several --config files: each file names its own output")
    if outputs:
        overrides.append(f"output={outputs[0]}")
    if args.clean:
        source = {"dataset": args.dataset or "images", "split": args.split, "clean": args.clean}
        if args.degraded:
            source.update(degraded=args.degraded, degradation=args.degradation, match=args.match)
        overrides.append("sources=" + json.dumps([source]))
    elif not args.config:
        raise ConfigError("give --config FILE or --clean FOLDER (with --dataset NAME)")
    if args.workers:
        overrides.append(f"workers={args.workers}")
    options = parse_overrides(args.option)
    configs = []
    for path in args.config or [None]:
        cfg = load_config(BuildConfig, path, overrides)
        if options:  # for the output and every source, under the settings of the file
            cfg.storage_options = {**options, **cfg.storage_options}
            for source in cfg.sources:
                source.storage_options = {**options, **source.storage_options}
        configs.append(cfg)
    return configs


def _storage_arguments(parser: argparse.ArgumentParser) -> None:
    add_endpoint_argument(parser)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="storage option of every URL, e.g. anon=true (repeatable)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="perceive-shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build shards from image folders")
    b.add_argument("positional", nargs="*", metavar="OUTPUT | key=value",
                   help="output folder URL (local path, file://, s3://, gs://), then key=value settings")
    b.add_argument("--config", action="append", help="YAML build configuration (repeatable: built in order)")
    b.add_argument("--clean", help="folder URL of clean images")
    b.add_argument("--degraded", help="folder URL of degraded images paired with --clean")
    b.add_argument("--dataset", help="dataset name recorded in every sample")
    b.add_argument("--split", default="train")
    b.add_argument("--degradation", help="degradation type of a paired set (rain, haze, blur...)")
    b.add_argument("--match", default="same_stem", help="pairing rule: same_path, same_stem, rain100, reside, gopro (see perceive_ir.data.pairing)")
    b.add_argument("--workers", type=int, help="parallel worker processes")
    _storage_arguments(b)

    for name, helptext in (("verify", "check shards against the manifest"), ("inspect", "summarise a shard set")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("location", help="shard folder URL or its manifest.json")
        _storage_arguments(p)
        if name == "verify":
            p.add_argument("--no-decode", action="store_true", help="skip decoding every sample")
        else:
            p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    # Settings may come before or after the options: argparse reads positionals in one run.
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or args.command != "build"]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "build":
        args.positional += extra
    set_default_endpoint(args.endpoint_url)
    try:
        return _run(args)
    except ConfigError as err:
        return _fail(args.command, err, 2)
    except StorageError as err:
        return _fail(args.command, err, 1 if is_unreachable(err) else 2)
    except (RuntimeError, ValueError) as err:
        return _fail(args.command, err, 2)
    except Exception as err:  # noqa: BLE001 - a store that stops answering mid-way raises many kinds
        if not is_unreachable(err):
            raise
        return _fail(args.command, f"storage unreachable: {type(err).__name__}: {str(err).splitlines()[0]}", 1)
    finally:
        close_filesystems()


def _fail(command: str, err, code: int) -> int:
    print(f"perceive-shards {command}: error: {err}", file=sys.stderr)
    return code


def _run(args: argparse.Namespace) -> int:
    if args.command == "build":
        for cfg in _build_configs(args):  # all parsed first: a wrong key in the last file fails before any build
            manifest = build_shards(cfg)
            print(f"{cfg.output}: {manifest.total_samples} samples in {len(manifest.shards)} shards "
                  f"({manifest.total_bytes:,} bytes); {len(manifest.skipped)} files skipped")
            for entry in manifest.skipped[:20]:
                print(f"  skipped {entry.source}: {entry.reason}")
            if len(manifest.skipped) > 20:
                print(f"  ... and {len(manifest.skipped) - 20} more (see manifest.json)")
        return 0
    options = parse_overrides(args.option)
    if args.command == "verify":
        report = verify(args.location, options, decode=not args.no_decode)
        for problem in report.problems:
            print(f"PROBLEM {problem}")
        print(f"{'OK' if report.ok else 'FAILED'}: {report.shards} shards, {report.samples} samples, "
              f"{len(report.problems)} problems")
        return 0 if report.ok else 1
    summary = inspect(args.location, options)
    print(json.dumps(summary, indent=1) if args.json else format_report(summary))
    return 0

if __name__ == "__main__":
    sys.exit(main())
