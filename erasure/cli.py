"""The `erasure` command line: one subcommand per job, flags generated from config dataclasses.

Every subcommand takes `--config file.yaml` and flag overrides; `--help` lists each option with
its default. Config classes live in light modules (no torch/diffusers imports), and handlers are
imported only when a command runs, so `--help` stays fast. `erase.py --concept nudity` without a
subcommand means `erase.py sd --concept nudity`.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

from erasure import __version__
from erasure.config import field_type, fields, is_section, load_config, type_name
from erasure.errors import ErasureError


@dataclass(frozen=True)
class Command:
    """A subcommand: where its config class and its handler live (as 'module:attribute')."""

    path: tuple[str, ...]
    help: str
    config: str
    handler: str


COMMANDS: tuple[Command, ...] = (
    Command(("sd",), "erase a concept from Stable Diffusion (prompt remap + saliency mask)",
            "pipelines.sd_config:SDEraseConfig", "pipelines.sd_commands:erase_sd"),
    Command(("export",), "write a finished SD run as a diffusers pipeline, single-file checkpoint, LoRA or delta",
            "pipelines.export_config:ExportConfig", "pipelines.export:export_command"),
    Command(("ddpm", "train"), "train a class-conditional DDPM on CIFAR-10",
            "pipelines.ddpm_config:DDPMTrainConfig", "pipelines.ddpm_commands:train"),
    Command(("ddpm", "unlearn"), "unlearn a class from a class-conditional DDPM (salun, ga, rl, esd, ca)",
            "pipelines.ddpm_config:DDPMUnlearnConfig", "pipelines.ddpm_commands:unlearn"),
    Command(("classifier", "train"), "train an image classifier (the original model)",
            "classifiers.config:TrainConfig", "classifiers.commands:train"),
    Command(("classifier", "unlearn"), "unlearn a class or samples from a trained classifier",
            "classifiers.config:UnlearnConfig", "classifiers.commands:unlearn"),
    Command(("classifier", "compare"), "train original + retrain, run several methods, write a report",
            "classifiers.config:CompareConfig", "classifiers.commands:compare"),
    Command(("mask", "compute"), "compute a saliency mask for a trained classifier and save it",
            "classifiers.config:MaskConfig", "classifiers.commands:compute_mask_command"),
    Command(("mask", "show"), "print the metadata and per-layer density of a mask file",
            "erasure.mask_commands:ShowMaskConfig", "erasure.mask_commands:show_mask"),
    Command(("eval", "nudity"), "count NudeNet detections on generated images (protocol nudity-i2p-v1)",
            "erasure.evaluation.config:NudityEvalConfig", "pipelines.commands:eval_nudity"),
    Command(("eval", "fid"), "FID/KID between two image folders (protocol retain-fid-v1)",
            "erasure.evaluation.config:FIDEvalConfig", "erasure.evaluation.commands:eval_fid"),
    Command(("eval", "ddpm"),
            "class UA, retained-class accuracy and feature distance of a DDPM (protocol ddpm-cifar10-v1)",
            "pipelines.ddpm_config:DDPMEvalConfig", "pipelines.ddpm_commands:evaluate"),
    Command(("eval", "attack"),
            "attack an erased model's prompts and report the attack success rate (protocol attack-asr-v1)",
            "pipelines.attack_config:AttackEvalConfig", "pipelines.attacks.runner:eval_attack"),
    Command(("testbed", "build"), "build the CIFAR-10 text-to-image testbed (a StableDiffusionPipeline) and its judge",
            "pipelines.testbed_config:TestbedBuildConfig", "pipelines.testbed:build"),
    Command(("testbed", "eval"), "judge testbed generations of 'a photo of a {class}' with the CIFAR-10 classifier",
            "pipelines.testbed_config:TestbedEvalConfig", "pipelines.testbed_eval:evaluate"),
    Command(("testbed", "export"), "copy a finished testbed build (pipeline + judge) in half precision",
            "pipelines.testbed_config:TestbedExportConfig", "pipelines.testbed_eval:export"),
    Command(("bench", "erase"), "erase testbed classes with every method: forgetting, retention and cost side by side",
            "pipelines.bench_config:BenchEraseConfig", "pipelines.bench_erase:bench"),
    Command(("sample",), "generate images from a base or erased model for evaluation",
            "pipelines.config:SampleConfig", "pipelines.commands:sample"),
)
DEFAULT_COMMAND = "sd"


def _resolve(target: str) -> Any:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _describe(cls: type, f: dataclasses.Field, key: str) -> str:
    meta = f.metadata
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    where = f"YAML {key}; " if "." in key else ""
    parts = [meta.get("help", ""), f"[{where}{type_name(field_type(cls, f))}; default: {default}"]
    if meta.get("choices"):
        parts[-1] += f"; choices: {', '.join(map(str, meta['choices']))}"
    bounds = [f"{sym} {meta[key]}" for key, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
              if meta.get(key) is not None]
    if bounds:
        parts[-1] += f"; {' and '.join(bounds)}"
    return (" ".join(parts) + "]").replace("%", "%%")


def _add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="YAML file with any of the options below; flags override it")
    _add_field_flags(parser, cls)


def _add_field_flags(parser: argparse._ActionsContainer, cls: type, prefix: str = "") -> None:
    """One flag per field; a nested settings section gets a group of `--<section>-<key>` flags."""
    for f in fields(cls):
        key = prefix + f.name
        if is_section(f):
            group = parser.add_argument_group(f"{f.name} settings", f.metadata.get("help"))
            _add_field_flags(group, field_type(cls, f), prefix=f"{key}.")
            continue
        flag = "--" + (f.metadata.get("flag") or key.replace(".", "-").replace("_", "-"))
        if field_type(cls, f) is bool:
            parser.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=_describe(cls, f, key))
        elif _is_list(field_type(cls, f)):
            parser.add_argument(flag, dest=key, default=argparse.SUPPRESS, metavar="VALUE", action=_JoinAction,
                                help=_describe(cls, f, key) + "; repeat the flag to add more")
        else:
            parser.add_argument(flag, dest=key, default=argparse.SUPPRESS, metavar="VALUE",
                                help=_describe(cls, f, key))


def _is_list(tp: Any) -> bool:
    """Whether a field's type is a list (or an optional list)."""
    return any(typing.get_origin(t) is list for t in (tp, *typing.get_args(tp)))


