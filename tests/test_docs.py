"""The README and docs/ stay true: every experiment they name composes and validates, and every
``python -m uzr....`` command line in them parses (nothing is run: no model loads)."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from uzr.config import CONF_DIR, register_configs, resolve_config

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLACEHOLDER = "/path/to/"
COMMAND = re.compile(r"python -m (uzr[\w.]*)((?: [^\s`#)]+)*)")  # arguments end at two spaces, `, # or )


class Parsed(Exception):
    """Raised right after a command line parsed, before the command does any work."""


def doc_text() -> str:
    # A trailing backslash continues a shell command on the next line.
    return re.sub(r"\\\n\s*", " ", "\n".join(p.read_text() for p in PAGES))


def command_lines() -> list[tuple[str, list[str]]]:
    return sorted({(m.group(1), m.group(2).strip()) for m in COMMAND.finditer(doc_text())})


def compose_run(overrides: list[str]):
    """The first job of a (possibly swept) ``uzr.train`` command line, composed and validated (a line with a
    placeholder path, ``/path/to/...``, is composed into the schema but not validated: the file does not exist)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    first_job = BasicSweeper.split_arguments(parsed, max_batch_size=None)[0][0]
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="docs"):
            cfg = compose("train", overrides=list(first_job))
            return cfg if any(PLACEHOLDER in o for o in overrides) else resolve_config(cfg)
    finally:
        GlobalHydra.instance().clear()


def parse_argparse_cli(main, args: list[str]) -> None:
    """Run ``main(args)`` up to the end of its argument parsing; a parse error exits with status 2."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *a, **kw):
        original(self, *a, **kw)
        raise Parsed

    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        with pytest.raises(Parsed):
            main(args)
    finally:
        argparse.ArgumentParser.parse_args = original


def check_command(module: str, args: list[str], monkeypatch) -> None:
    if module == "uzr.train":
        compose_run([a for a in args if a != "-m"])
    elif module == "uzr.live":
        import uzr.live

        def stop(*a, **kw):
            raise Parsed

        monkeypatch.setattr(uzr.live, "ensure_artifacts", stop)  # the config composed and validated: stop
        with pytest.raises(Parsed):
            uzr.live.main(args)
    elif module == "uzr.tasks.causal_loop":
        from uzr.tasks.causal_loop import compose_spec

        compose_spec(args)
    elif module == "uzr.stages":
        assert args == [], "python -m uzr.stages takes no arguments"
    else:
        import importlib

        found = importlib.import_module(module)  # a package's command line lives in its __main__
        parse_argparse_cli(getattr(found, "main", None) or importlib.import_module(f"{module}.__main__").main, args)


def test_docs_name_commands():
    modules = {module for module, _ in command_lines()}
    assert {"uzr.train", "uzr.live", "uzr.stages", "uzr.cache", "uzr.report", "uzr.qa.prompts"} <= modules


@pytest.mark.parametrize(("module", "line"), command_lines())
def test_command_line_parses(module, line, monkeypatch):
    check_command(module, shlex.split(line), monkeypatch)


@pytest.mark.parametrize("name", sorted(set(re.findall(r"\+experiment=([a-z0-9_]+)", doc_text()))))
def test_named_experiment_composes(name):
    assert (CONF_DIR / "experiment" / f"{name}.yaml").exists(), f"+experiment={name}: no conf/experiment/{name}.yaml"
    compose_run([f"+experiment={name}"])


def test_a_wrong_option_is_caught(monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        check_command("uzr.qa.prompts", ["--out", "prompts.jsonl"], monkeypatch)  # the option is --jsonl
    assert exit_info.value.code == 2
    with pytest.raises(ValueError, match="inject.mode"):
        check_command("uzr.train", ["+experiment=smoke", "inject.mode=bogus"], monkeypatch)
