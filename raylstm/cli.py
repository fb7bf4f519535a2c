"""`raylstm` command line: one subcommand per step of the pipeline, each a thin layer over a function
that the tests call directly. Heavy imports (torch, ray) happen inside the commands, so `--help` is fast.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable

Command = Callable[[argparse.Namespace], int]


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML or YAML config file (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field, e.g. --set train.lr=2e-3 (repeatable)",
    )


def _add_verbose_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's own log lines (workers, Train controller, Ray Data progress) and the full "
        "config; by default a progress line (steps, chars/s, ETA, val bpc) and raylstm's own lines",
    )


def _config(args: argparse.Namespace):
    from raylstm.config import load_config

    return load_config(args.config, args.overrides)


# --- prepare -------------------------------------------------------------------------------------------
def _prepare_parser(p: argparse.ArgumentParser) -> Command:
    from typing import get_args

    from raylstm.config import DataFormat

    p.add_argument(
        "sources", nargs="*", help="review files, dirs, globs or s3:// URIs (default: demo corpus)"
    )
    p.add_argument(
        "--out", required=True, help="output directory (Parquet shards, vocab.json, manifest.json)"
    )
    p.add_argument(
        "--format",
        choices=get_args(DataFormat),
        metavar="FORMAT",
        help="force a format: %(choices)s (default: data.format, auto: from file names and columns)",
    )
    p.add_argument(
        "--strict", action="store_true", help="fail on the first malformed row, naming file and line"
    )
    _add_config_args(p)

    def run(args: argparse.Namespace) -> int:
        import json

        from raylstm.prepare import prepare

        cfg = _config(args)
        if args.sources:
            cfg.data.sources = list(args.sources)
        if args.format:
            cfg.data.format = args.format
        if args.strict:
            cfg.data.strict = True
        manifest = prepare(cfg.data, args.out)
        print(json.dumps({k: manifest[k] for k in ("splits", "skipped") if k in manifest}, indent=2))
        return 0

    return run


# --- synth -------------------------------------------------------------------------------------------
def _synth_parser(p: argparse.ArgumentParser) -> Command:
    p.add_argument(
        "sources",
        nargs="*",
        help="real review files/dirs whose train-split sentences are recombined (default: demo corpus)",
    )
    p.add_argument("--out", required=True, help="empty or new directory for the shards and synth.json")
    p.add_argument("--size", default="100MB", help="review text to write (UTF-8 bytes), e.g. 10MB, 4GB")
    p.add_argument(
        "--layout",
        choices=["json", "tsv", "parquet", "mixed"],
        default="json",
        help="2023 JSON lines (.jsonl.gz), Amazon TSV (.tsv.gz), Parquet, or shards rotating all three",
    )
    p.add_argument("--shards", type=int, default=8, help="files to write (one Ray task each)")
    p.add_argument("--seed", type=int, default=0, help="the same seed and arguments write the same bytes")

    def run(args: argparse.Namespace) -> int:
        import json

        from raylstm.synth import generate, parse_size

        manifest = generate(
            args.out, parse_size(args.size), args.sources, args.layout, args.shards, args.seed
        )
        print(json.dumps({k: v for k, v in manifest.items() if k != "files"}, indent=2))
        return 0

    return run


# --- download ------------------------------------------------------------------------------------------
def _download_parser(p: argparse.ArgumentParser) -> Command:
    p.add_argument("category", nargs="?", default="Musical_Instruments", help="Amazon Reviews 2023 category")
    p.add_argument("--url", help="download this URL instead of the category's default")
    p.add_argument("--out", default="data", help="directory to download into")
    p.add_argument("--sha256", help="expected sha256 of the file; verified after download")

    def run(args: argparse.Namespace) -> int:
        from raylstm.download import download_category

        path = download_category(args.category, out_dir=args.out, url=args.url, sha256=args.sha256)
        print(path)
        return 0

    return run


# --- train ---------------------------------------------------------------------------------------------
def _train_parser(p: argparse.ArgumentParser) -> Command:
    _add_config_args(p)
    p.add_argument("--data", nargs="*", default=None, help="review sources or a `raylstm prepare` dir")
    p.add_argument("--workers", type=int, help="Ray Train workers (overrides train.num_workers)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL, bf16 autocast")
    p.add_argument("--storage", default="runs", help="run storage: a local path or s3://bucket/prefix")
    p.add_argument("--name", default=None, help="run name; rerunning a name continues that run")
    p.add_argument(
        "--address", default=None, help="Ray address to join (default: RAY_ADDRESS or a local Ray)"
    )
    _add_verbose_arg(p)

    def run(args: argparse.Namespace) -> int:
        from raylstm.train import train
        from raylstm.train_loop import TrainingDiverged

        cfg = _config(args)
        if args.data:
            cfg.data.sources = list(args.data)
        if args.workers:
            cfg.train.num_workers = args.workers
        if args.gpu:
            cfg.train.use_gpu = True
        try:
            result = train(
                cfg, storage=args.storage, name=args.name, address=args.address, verbose=args.verbose
            )
        except TrainingDiverged as e:
            # Not a crash: the message says which setting to change, and the checkpoints before it stand.
            print(f"raylstm train: {e}", file=sys.stderr)
            return 3
        print(f"best checkpoint: {result.best_checkpoint}  val_bpc={result.best_metrics.get('val_bpc')}")
        print(f"run dir: {result.run_dir}")
        return 0

    return run


# --- sample --------------------------------------------------------------------------------------------
def _sample_parser(p: argparse.ArgumentParser) -> Command:
    p.add_argument("--checkpoint", required=True, help="a run dir (uses best.json) or a checkpoint dir")
    p.add_argument(
        "--prime",
        default="I bought these ",
        help="text to start from; cleaned as the training text was (the checkpoint's lowercase/ASCII, "
        "HTML entities, NFKC)",
    )
    p.add_argument("--temperature", type=float, nargs="+", default=[0.5], help="0 = argmax; several allowed")
    p.add_argument("--length", type=int, default=300, help="characters to generate")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely characters (0 = all)")
    p.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling: smallest set reaching p (1 = off)"
    )
    p.add_argument(
        "--min-p", type=float, default=0.0, help="drop characters below p x the most likely one (0 = off)"
    )
    p.add_argument(
        "--presence-penalty",
        type=float,
        default=0.0,
        help="-2..2, minus this for every char already generated",
    )
    p.add_argument(
        "--frequency-penalty",
        type=float,
        default=0.0,
        help="-2..2, minus this x how often a char was generated",
    )
    p.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="> 0, vLLM's: 1 = off, > 1 discourages repeats"
    )
    p.add_argument(
        "--stop", action="append", default=[], help="stop string: the text ends before it (repeatable)"
    )
    p.add_argument("--n", type=int, default=1, help="samples per temperature (sample i uses seed + i)")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="makes output reproducible; training prints the seed of each of its samples",
    )
    p.add_argument("--raw-prompt", action="store_true", help="do not clean the prime")
    p.add_argument("--rating", help="a conditioned model: write a review of this many stars (1-5)")
    p.add_argument("--category", help='a conditioned model: of this category, e.g. "Musical Instruments"')
    p.add_argument(
        "--steer-sentiment",
        type=float,
        help="fix the sentiment unit: +1 positive, -1 negative (Radford et al.; needs --sentiment-unit "
        "or RUN_DIR/sentiment.json from `raylstm classify --probe --unit-out`)",
    )
    p.add_argument("--sentiment-unit", help="the sentiment unit file (default: sentiment.json of the run)")
    p.add_argument(
        "--guidance",
        type=float,
        help="with --rating: Bayes-rule guidance of weight W toward that rating (raylstm.guidance; "
        "0 = the plain conditioned sampler; costs 5 model rows per character with --category)",
    )

    def run(args: argparse.Namespace) -> int:
        from raylstm.sample import SampleParams, Sampler

        if args.length < 0:
            raise ValueError("--length must be >= 0")
        if args.n < 1:
            raise ValueError("--n must be >= 1")
        sampler = Sampler.load(args.checkpoint, sentiment_unit=args.sentiment_unit)
        conditions = {
            k: v for k, v in (("rating", args.rating), ("category", args.category)) if v is not None
        }
        print(
            f"# checkpoint {sampler.path}  step {sampler.step_number}  val_bpc {sampler.info()['val_bpc']}",
            file=sys.stderr,
        )
        params = [
            SampleParams(
                temperature=t,
                top_k=args.top_k,
                top_p=args.top_p,
                min_p=args.min_p,
                presence_penalty=args.presence_penalty,
                frequency_penalty=args.frequency_penalty,
                repetition_penalty=args.repetition_penalty,
                max_chars=args.length,
                stop=tuple(args.stop),
                seed=args.seed,
                clean_prompt=not args.raw_prompt,
                conditions=conditions,
                steer_sentiment=args.steer_sentiment,
            )
            for t in args.temperature
        ]
        # All temperatures in one batch, as the trainer samples them: --seed S prints what it printed.
        if args.guidance is not None:
            from raylstm.guidance import generate_guided

            out = generate_guided(sampler, [args.prime] * len(params), params, args.guidance, n=args.n)
        else:
            out = sampler.generate([args.prime] * len(params), params, n=args.n)
        prompt = out[0][0].prompt
        if prompt.changes:
            changes = ", ".join(prompt.changes)
            print(f"# prime cleaned as the training text was ({changes}): {prompt.text!r}", file=sys.stderr)
        if prompt.unknown_chars:
            print(
                f"# prime characters outside the vocabulary (read as unknown): {prompt.unknown_chars!r}",
                file=sys.stderr,
            )
        for t, group in zip(args.temperature, out):
            for c in group:
                print(f"----- temperature {t:g}  seed {c.seed}  sample {c.index}  ({c.finish_reason})")
                print(prompt.text + c.text)
        return 0

    return run


# --- serve ---------------------------------------------------------------------------------------------
def _serve_parser(p: argparse.ArgumentParser) -> Command:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run dir: serve its best checkpoint and follow best.json (hot reload)")
    src.add_argument("--checkpoint", help="serve this checkpoint dir (or s3:// URI)")
    _add_config_args(p)
    p.add_argument("--host", help="bind address (default 127.0.0.1; 0.0.0.0 exposes it: put TLS in front)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--replicas", type=int, help="replicas (each its own engine and batch; default 1)")
    p.add_argument("--gpu", action="store_true", help="one GPU per replica")
    p.add_argument(
        "--max-batch-size",
        type=int,
        help="rows per model step per replica (serve.max_batch_size, default 32)",
    )
    p.add_argument(
        "--max-queued",
        type=int,
        help="requests waiting per replica before 429 + Retry-After (serve.max_queued, default 64)",
    )
    p.add_argument(
        "--address", default=None, help="Ray address to join (default: RAY_ADDRESS or a local Ray)"
    )

    def run(args: argparse.Namespace) -> int:
        from raylstm.serve import run_server

        cfg = _config(args).serve
        if args.host:
            cfg.host = args.host
        if args.port is not None:
            cfg.port = args.port
        if args.replicas:
            cfg.num_replicas = args.replicas
            cfg.max_replicas = max(cfg.max_replicas, args.replicas)
        if args.gpu:
            cfg.num_gpus = 1.0
        if args.max_batch_size:
            cfg.max_batch_size = args.max_batch_size
        if args.max_queued is not None:
            cfg.max_queued = args.max_queued
        # "Ctrl-C to stop" must hold even when the server was started as a background job (`raylstm serve &`
        # from a script): such a job inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        return run_server(args.run or args.checkpoint, cfg, follow=bool(args.run), address=args.address)

    return run


# --- evaluate ------------------------------------------------------------------------------------------
def _evaluate_parser(p: argparse.ArgumentParser) -> Command:
    p.add_argument("--checkpoint", required=True, help="a run dir (uses best.json) or a checkpoint dir")
    p.add_argument(
        "--data",
        nargs="*",
        default=None,
        help="review sources or a `raylstm prepare` dir (default: the data the checkpoint was trained on)",
    )
    p.add_argument(
        "--split",
        default="test",
        choices=["train", "val", "test", "all"],
        help="which split to score (default test: held out from training)",
    )
    p.add_argument("--json", dest="json_out", help="also write the results as JSON here")
    p.add_argument(
        "--no-baselines",
        action="store_true",
        help="model bpc only: skip unigram and the compressors (xz/PPMd take ~10 s per 5 MB)",
    )
    p.add_argument(
        "--address", default=None, help="Ray address to join (default: RAY_ADDRESS or a local Ray)"
    )

    def run(args: argparse.Namespace) -> int:
        from raylstm.checkpoint import load_checkpoint
        from raylstm.evaluate import evaluate, format_table, write_json
        from raylstm.ray_env import ensure_ray

        checkpoint = load_checkpoint(args.checkpoint)  # a bad path fails here, before Ray starts
        ensure_ray(args.address)
        result = evaluate(checkpoint, split=args.split, sources=args.data, compressors=not args.no_baselines)
        print(format_table(result))
        if args.json_out:
            print(f"wrote {write_json(result, args.json_out)}")
        return 0

    return run


# --- classify ------------------------------------------------------------------------------------------
def _classify_parser(p: argparse.ArgumentParser) -> Command:
    p.add_argument("--checkpoint", required=True, help="a run dir (uses best.json) or a checkpoint dir")
    p.add_argument("texts", nargs="*", help="reviews to classify (a conditioned model)")
    p.add_argument("--file", help="more reviews to classify, one per line")
    p.add_argument(
        "--category",
        help="the category the reviews were filed under (else the rating is summed over categories)",
    )
    p.add_argument(
        "--data",
        nargs="*",
        default=None,
        help="held-out figures instead: rating and category by Bayes' rule vs the majority class and "
        "TF-IDF + LR on this data's split (no value: the data the checkpoint was trained on)",
    )
    p.add_argument("--split", default="test", choices=["val", "test"], help="the split --data scores")
    p.add_argument(
        "--probe",
        action="store_true",
        help="the sentiment probe and unit (any model) on the labelled sets of --labelled, held-out labels",
    )
    p.add_argument(
        "--labelled",
        default=None,
        help="the dir with sorted_data_acl/ and amazon_cells_labelled.txt (default ../shared/data/amazon)",
    )
    p.add_argument(
        "--unit-out",
        default=None,
        help="with --probe: write the sentiment unit here (what `raylstm sample --sentiment-unit` reads)",
    )
    p.add_argument("--json", dest="json_out", help="also write the results as JSON here")
    p.add_argument(
        "--address", default=None, help="Ray address to join (default: RAY_ADDRESS or a local Ray)"
    )

    def run(args: argparse.Namespace) -> int:
        import json
        from pathlib import Path

        from raylstm import classify
        from raylstm.checkpoint import load_checkpoint

        ckpt = load_checkpoint(args.checkpoint)
        if args.probe or args.data is not None:
            from raylstm.ray_env import ensure_ray

            ensure_ray(args.address)
        if args.probe:
            labelled = Path(args.labelled) if args.labelled else Path.cwd().parent / "shared/data/amazon"
            result, unit = classify.sentiment_report(ckpt, classify.labelled_sets(labelled, ckpt.config.data))
            if args.unit_out:
                print(f"wrote {unit.save(args.unit_out)}", file=sys.stderr)
        elif args.data is not None:
            result = classify.heldout_report(ckpt, args.data or None, args.split)
        else:
            texts = list(args.texts)
            if args.file:
                texts += [line for line in Path(args.file).read_text().splitlines() if line.strip()]
            if not texts:
                raise ValueError("give reviews to classify (arguments or --file), or --data, or --probe")
            known = {"category": [args.category] * len(texts)} if args.category else None
            posts = classify.classify_reviews(ckpt, texts, known)
            result = [{"text": t, **p} for t, p in zip(texts, posts)]
        print(json.dumps(result, indent=2))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result, indent=2))
        return 0

    return run


# --- demo ----------------------------------------------------------------------------------------------
def _demo_parser(p: argparse.ArgumentParser) -> Command:
    p.add_argument("--workdir", default="runs/demo", help="where the demo writes its prepared data and run")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one field of configs/demo.toml, e.g. --set train.max_steps=100 (repeatable)",
    )
    _add_verbose_arg(p)

    def run(args: argparse.Namespace) -> int:
        from raylstm.demo import run_demo

        return run_demo(args.workdir, args.overrides, verbose=args.verbose)

    return run


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Command]]] = {
    "prepare": ("clean, split and encode review files into Parquet shards + vocab.json", _prepare_parser),
    "synth": (
        "write a large synthetic review corpus (real sentences, unique reviews) for scale tests",
        _synth_parser,
    ),
    "download": (
        "fetch a public Amazon Reviews 2023 category file (resumable, checksummed)",
        _download_parser,
    ),
    "train": ("train a char-LSTM with Ray Train (DDP) on Ray Data", _train_parser),
    "sample": ("generate text from a checkpoint", _sample_parser),
    "serve": ("serve a checkpoint over HTTP with Ray Serve", _serve_parser),
    "evaluate": ("held-out bits per char vs unigram, gzip, bz2, xz and PPMd", _evaluate_parser),
    "classify": (
        "a review's rating/category by Bayes' rule on a conditioned model; the sentiment probe and unit",
        _classify_parser,
    ),
    "demo": ("prepare the demo corpus, train, serve and sample: the whole path on one machine", _demo_parser),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    parser = argparse.ArgumentParser(prog="raylstm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    runners: dict[str, Command] = {}
    for name, (help_text, make) in COMMANDS.items():
        runners[name] = make(sub.add_parser(name, help=help_text, description=help_text))
    return parser, runners


def main(argv: list[str] | None = None) -> int:
    parser, runners = build_parser()
    args = parser.parse_args(argv)
    try:
        return runners[args.command](args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as e:
        # Config, data and checkpoint errors already name the file/field; show them without a traceback.
        print(f"raylstm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
