"""Command-line entry points.

``tools/classification/{train,test}.py`` call :func:`train_main` / :func:`test_main`;
the ``negmargin`` command adds ``prepare``, ``demo``, ``predict`` and ``embed``.
A :class:`~negmargin.errors.UserError` is printed as one line (``error: ...``) with a
non-zero exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import distributed as dist
from . import pretrained
from .checkpoint import export_checkpoint
from .config import Config, apply_override, load_config
from .curves import plot_curves, read_logs
from .datasets import DATASETS, load_split
from .errors import NonFiniteLossError, UserError
from .evaluate import run_test
from .features import extract_features
from .fileio import atomic_save, atomic_write_text, file_sha256, probe_writable
from .imageio import Skipped, collect_query_paths, read_support_folder
from .meta_test import run_meta_test
from .predict import FewShotClassifier, positive_int, probability
from .train import run


def _guard(fn: Callable[[], int | None]) -> int:
    try:
        code = int(fn() or 0)
        # Under torchrun, leave together: a rank that tears its process group down
        # while another is still finishing (rank 0 writing checkpoints) was seen to
        # abort at exit once in CI (gloo, SIGABRT). No-op outside torchrun.
        dist.barrier()
        return code
    except (UserError, NonFiniteLossError) as exc:
        rank = f"[rank {dist.rank()}] " if dist.world_size() > 1 else ""
        print(f"error: {rank}{exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        dist.shutdown()


class Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors: ``error: argument --top-k: ...``, exit 2."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _checked(check: Callable, parse: Callable[[str], object] = int) -> Callable[[str], object]:
    """An argparse type from one of predict's checks, so the CLI and the API refuse alike."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        try:
            return check("value", value)
        except UserError as exc:
            raise argparse.ArgumentTypeError(str(exc).replace("value ", "", 1)) from None

    convert.__name__ = check.__name__  # argparse names the type in its messages
    return convert


