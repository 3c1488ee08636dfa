"""`dpcap <command>`: parse arguments, call the library, print. No logic lives here.

With `--json` the last stdout line is one JSON object. Exit codes: 0 done; 2 the user can fix it
(one `error: …` line on stderr, no traceback); 3 the privacy budget forbids the next step;
4 a training run stopped by SIGTERM/SIGUSR1 at a step boundary, resumable (requeue it).
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from dpcap.errors import EXIT_STOPPED, ConfigError, DpcapError

# Commands taking KEY=VALUE config overrides, which may come anywhere, also after options (see parse_args).
OVERRIDE_COMMANDS = ("train", "audit", "demo")
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def _add_json(parser: argparse.ArgumentParser, default: Any = argparse.SUPPRESS) -> None:
    # SUPPRESS below the top level: a sub-command's parser would otherwise reset a `--json` given
    # before the command name to False, so `--json` works wherever it is placed.
    parser.add_argument(
        "--json", action="store_true", default=default, help="print one JSON object as the last stdout line"
    )


def _add_extraction(parser: argparse.ArgumentParser) -> None:
    """Feature-extraction options of `probe` and `fewshot`."""
    parser.add_argument(
        "--cache",
        default=None,
        metavar="DIR",
        help="cache the features here, one safetensors file per chunk of 16,384 images: a killed run resumes "
        "from its finished chunks; required (one folder shared by all ranks) under torchrun/srun",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="images per encoder forward (default 256)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader processes decoding images (default 0)")
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (this rank's GPU if any, else the CPU; bf16 autocast on CUDA), cpu, cuda…",
    )


def _add_ema(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ema", action="store_true", help="use the run's EMA weights (train.ema_decay) instead of its last weights"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpcap", description="Differentially private image-captioning pre-training.")
    _add_json(parser, default=False)
    commands = parser.add_subparsers(dest="command", required=True)

    data_parser = commands.add_parser("data", help="build and inspect shard folders")
    _add_json(data_parser)
    data = data_parser.add_subparsers(dest="data_command", required=True)
    build = data.add_parser("build", help="validate a folder or JSONL/CSV manifest of image+caption pairs into shards")
    build.add_argument("src", help="folder of images with same-stem .txt captions, or a .jsonl/.csv manifest")
    build.add_argument("--out", required=True, help="output shard folder")
    build.add_argument("--samples-per-shard", type=int, default=1000)
    build.add_argument("--max-caption-chars", type=int, default=1000)
    build.add_argument(
        "--where", action="append", default=[], metavar="FIELD=VALUE", help="keep manifest rows matching"
    )
    build.add_argument("--overwrite", action="store_true", help="replace a finished build (an unfinished one resumes)")
    build.add_argument("--workers", type=int, default=1, help="processes decoding and validating images")
    _add_json(build)
    index = data.add_parser(
        "index", help="index existing WebDataset shards in place (tar headers only; the shards are not copied)"
    )
    index.add_argument(
        "src", nargs="+", help="a folder of .tar shards, a brace pattern, a .tar, or a file listing tars"
    )
    index.add_argument("--out", required=True, help="index folder to write (the sources are only read)")
    index.add_argument("--workers", type=int, default=1, help="processes indexing shards in parallel")
    index.add_argument("--caption-key", default="caption", help="JSON field holding the caption when there is no .txt")
    index.add_argument("--label-key", default=None, help="JSON field holding a class label, for probes")
    _add_json(index)
    stats = data.add_parser("stats", help="count samples, shards and bytes of a shard folder")
    stats.add_argument("dir")
    _add_json(stats)
    demo_data = data.add_parser("demo", help="render the offline emoji data set and shard its train/val/test splits")
    demo_data.add_argument("--out", required=True)
    demo_data.add_argument("--image-size", type=int, default=64)
    demo_data.add_argument("--limit", type=int, default=None)
    demo_data.add_argument("--overwrite", action="store_true")
    _add_json(demo_data)

    privacy_parser = commands.add_parser("privacy", help="privacy accounting")
    _add_json(privacy_parser)
    privacy = privacy_parser.add_subparsers(dest="privacy_command", required=True)
    eps = privacy.add_parser("epsilon", help="ε of the Poisson-subsampled Gaussian mechanism")
    eps.add_argument("--sigma", type=float, required=True)
    sig = privacy.add_parser("sigma", help="the smallest σ whose ε does not exceed the target")
    sig.add_argument("--epsilon", type=float, required=True)
    for sub in (eps, sig):
        sub.add_argument("--sample-rate", type=float, required=True)
        sub.add_argument("--steps", type=int, required=True)
        sub.add_argument("--delta", type=float, required=True)
        sub.add_argument("--accountant", default="prv", choices=["prv", "rdp"])
        _add_json(sub)

    plan = commands.add_parser("plan", help="σ, epochs and the accumulation layout for a target ε")
    plan.add_argument("--num-samples", type=int, required=True)
    plan.add_argument("--batch-size", type=int, required=True, help="expected logical batch qN")
    plan.add_argument("--steps", type=int, required=True)
    plan.add_argument("--epsilon", type=float, required=True)
    plan.add_argument("--delta", type=float, default=None, help="default 1/N")
    plan.add_argument("--gpus", type=int, default=None)
    plan.add_argument("--per-gpu-batch", type=int, default=None)
    plan.add_argument("--accountant", default="prv", choices=["prv", "rdp"])
    _add_json(plan)

    train = commands.add_parser("train", help="train (or auto-resume) a DP captioner")
    train.add_argument("config", nargs="?", help="YAML config (see configs/)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=10")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its LAST checkpoint")
    train.add_argument(
        "--allow-privacy-change",
        action="store_true",
        help="resume although the config changes the stored privacy plan (recorded as a new ledger segment)",
    )
    _add_json(train)

    export = commands.add_parser("export", help="export a run's encoder for timm / transformers with its privacy card")
    export.add_argument("run_dir")
    export.add_argument("--out", required=True)
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    _add_ema(export)
    _add_json(export)

    probe = commands.add_parser("probe", help="linear probe of a frozen encoder on labelled shard folders")
    probe.add_argument("encoder", help="a run folder, or random:SIZE for a randomly initialised encoder")
    probe.add_argument(
        "--train", required=True, help="shard folder with labels in the sample metadata, index, or ImageFolder tree"
    )
    probe.add_argument("--test", required=True)
    probe.add_argument("--val", default=None, help="default: hold out 20%% of --train (sweep protocol only)")
    probe.add_argument(
        "--label",
        default=None,
        help="metadata field holding the class (default: the data's own label: an ImageFolder tree's folder "
        "names, a WebDataset index's label key or .cls; a built shard folder needs one, e.g. --label group)",
    )
    probe.add_argument(
        "--protocol",
        default="sweep",
        choices=["sweep", "dpcap"],
        help="sweep: λ grid chosen on validation (default); dpcap: DP-Cap's recipe (mean of all tokens, "
        "centred + L2-normalised, λ = 0.0025/n, no bias, train → test)",
    )
    probe.add_argument(
        "--pool", default=None, choices=["mean", "cls", "mean_all"], help="default: mean (sweep), mean_all (dpcap)"
    )
    probe.add_argument("--threads", type=int, default=None, help="torch CPU threads for features and fits")
    _add_extraction(probe)
    probe.add_argument("--out", default=None, help="write the report JSON here (and a confusion-matrix PNG)")
    _add_ema(probe)
    _add_json(probe)

    fewshot = commands.add_parser("fewshot", help="k-shot linear classification with a frozen encoder")
    fewshot.add_argument("encoder", help="a run folder, or random:SIZE")
    fewshot.add_argument("--train", required=True)
    fewshot.add_argument("--test", required=True)
    fewshot.add_argument("--label", default="group")
    fewshot.add_argument("--pool", default="mean", choices=["mean", "cls"])
    fewshot.add_argument("--shots", type=int, nargs="+", default=[1, 2, 5, 10])
    fewshot.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    fewshot.add_argument("--out", default=None)
    fewshot.add_argument("--threads", type=int, default=None, help="torch CPU threads for features and fits")
    _add_extraction(fewshot)
    _add_ema(fewshot)
    _add_json(fewshot)

    zeroshot = commands.add_parser("zeroshot", help="zero-shot classification by caption likelihood")
    zeroshot.add_argument("run_dir")
    zeroshot.add_argument("--data", required=True, help="labelled shard folder to classify")
    zeroshot.add_argument("--label", default="subgroup")
    zeroshot.add_argument("--template", default="an emoji of {}", help="prompt with {} for the class name")
    zeroshot.add_argument("--out", default=None)
    _add_ema(zeroshot)
    _add_json(zeroshot)

    audit = commands.add_parser(
        "audit", help="insert canaries, train, measure leakage: AUC, exposure, empirical ε bound"
    )
    audit.add_argument("config", nargs="?", help="YAML config (see configs/audit-tiny.yaml)")
    audit.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. privacy.sigma=0")
    audit.add_argument("--out", required=True, help="new or empty output folder")
    audit.add_argument("--base", default=None, help="base training data (default: the config's data.shards)")
    audit.add_argument("--canaries", type=int, default=128)
    audit.add_argument("--candidates", type=int, default=256, help="secrets ranked per canary for exposure")
    audit.add_argument("--secret-words", type=int, default=3)
    audit.add_argument("--insert-prob", type=float, default=0.5)
    audit.add_argument("--confidence", type=float, default=0.95)
    audit.add_argument("--seed", type=int, default=None, help="canary seed (default: os.urandom)")
    _add_json(audit)

    demo = commands.add_parser("demo", help="the whole product on offline emoji data: data → DP train → export → probe")
    demo.add_argument("--config", default="configs/demo-cpu.yaml")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    _add_json(demo)
    return parser


def _cmd_data(args: argparse.Namespace) -> dict:
    if args.data_command == "build":
        from dpcap.data.build import build_shards

        where = dict(_split_pair(item, "--where") for item in args.where) or None
        return build_shards(
            args.src,
            args.out,
            samples_per_shard=args.samples_per_shard,
            max_caption_chars=args.max_caption_chars,
            where=where,
            overwrite=args.overwrite,
            workers=args.workers,
        )
    if args.data_command == "index":
        from dpcap.data.wds_index import build_wds_index

        return build_wds_index(
            args.src, args.out, workers=args.workers, caption_key=args.caption_key, label_key=args.label_key
        )
    if args.data_command == "stats":
        from dpcap.data.build import dataset_stats

        return dataset_stats(args.dir)
    from dpcap.data.demo import build_emoji_dataset

    return build_emoji_dataset(args.out, image_size=args.image_size, limit=args.limit, overwrite=args.overwrite)


def _split_pair(item: str, flag: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep:
        raise ConfigError(f"{flag} expects FIELD=VALUE, got {item!r}")
    return key, value


def _cmd_privacy(args: argparse.Namespace) -> dict:
    from dpcap.privacy.accountant import calibrate_sigma, epsilon

    common = dict(sample_rate=args.sample_rate, steps=args.steps, delta=args.delta, accountant=args.accountant)
    if args.privacy_command == "epsilon":
        return {"epsilon": epsilon(args.sigma, **common), "sigma": args.sigma, **common}
    return {"sigma": calibrate_sigma(args.epsilon, **common), "epsilon": args.epsilon, **common}


def _cmd_plan(args: argparse.Namespace) -> dict:
    from dpcap.privacy.planner import plan

    return plan(
        args.num_samples,
        args.batch_size,
        args.steps,
        args.epsilon,
        delta=args.delta,
        gpus=args.gpus,
        per_gpu_batch=args.per_gpu_batch,
        accountant=args.accountant,
    )


def _cmd_train(args: argparse.Namespace) -> dict:
    from dpcap.config import load_config
    from dpcap.train.loop import train

    config_path, overrides = args.config, list(args.overrides)
    if config_path and "=" in config_path and not Path(config_path).exists():
        config_path, overrides = None, [config_path, *overrides]
    if args.resume:
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume {args.resume}: no config.yaml there (not a run folder)")
        config_path, overrides = saved, [*overrides, f"run_dir={args.resume}"]
    if config_path is None and not overrides:
        raise ConfigError("give a CONFIG file (see configs/), key=value overrides, or --resume RUN_DIR")
    return train(load_config(config_path, overrides), allow_privacy_change=args.allow_privacy_change)


def _cmd_export(args: argparse.Namespace) -> dict:
    from dpcap.pipeline import export_run

    return export_run(args.run_dir, args.out, use_ema=args.ema, overwrite=args.overwrite)


def _cmd_probe(args: argparse.Namespace) -> dict:
    from dpcap.pipeline import probe_encoder

    result = probe_encoder(
        args.encoder,
        train_dir=args.train,
        test_dir=args.test,
        val_dir=args.val,
        label=args.label,
        pool=args.pool,
        protocol=args.protocol,
        out=args.out,
        use_ema=args.ema,
        log=lambda line: print(line, file=sys.stderr, flush=True),
        progress=True,
        threads=args.threads,
        cache_dir=args.cache,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
    )
    for warning in result.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    return result


def _cmd_fewshot(args: argparse.Namespace) -> dict:
    from dpcap.pipeline import fewshot_encoder

    return fewshot_encoder(
        args.encoder,
        train_dir=args.train,
        test_dir=args.test,
        label=args.label,
        pool=args.pool,
        shots=tuple(args.shots),
        seeds=tuple(args.seeds),
        out=args.out,
        use_ema=args.ema,
        threads=args.threads,
        cache_dir=args.cache,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        progress=True,
    )


def _cmd_zeroshot(args: argparse.Namespace) -> dict:
    from dpcap.pipeline import zeroshot_encoder

    return zeroshot_encoder(
        args.run_dir, data_dir=args.data, label=args.label, template=args.template, out=args.out, use_ema=args.ema
    )


def _cmd_audit(args: argparse.Namespace) -> dict:
    from dpcap.eval.audit import run_audit

    config_path, overrides = args.config, list(args.overrides)
    if config_path and "=" in config_path and not Path(config_path).exists():
        config_path, overrides = None, [config_path, *overrides]
    return run_audit(
        config_path,
        overrides,
        out_dir=args.out,
        canaries=args.canaries,
        seed=args.seed,
        base_source=args.base,
        candidates=args.candidates,
        secret_words=args.secret_words,
        insert_prob=args.insert_prob,
        confidence=args.confidence,
    )


def _cmd_demo(args: argparse.Namespace) -> dict:
    from dpcap.pipeline import run_demo

    return run_demo(args.config, args.out, overrides=args.overrides)


COMMANDS = {
    "data": _cmd_data,
    "privacy": _cmd_privacy,
    "plan": _cmd_plan,
    "train": _cmd_train,
    "export": _cmd_export,
    "probe": _cmd_probe,
    "fewshot": _cmd_fewshot,
    "zeroshot": _cmd_zeroshot,
    "audit": _cmd_audit,
    "demo": _cmd_demo,
}


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _print_human(result: dict) -> None:
    for key, value in result.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for sub, inner in value.items():
                print(f"  {sub}: {inner}")
        else:
            print(f"{key}: {value}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """`_parser().parse_args`, except that KEY=VALUE overrides may also follow options.

    argparse fills a nargs="*" positional only from the tokens before the next option, so in
    `dpcap audit CONFIG --out DIR privacy.sigma=0` the override comes back unrecognised. Such
    leftovers join the command's overrides (in order); any other unknown token is the usual
    argparse error (exit 2). `parse_intermixed_args` would do this, but refuses parsers with sub-commands.
    """
    parser = _parser()
    args, extras = parser.parse_known_args(argv)
    late, unknown = [], []
    for token in extras:
        is_override = args.command in OVERRIDE_COMMANDS and _OVERRIDE.match(token)
        (late if is_override else unknown).append(token)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if late:
        args.overrides = [*args.overrides, *late]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = _jsonable(COMMANDS[args.command](args))
    except DpcapError as err:
        message = str(err).strip().replace("\n", " | ")
        print(f"error: {message}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # outside the training loop (which checkpoints at a step boundary on SIGINT)
        print("error: interrupted (SIGINT); a run resumes from its LAST checkpoint", file=sys.stderr)
        return EXIT_STOPPED
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: no space left on the device ({err.filename or err}): free space and run again", file=sys.stderr)
        return 2
    if result.get("fit") == "on rank 0":  # a helper rank of a distributed probe: rank 0 prints the report
        print(f"rank {result['rank']}: features extracted; rank 0 fits and reports", file=sys.stderr)
        return 0
    if args.json:
        print(json.dumps(result, sort_keys=False))
    else:
        _print_human(result)
    if args.command == "train" and result.get("stopped_by") and not result.get("done"):
        return EXIT_STOPPED
    return 0


if __name__ == "__main__":
    sys.exit(main())
