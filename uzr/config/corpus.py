"""The ``data`` config group: where texts come from and how they are cut (torch-free)."""

from __future__ import annotations

import glob
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from uzr.config.checks import is_int, is_number
from uzr.config.groups import ConfigGroup

SOURCES = ("pydoc", "text_file", "jsonl", "hub", "packaged", "prompts")
PACKAGED = Path(__file__).resolve().parents[1] / "corpora"  # data.source=packaged: data.path is relative to it
DATA_OPTIONS = Path(__file__).resolve().parents[2] / "conf" / "data"  # evaluate.domains names options of this group
LONG_TEXT = ("truncate", "window", "tokens")
_GLOB_CHARS = set("*?[")


@dataclass
class CorpusSpec:
    """Where texts come from and how they are cut (plain types only: it is a Hydra structured config)."""

    name: str = "pydoc"
    source: str = "pydoc"  # one of SOURCES; prompts: the built-in prompt set as chat transcripts (uzr.qa.transcripts)
    path: str | None = None  # file or glob, for text_file / jsonl; for packaged, relative to uzr/corpora
    text_field: str = "text"  # jsonl field, and the hub dataset's text column
    hub_id: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"
    num_texts: int = 200  # total texts after filtering, train + heldout; 0 = all
    heldout_fraction: float = 0.2
    seed: int = 0
    min_chars: int = 200
    max_chars: int = 1200
    # truncate | window: a text over max_chars is cut to one text, or into windows, at whitespace; tokens: a
    # text over harvest.max_length student tokens is cut into windows of at most that many tokens at paragraph /
    # sentence / whitespace boundaries, every byte kept (uzr.corpus.token_windows; max_chars unused)
    long_text: str = "truncate"  # one of LONG_TEXT


def invalid(key: str, value: Any, valid: str) -> ValueError:
    return ValueError(f"corpus.{key}={value!r} is invalid: {valid}")


def validate_corpus_spec(spec: CorpusSpec | Mapping[str, Any]) -> CorpusSpec:
    """Check a spec (a ``CorpusSpec``, dict or DictConfig) and return it as a ``CorpusSpec``.

    Raises ``ValueError`` naming the key, the bad value and the valid choices or range, and
    ``FileNotFoundError`` naming ``path`` when it matches no file, before anything is read.
    """
    if not isinstance(spec, CorpusSpec):
        if not isinstance(spec, Mapping):
            from omegaconf import DictConfig, OmegaConf  # only needed for Hydra configs

            if not isinstance(spec, DictConfig):
                raise TypeError(f"corpus spec must be a CorpusSpec or a mapping, got {type(spec).__name__}")
            spec = OmegaConf.to_container(spec, resolve=True)
        known = {f.name for f in fields(CorpusSpec)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"corpus: unknown keys {unknown}; valid keys are {sorted(known)}")
        spec = CorpusSpec(**spec)
    s = spec
    if not isinstance(s.name, str) or not s.name:
        raise invalid("name", s.name, "expected a non-empty string")
    if s.source not in SOURCES:
        raise invalid("source", s.source, f"expected one of {list(SOURCES)}")
    if s.long_text not in LONG_TEXT:
        raise invalid("long_text", s.long_text, f"expected one of {list(LONG_TEXT)}")
    if not is_int(s.num_texts) or not (s.num_texts == 0 or s.num_texts >= 2):
        raise invalid("num_texts", s.num_texts, "expected an integer >= 2 (train + heldout), or 0 for all")
    if not is_number(s.heldout_fraction) or not 0 < s.heldout_fraction < 1:
        raise invalid("heldout_fraction", s.heldout_fraction, "expected a number in the open interval (0, 1)")
    if not is_int(s.seed) or s.seed < 0:
        raise invalid("seed", s.seed, "expected an integer >= 0")
    if not is_int(s.min_chars) or s.min_chars < 1:
        raise invalid("min_chars", s.min_chars, "expected an integer >= 1")
    if not is_int(s.max_chars) or s.max_chars < s.min_chars:
        raise invalid("max_chars", s.max_chars, f"expected an integer >= min_chars={s.min_chars!r}")
    if not isinstance(s.text_field, str) or not s.text_field:
        raise invalid("text_field", s.text_field, "expected a non-empty string")
    if s.source in ("text_file", "jsonl", "packaged"):
        if not s.path:
            raise invalid("path", s.path, f"source={s.source!r} needs a file path or glob")
        source_paths(s)  # fail on a missing file now, not halfway through a run
    if s.source == "hub" and not s.hub_id:
        raise invalid("hub_id", s.hub_id, "source='hub' needs a dataset id, e.g. 'Salesforce/wikitext'")
    return s