def _common(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The options train.py and test.py share; returns the mmfewshot-compatibility group."""
    parser.add_argument("config", help="config file, e.g. configs/classification/neg_margin/cub/...py")
    parser.add_argument(
        "--cfg-options",
        "--options",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        dest="cfg_options",
        help="override config keys, e.g. train.lr=0.1 model.margin=-0.02",
    )
    parser.add_argument("--work-dir", help="output folder (default: work_dir/<config name>)")
    parser.add_argument("--data-root", help="dataset folder (overrides data.root)")
    parser.add_argument("--seed", type=int, help="training seed (train) / fine-tune seed (test)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N (overrides train.device)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    compat = parser.add_argument_group("accepted for mmfewshot compatibility; ignored")
    compat.add_argument(
        "--launcher",
        choices=["none", "pytorch"],
        default="none",
        help="torchrun is detected from its variables",
    )
    compat.add_argument("--local_rank", "--local-rank", type=int, default=0, help="torchrun sets LOCAL_RANK")
    return compat


def work_dir_for(cfg: Config, override: str | Path | None) -> Path:
    """``work_dir/<config name>`` by default (the seed README's layout)."""
    return Path(override) if override else Path("work_dir") / cfg.name


def with_overrides(cfg: Config, seed: int | None, deterministic: bool) -> Config:
    train = cfg.train
    if seed is not None:
        train = replace(train, seed=seed)
    if deterministic:
        train = replace(train, deterministic=True)
    return replace(cfg, train=train).validate()


def _load(args: argparse.Namespace) -> Config:
    overrides = list(args.cfg_options)
    if args.data_root:
        overrides.append(f"data.root={args.data_root!r}")
    if args.device:
        overrides.append(f"train.device={args.device!r}")
    return load_config(args.config, overrides)


def train_main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="train.py", description="Base-train a Neg-Margin model.")
    _common(parser)
    parser.add_argument("--resume-from", "--resume", dest="resume_from", help="checkpoint to resume from")
    parser.add_argument(
        "--auto-resume", action="store_true", help="resume from <work dir>/latest.pth if it exists"
    )
    parser.add_argument(
        "--deterministic", action="store_true", help="deterministic algorithms (exact replays on CPU)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a work dir that holds a run (its checkpoints are deleted)",
    )
    args = parser.parse_args(argv)

    def go() -> None:
        cfg = with_overrides(_load(args), args.seed, args.deterministic)
        summary = run(
            cfg,
            work_dir_for(cfg, args.work_dir),
            args.resume_from,
            args.auto_resume,
            progress=not args.quiet,
            overwrite=args.overwrite,
        )

        if summary.get("best_accuracy_mean") is not None and dist.is_main():
            print(
                f"best val accuracy_mean {summary['best_accuracy_mean']:.2f} (epoch {summary['best_epoch']}); "
                f"checkpoint: {summary['best_checkpoint']}"
            )

    return _guard(go)


def test_main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="test.py", description="Meta-test a checkpoint (5-way episodes).")
    compat = _common(parser)
    parser.add_argument("checkpoint", help="e.g. work_dir/<config name>/best_accuracy_mean.pth")
    parser.add_argument(
        "--shots",
        type=_checked(positive_int),
        nargs="+",
        help="shot counts to test (default: the config's); --shots 1 5 runs both from one checkpoint",
    )
    parser.add_argument("--both-shots", action="store_true", help="same as --shots 1 5")
    parser.add_argument("--split", default="test", choices=["test", "val"])
    parser.add_argument("--n-way", type=int)
    parser.add_argument("--n-query", type=int)
    parser.add_argument("--n-episodes", type=int)
    parser.add_argument(
        "--steps", type=_checked(positive_int), help="fine-tune steps per episode (default 150 / 600)"
    )
    parser.add_argument("--episode-seed", type=int)
    parser.add_argument(
        "--test-dataset",
        help="take the test classes from another dataset (cross-domain, e.g. cub for a miniImageNet model)",
    )
    parser.add_argument("--test-data-root", help="that dataset's folder (with --test-dataset)")
    parser.add_argument("--show-task-results", action="store_true", help="print every episode's accuracy")
    compat.add_argument(
        "--metrics", nargs="*", default=None, help="accuracy (mean and 95%% CI) is always reported"
    )
    args = parser.parse_args(argv)

    def go() -> None:
        for key in ("n_way", "n_query", "n_episodes", "episode_seed"):
            value = getattr(args, key)
            if value is not None:
                args.cfg_options.append(f"meta_test.{key}={value}")
        if args.seed is not None:
            args.cfg_options.append(f"finetune.seed={args.seed}")
        cfg = _load(args)
        shots = [1, 5] if args.both_shots else args.shots
        if bool(args.test_dataset) != bool(args.test_data_root):
            raise UserError("--test-dataset and --test-data-root go together (the dataset and its folder)")
        run_test(
            cfg,
            args.checkpoint,
            work_dir_for(cfg, args.work_dir),
            shots,
            args.split,
            args.show_task_results,
            progress=not args.quiet,
            steps=args.steps,
            test_data=(args.test_dataset, args.test_data_root) if args.test_dataset else None,
        )

    return _guard(go)


# ------------------------------------------------------------------ negmargin command


# The clone this package runs from (pip install -e .), and its configs.
REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "classification" / "neg_margin"
# ``negmargin prepare DATASET`` without --config: a dataset whose config stores its images
# differently from the defaults (size, channels) reads that config.
PREPARE_CONFIGS = {"omniglot": CONFIGS / "omniglot" / "neg-margin_cosine_conv4_1xb64_omniglot_5way-1shot.py"}


def _prepare(args: argparse.Namespace) -> None:
    config = args.config or PREPARE_CONFIGS.get(args.dataset)
    if config:
        cfg = load_config(config, [f"data.dataset={args.dataset!r}", *args.cfg_options])
    else:
        raw: dict = {"data": {"dataset": args.dataset}}
        for item in args.cfg_options:
            apply_override(raw, item)
        cfg = Config.from_dict(raw).validate()
    changes = {
        "root": args.root,
        "train_store_size": args.size,
        "prepare_workers": args.workers,
        "skip_bad_images": True if args.skip_bad_images else None,
    }
    data = replace(cfg.data, **{k: v for k, v in changes.items() if v is not None})
    cfg = replace(cfg, data=data).validate()
    for split in args.splits:
        t = time.time()
        packed = load_split(cfg, split)
        print(f"{split}: {len(packed)} images in {packed.folder} ({time.time() - t:.1f} s)")