class _JoinAction(argparse.Action):
    """A list flag: each use adds its comma-separated items (`--concept a --concept b` is `--concept a,b`)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        previous = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, values if previous is None else f"{previous},{values}")


def build_parser() -> argparse.ArgumentParser:
    """The full parser; importing config classes only (cheap)."""
    parser = argparse.ArgumentParser(
        prog="erasure", description="Weight-saliency machine unlearning for classifiers and diffusion models.",
        epilog="Without a subcommand, options mean `sd` (e.g. `accelerate launch erase.py --concept nudity`).",
    )
    parser.add_argument("--version", action="version", version=f"erasure {__version__}")
    top = parser.add_subparsers(dest="command", metavar="{sd,export,ddpm,classifier,mask,eval,testbed,bench,sample}")
    groups: dict[str, argparse._SubParsersAction] = {}
    for command in COMMANDS:
        head, *rest = command.path
        if rest:
            if head not in groups:
                group_parser = top.add_parser(head, help=f"{head} subcommands")
                groups[head] = group_parser.add_subparsers(dest="subcommand", metavar="{...}", required=True)
            sub = groups[head].add_parser(rest[0], help=command.help, description=command.help)
        else:
            sub = top.add_parser(head, help=command.help, description=command.help)
        _add_config_flags(sub, _resolve(command.config))
        sub.set_defaults(_command=command)
    return parser


def _normalise_argv(argv: Sequence[str]) -> list[str]:
    argv = list(argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        return [DEFAULT_COMMAND, *argv]
    return argv


def run_command(command: Command, namespace: dict[str, Any]) -> Any:
    """Load and validate the command's config, then call its handler."""
    config_path = namespace.pop("config", None)
    config = load_config(_resolve(command.config), config_path, namespace)
    handler: Callable[[Any], Any] = _resolve(command.handler)
    return handler(config)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; user errors print one line to stderr and exit with status 2."""
    parser = build_parser()
    args = vars(parser.parse_args(_normalise_argv(sys.argv[1:] if argv is None else argv)))
    command = args.pop("_command", None)
    if command is None:
        parser.print_help()
        return 2
    args.pop("command", None)
    args.pop("subcommand", None)
    try:
        run_command(command, args)
    except ErasureError as exc:
        print(f"erasure: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("erasure: interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130
    return 0