def source_paths(spec: CorpusSpec) -> list[Path]:
    """The files a text_file / jsonl / packaged spec reads (packaged: under uzr/corpora)."""
    if spec.source != "packaged":
        return resolve_paths(spec.path)
    if Path(spec.path).is_absolute() or ".." in Path(spec.path).parts:
        raise invalid("path", spec.path, f"source='packaged' takes a path inside {PACKAGED}, e.g. 'korean.txt'")
    try:
        return resolve_paths(str(PACKAGED / spec.path))
    except FileNotFoundError:
        shipped = sorted(str(p.relative_to(PACKAGED)) for p in PACKAGED.rglob("*.txt"))
        raise FileNotFoundError(
            f"corpus.path={spec.path!r}: no packaged corpus file matches it; shipped: {shipped}") from None


def resolve_paths(path: str) -> list[Path]:
    """The files ``path`` names: itself, or the sorted matches of a glob (sorted for determinism)."""
    expanded = str(Path(path).expanduser())
    if _GLOB_CHARS & set(expanded):
        files = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"corpus.path={path!r}: the glob matches no file")
        return files
    p = Path(expanded)
    if not p.is_file():
        what = "is a directory, not a file (use a glob such as 'dir/*.txt')" if p.is_dir() else "does not exist"
        raise FileNotFoundError(f"corpus.path={path!r} {what} (resolved to {p.absolute()})")
    return [p]


FILE_DOMAIN = "file:"  # an evaluate.domains entry ``file:PATH`` reads your own UTF-8 text file (or glob) PATH


def domain_spec(name: str, where: str = "evaluate.domains") -> CorpusSpec:
    """The validated spec of an evaluation domain ``name``: a ``conf/data`` option, or ``file:PATH`` for a UTF-8 text
    file (or glob) read like ``data=text_file data.path=PATH``; ``where`` names the field in errors. Options that
    need a value from the command line (``path: ???``) cannot be a domain."""
    from omegaconf import OmegaConf

    if name.startswith(FILE_DOMAIN):
        path = name[len(FILE_DOMAIN):]
        try:
            return validate_corpus_spec(CorpusSpec(name=name, source="text_file", path=path))
        except (ValueError, FileNotFoundError) as err:
            raise FileNotFoundError(f"{where}: {name!r}: {err}; give an existing UTF-8 text file (or a glob) after "
                                    f"{FILE_DOMAIN}, e.g. {FILE_DOMAIN}/path/to/notes.txt") from None
    options = sorted(p.stem for p in DATA_OPTIONS.glob("*.yaml"))
    if name not in options:
        raise ValueError(f"{where}: {name!r} is not a data option; valid: {', '.join(options)}, or {FILE_DOMAIN}PATH "
                         "for your own text file")
    raw = OmegaConf.load(DATA_OPTIONS / f"{name}.yaml")
    missing = sorted(k for k in raw if OmegaConf.is_missing(raw, k))
    if missing:
        raise ValueError(f"{where}: data option {name!r} needs {missing} set on the command line, so it cannot be "
                         f"an evaluation domain; write a conf/data option with them set, or use {FILE_DOMAIN}PATH")
    return validate_corpus_spec(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(CorpusSpec), raw)))


def validate_run_corpus(cfg) -> CorpusSpec:
    """The run's ``data``, and for ``source=prompts`` the same prompt split as the gate's, so the held-out prompts
    that the gate and the generated-answer table evaluate are never harvested."""
    spec = validate_corpus_spec(cfg.data)
    if spec.source == "prompts" and getattr(cfg, "gate", None) is not None:
        split = (cfg.gate.prompt_seed, float(cfg.gate.heldout_fraction))
        if (spec.seed, float(spec.heldout_fraction)) != split:
            raise ValueError(f"data.source=prompts splits the prompt set with data.seed={spec.seed}, data.heldout_fraction="
                             f"{spec.heldout_fraction}, but the gate evaluates held-out prompts of gate.prompt_seed="
                             f"{split[0]}, gate.heldout_fraction={split[1]}: set them equal, or the harvest trains on "
                             "prompts the gate holds out")
    return spec


CONFIG_GROUPS = (ConfigGroup("data", CorpusSpec, validate_run_corpus),)


# --------------------------------------------------------------------------- reading sources