def _demo(args: argparse.Namespace) -> None:
    config = Path(args.config)
    if not config.is_file() and not config.is_absolute():
        config = REPO / config
    if not config.is_file():
        raise UserError(
            f"demo config '{args.config}' not found; run from the repository root or pass --config"
        )
    cfg = load_config(config, list(args.cfg_options))
    work_dir = work_dir_for(cfg, args.work_dir)
    t0 = time.time()
    # A finished demo run is resumed (nothing left to train), so running the demo again re-tests it.
    summary = run(cfg, work_dir, auto_resume=True, progress=not args.quiet)
    t_train = time.time() - t0
    results = run_test(cfg, work_dir / "best_accuracy_mean.pth", work_dir, [1, 5], progress=not args.quiet)
    total = time.time() - t0
    print()
    print(
        f"demo done in {total:.0f} s (training {t_train:.0f} s, best val {summary['best_accuracy_mean']:.2f}% "
        f"at epoch {summary['best_epoch']})"
    )
    for r in results:
        print(f"  novel classes, {r.line()}   (chance: {100 / r.n_way:.0f}%)")


def _log(args: argparse.Namespace) -> Callable[[str], None]:
    return (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))


def _classifier(args: argparse.Namespace) -> FewShotClassifier:
    """The model a command names: --checkpoint FILE, --model NAME or --classifier FILE."""
    if args.model:
        return FewShotClassifier.from_pretrained(args.model, device=args.device)
    if getattr(args, "classifier", None):
        return FewShotClassifier.load(args.classifier, device=args.device)
    return FewShotClassifier.from_checkpoint(args.checkpoint, device=args.device, config=args.config)


def _predict(args: argparse.Namespace) -> None:
    log = _log(args)
    if args.out:
        check_output_path(args.out)
    if args.save_classifier:
        check_output_path(args.save_classifier, "--save-classifier")
    if not args.support and not args.classifier:
        raise UserError(
            "--support is needed (a folder with one sub-folder of images per class) unless --classifier"
        )
    paths, skipped = collect_query_paths(args.query)  # before any work: a typo fails in a second
    clf = _classifier(args)
    if args.support and args.classifier:  # more support for a kept classifier: refit, old images not re-read
        support = read_support_folder(args.support)
        clf.add(support.paths, support.labels, args.steps)
        log(support.line())
        if report := support.skipped.line("the support folder"):
            log(report)
    elif args.support:
        clf.fit_folder(args.support, steps=args.steps, log=log)
    if args.save_classifier:
        if args.unknown_below is not None:
            clf.unknown_below = args.unknown_below
        log(f"classifier saved to {clf.save(args.save_classifier)}")
    rows, bad = clf.predict_rows(
        paths,
        top_k=args.top_k,
        unknown_below=args.unknown_below,
        batch_size=args.batch_size,
        skip_bad=args.skip_bad_images,
        progress=not args.quiet,
    )
    for report in (skipped.line("the query folders"), bad.line("the queries")):
        if report:
            print(report, file=sys.stderr)
    write_predictions(rows, args.out, as_json=args.json, top_k=args.top_k, log=log)
    log(summary_line(rows, bad))


def _embed(args: argparse.Namespace) -> None:
    check_output_path(args.out)
    paths, skipped = collect_query_paths(args.paths, what="image")
    clf = _classifier(args)
    feats, kept, bad = clf.embed_each(paths, args.batch_size, args.skip_bad_images, progress=not args.quiet)
    for report in (skipped.line("the folders"), bad.line("the images")):
        if report:
            print(report, file=sys.stderr)
    kept_paths = np.array([str(paths[i]) for i in kept])
    atomic_save(args.out, lambda f: np.savez(f, features=feats.numpy(), paths=kept_paths))
    print(f"wrote {len(kept)} × {feats.shape[1]} features to {args.out}")


# ------------------------------------------------------------------ predict's output


def check_output_path(path: str | Path, name: str = "--out") -> Path:
    """Fail before any work if ``path`` cannot be written (names the user's path, not a temp file)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{name} '{path}' is a folder; give a file name")
    folder = path.parent
    try:
        probe_writable(folder)
    except OSError as exc:
        raise UserError(f"cannot write {name} '{path}': {exc.strerror or exc} in '{folder}'") from None
    return path


def summary_line(rows: list[dict], skipped: Skipped) -> str:
    counts = Counter(str(r["predicted"]) for r in rows)
    text = f"classified {len(rows)} images: " + ", ".join(f"{c} {n}" for c, n in counts.most_common())
    bad = skipped.reasons.get("unreadable image(s)", [])
    return text + (f"; {len(bad)} unreadable image(s) skipped" if bad else "")


def write_predictions(
    rows: list[dict],
    out: str | Path | None,
    as_json: bool,
    top_k: int = 3,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> None:
    """Print a table (or JSON) with the top-k classes and write CSV/JSON to ``out`` if given."""
    if as_json:
        print(json.dumps(rows, indent=1, default=str))
    elif rows:
        width = min(60, max(len(r["path"]) for r in rows))
        k = max(len(r["top_k"]) for r in rows)
        title = f"{'image':<{width}}  {'predicted':<20} {'prob':>6}"
        if k > 1:
            title += "  " + "  ".join(f"top{i}" for i in range(2, k + 1))
        print(title)
        for r in rows:
            line = f"{r['path'][-width:]:<{width}}  {str(r['predicted']):<20} {r['probability']:>6.3f}"
            if k > 1:
                line += "  " + "  ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top_k"][1:])
            print(line)
    if out is None:
        return
    out = Path(out)
    if as_json or out.suffix.lower() == ".json":
        atomic_write_text(out, json.dumps(rows, indent=1, default=str))
    else:
        buf = io.StringIO()
        writer = csv.writer(buf)
        k = max((len(r["top_k"]) for r in rows), default=top_k)
        header: list[str] = ["path", "predicted", "probability"]
        for i in range(1, k + 1):
            header += [f"top{i}_class", f"top{i}_probability"]
        writer.writerow(header)
        for r in rows:
            row = [r["path"], r["predicted"], r["probability"]]
            for t in r["top_k"]:
                row += [t["class"], t["probability"]]
            writer.writerow(row)
        atomic_write_text(out, buf.getvalue())
    log(f"wrote {len(rows)} predictions to {out}")


def _plot(args: argparse.Namespace) -> None:
    """Training curves of a run (its sittings' logs joined) as a png."""
    curves = read_logs(args.logs)
    first = Path(args.logs[0])
    out = check_output_path(args.out or (first if first.is_dir() else first.parent) / "curves.png")
    title = args.title if args.title is not None else (first.name if first.is_dir() else first.parent.name)
    plot_curves(curves, out, title)
    best = curves.best
    where = f"best val {best[1]:.2f} at epoch {best[0]}" if best else "no validation logged yet"
    last = f"epoch {curves.epoch_pos[-1]:.2f}" if curves.epoch_pos else "no training logged"
    print(f"{len(curves.sources)} log(s), up to {last}; {where}; figure: {out}")


def _export(args: argparse.Namespace) -> None:
    """A checkpoint's weights, config and history without its training state (for publishing)."""
    out = check_output_path(args.out)
    written = export_checkpoint(args.checkpoint, out)
    before, after = Path(args.checkpoint).stat().st_size, out.stat().st_size
    print(
        f"wrote {out}: {after / 2**20:.2f} MiB (from {before / 2**20:.2f} MiB), epoch {written.get('epoch')}, "
        f"sha256 {file_sha256(out)}; tests and predicts like the original, cannot resume training"
    )


def _models(args: argparse.Namespace) -> None:
    print(pretrained.listing())


def _meta_test(args: argparse.Namespace) -> None:
    """A published model's few-shot accuracy on a dataset's test classes, by the benchmark's episodes."""
    model = pretrained.published(args.model)
    pretrained.check_benchmark(model, args.dataset)
    clf = FewShotClassifier.from_pretrained(args.model, device=args.device)
    cfg = replace(clf.cfg, data=replace(clf.cfg.data, dataset=args.dataset, root=args.data_root,
                                        cache_dir=args.cache_dir))  # fmt: skip
    packed = load_split(cfg, "test", progress=not args.quiet)
    feats = extract_features(clf.backbone, packed, cfg, clf.runtime, not args.quiet, "embed test images")
    for n_shot in args.shots:
        ev = replace(cfg.meta_test, n_shot=n_shot, n_episodes=args.n_episodes, steps=None)
        r = run_meta_test(feats, packed.labels, ev, cfg.finetune, packed.class_names, progress=not args.quiet)
        print(f"{args.model} on {args.dataset} test classes, {r.line()}")


def _inference_options(p: argparse.ArgumentParser, classifier: bool = False) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="a checkpoint written by train.py")
    which.add_argument("--model", help="a published model by name (negmargin models lists them)")
    if classifier:
        which.add_argument("--classifier", help="a classifier kept with --save-classifier")
    p.add_argument("--batch-size", type=_checked(positive_int), default=64, help="images per forward pass")
    p.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="skip unreadable images (listed and counted) instead of stopping",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--config", help="config to use instead of the one stored in the checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="negmargin", description="Neg-Margin few-shot classification.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("train", help="same as tools/classification/train.py", add_help=False)
    sub.add_parser("test", help="same as tools/classification/test.py", add_help=False)

    p = sub.add_parser("prepare", help="decode a dataset once into the packed cache")
    p.add_argument("dataset", help=", ".join(sorted(DATASETS)))
    p.add_argument("--root", help="dataset folder")
    p.add_argument("--size", type=int, help="short side of stored training images (default 256)")
    p.add_argument("--config", help="take data settings from this config instead")
    p.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    p.add_argument("--workers", type=int, help="decode processes (default: all cores)")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable files (prints how many)")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")

    p = sub.add_parser(
        "demo", help="generate the demo dataset, train and meta-test on it (a few minutes on 2 CPU cores)"
    )
    p.add_argument(
        "--config",
        default="configs/classification/neg_margin/demo/neg-margin_cosine_conv4_demo_5way-1shot.py",
    )
    p.add_argument("--work-dir")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("predict", help="few-shot prediction on your own images")
    _inference_options(p, classifier=True)
    p.add_argument(
        "--support",
        help="folder with one sub-folder of labelled images per class (nested folders read); "
        "with --classifier: more support, added to the kept one",
    )
    p.add_argument("--save-classifier", metavar="FILE", help="keep the fitted classifier in FILE")
    p.add_argument(
        "--query", required=True, nargs="+", help="image files or folders to classify (read recursively)"
    )
    p.add_argument("--out", help="CSV (or JSON with --json) file to write")
    p.add_argument("--json", action="store_true", help="print/write JSON instead of a table/CSV")
    p.add_argument("--top-k", type=_checked(positive_int), default=3, help="classes shown per image")
    p.add_argument(
        "--steps",
        type=_checked(positive_int),
        help="fine-tune steps (default: the protocol's rule for the support size, 150..600)",
    )
    p.add_argument(
        "--unknown-below",
        type=_checked(probability, float),
        metavar="P",
        help="label a query 'unknown' when its best class probability is below P (open set)",
    )

    p = sub.add_parser("embed", help="export backbone features of images to an .npz file")
    _inference_options(p)
    p.add_argument("paths", nargs="+", help="image files or folders (read recursively)")
    p.add_argument("--out", required=True, help="output .npz (arrays: features, paths)")

    sub.add_parser("models", help="list the published models (--model NAME)")

    p = sub.add_parser("export", help="a checkpoint without its training state: weights, config, history")
    p.add_argument("checkpoint", help="a checkpoint written by train.py")
    p.add_argument("out", help="the file to write")

    p = sub.add_parser("plot", help="training curves of a run (validation ± CI, loss, lr) as a png")
    p.add_argument(
        "logs", nargs="+", help="work dir(s) or .log.json files; a resumed run's sittings are joined"
    )
    p.add_argument("--out", help="png to write (default: curves.png in the first work dir)")
    p.add_argument("--title", help="figure title (default: the work dir's name)")

    p = sub.add_parser("meta-test", help="a published model's 5-way accuracy on a dataset's test classes")
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True, help=", ".join(sorted(DATASETS)))
    p.add_argument("--data-root", required=True)
    p.add_argument("--shots", type=_checked(positive_int), nargs="+", default=[1, 5])
    p.add_argument("--n-episodes", type=_checked(positive_int), default=2000)
    p.add_argument("--cache-dir", help="where the decoded-image cache goes (default: beside the data)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("train", "test"):
        return (train_main if argv[0] == "train" else test_main)(argv[1:])
    args = parser.parse_args(argv)
    handler = {"prepare": _prepare, "demo": _demo, "predict": _predict, "embed": _embed, "models": _models,
               "meta-test": _meta_test, "plot": _plot, "export": _export}[args.command]  # fmt: skip
    return _guard(lambda: handler(args))


if __name__ == "__main__":
    sys.exit(main())
