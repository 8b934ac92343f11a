"""The docs cannot rot: every link resolves, and every documented `dlcli` command parses.

Checked files: README.md, every page under docs/ and benchmarks/README.md.

- Links and images: every relative target of `[text](target)`, `![alt](target)` and
  `<img src="...">` exists; a `#anchor` must name a heading of its page.
- Commands: every `dlcli ...` line of a fenced ```sh / ```bash / ```shell block is parsed
  against the real command line without running anything: Click parses it with dlcli's own
  Typer app (the command exists, every option exists for that command, values have their
  types), then dlcli's own rules for what Click leaves to them: the task or view exists,
  config keys as flags on `train` and `--set KEY=VALUE` keys are known and their values
  valid (the same `config.resolve` a run uses), predict options of the task, view options,
  the kinds of `--dataset` the task takes, `--engine` and `--format` values.

A line that cannot be parsed as written (a shell variable, a placeholder) is skipped only
when its comment says `# not checked`. No TensorFlow is imported.
"""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer

try:  # Typer >= 0.22 carries its own copy of Click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException

import dlcli.cli as cli
from dlcli import config as config_lib
from dlcli.cli import parsing
from dlcli.data import sources as data_lib
from dlcli.errors import DlcliError
from dlcli.inference import export as export_lib, lite
from dlcli.tasks import TASK_NAMES, all_views, get_task

ROOT = Path(__file__).resolve().parent.parent
SHELL_LANGS = {"sh", "bash", "shell"}
SKIP_MARK = "# not checked"
TASK_PAGES = ROOT / "docs" / "tasks"


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    bench = ROOT / "benchmarks" / "README.md"
    return files + ([bench] if bench.exists() else [])


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# -- reading Markdown -------------------------------------------------------------------

FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the block's first content line
    lang: str
    lines: list[str]


def split_markdown(text: str, path: Path) -> tuple[list[Block], list[tuple[int, str]]]:
    """(fenced code blocks, the prose lines outside them with their line numbers)."""
    blocks, prose = [], []
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            blocks.append(Block(path, number + 1, match.group(2).lower(), []))
        elif fence is not None and line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
            fence = None
        elif fence is not None:
            blocks[-1].lines.append(line)
        else:
            prose.append((number, line))
    return blocks, prose


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    _, prose = split_markdown(path.read_text(), path)
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose:
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = _slug(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            out.add(slug if count == 0 else f"{slug}-{count}")
    return out


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMG_TAG = re.compile(r"<img\s[^>]*src=[\"']([^\"']+)[\"']", re.I)
REF_DEF = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")


def links(path: Path) -> list[tuple[int, str]]:
    _, prose = split_markdown(path.read_text(), path)
    found = []
    for number, line in prose:
        line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
        for pattern in (LINK, IMG_TAG, REF_DEF):
            found.extend((number, m.group(1)) for m in pattern.finditer(line))
    return found


def broken_link(path: Path, target: str) -> str | None:
    """Why a link of `path` does not resolve, or None."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:
        return None
    file_part, _, anchor = target.partition("#")
    dest = (path.parent / urllib.parse.unquote(file_part)).resolve() if file_part else path
    if not dest.exists():
        return f"{target}: no such file"
    if anchor and dest.suffix == ".md" and anchor.lower() not in anchors(dest):
        return f"{target}: no heading #{anchor} in {_rel(dest)}"
    return None


# -- finding the dlcli commands ----------------------------------------------------------

@dataclass
class Command:
    path: Path
    line: int
    text: str  # the line as written (continuations joined)
    args: list[str] | None  # the words after `dlcli`; None: marked as not checked

    @property
    def where(self) -> str:
        return f"{_rel(self.path)}:{self.line}"


SEPARATORS = {"|", "||", "&&", ";", "&", "(", ")", "|&"}
WRAPPERS = {"time", "timeout", "nohup", "env"}
ENV_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def dlcli_segments(line: str) -> list[list[str]]:
    """The argument lists of the `dlcli` commands on one shell line (pipes, `&&` and `;`
    split it; redirections, `NAME=value` prefixes and wrappers like `timeout` are dropped)."""
    line = re.sub(r"(?<=\s)\d+(?=[<>])", "", line)  # `2>` / `1>`: the descriptor of a redirection
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    tokens = list(lexer)
    segments: list[list[str]] = [[]]
    skip_next = False
    for token in tokens:
        if skip_next:
            skip_next = False
        elif token in SEPARATORS:
            segments.append([])
        elif token and set(token) <= set("<>&"):
            skip_next = True  # a redirection and its target
        else:
            segments[-1].append(token)
    found = []
    for words in segments:
        if "dlcli" not in words:
            continue
        at = words.index("dlcli")
        prefix = [w for w in words[:at] if not ENV_ASSIGN.match(w)]
        if not prefix or prefix[0] in WRAPPERS or prefix in (["python", "-m"], ["python3", "-m"]):
            found.append(words[at + 1:])
    return found


def commands_in(path: Path) -> list[Command]:
    blocks, _ = split_markdown(path.read_text(), path)
    found = []
    for block in blocks:
        if block.lang not in SHELL_LANGS:
            continue
        pending, start = "", None
        for offset, raw in enumerate(block.lines):
            if start is None:
                start = block.line + offset
            if raw.rstrip().endswith("\\"):
                pending += raw.rstrip()[:-1] + " "
                continue
            text, pending = (pending + raw).strip(), ""
            line, start = start, None
            if not text or text.startswith("#") or "dlcli" not in text:
                continue
            if SKIP_MARK in text:
                found.append(Command(path, line, text, None))
                continue
            for args in dlcli_segments(text):
                found.append(Command(path, line, text, args))
    return found


def all_commands() -> list[Command]:
    return [c for path in doc_files() for c in commands_in(path)]


# -- checking one command against the real CLI --------------------------------------------

class DocsCommandError(Exception):
    pass


def _check_dataset(task_name: str, dataset: str | None) -> None:
    """The kind of `--dataset` (tfds NAME, folder:, npz:, text:, captions:) is one the task takes."""
    if dataset:
        kind, _ = data_lib.split_spec(dataset)  # the docs name files of the reader's: their paths are not checked
        rules = get_task(task_name).data
        if kind not in data_lib.KINDS:
            raise DocsCommandError(f"--dataset {dataset}: no such kind of data ({', '.join(data_lib.KINDS)})")
        if rules is not None and kind not in rules.kinds and not (kind == "tfds" and dataset in rules.builtin):
            raise DocsCommandError(f"task {task_name} cannot read --dataset {dataset} (it takes: {', '.join(rules.kinds)})")


def _known_task(name: str | None) -> None:
    if name is not None and name not in TASK_NAMES:
        raise DocsCommandError(f"unknown task {name!r}; tasks: {', '.join(TASK_NAMES)}")


@functools.lru_cache(maxsize=1)
def _click_app():
    return typer.main.get_command(cli.app)


def check_command(args: list[str]) -> None:
    """Parse `dlcli ARGS` as the CLI would, without running it; raise on the first problem."""
    group = _click_app()
    group_ctx = group.context_class(group, info_name="dlcli")
    if not args:
        return  # `dlcli` alone prints the help
    if args[0].startswith("-"):  # --help, --version, --install-completion, --show-completion
        known = {o for p in group.get_params(group_ctx) for o in (*p.opts, *p.secondary_opts)}
        for token in args:
            if token.startswith("-") and token.partition("=")[0] not in known:
                raise DocsCommandError(f"dlcli has no option {token}")
        return
    name, rest = args[0], args[1:]
    command = group.get_command(group_ctx, name)
    if command is None:
        raise DocsCommandError(f"no command {name!r}; commands: {', '.join(group.list_commands(group_ctx))}")
    rest = [a for a in rest if a != "--help"]  # --help is eager: what it comes with must still parse
    try:
        ctx = command.make_context(name, list(rest), parent=group_ctx, resilient_parsing=False)
    except ClickException as exc:  # Click's usage errors: unknown option, a value of the wrong type
        raise DocsCommandError(f"{type(exc).__name__}: {exc.format_message()}") from None
    params, extra = ctx.params, list(ctx.args)
    try:
        _check_task_rules(name, params, extra, ctx)
    except DlcliError as exc:  # dlcli's UsageError from its own parsers and config checks
        raise DocsCommandError(f"{type(exc).__name__}: {exc}") from None


def _check_task_rules(name: str, params: dict, extra: list[str], ctx) -> None:
    task_name = params.get("task_name")
    _known_task(task_name)
    if params.get("json_mode") and params.get("jsonl"):
        raise DocsCommandError("--json and --jsonl exclude each other")
    if name == "train":
        task = get_task(task_name)
        flags = {k: params.get(k) for k in ("epochs", "batch_size", "lr", "seed", "dataset", "data_dir")}
        flags.update(parsing.config_flags(extra, task.defaults, task_name))
        # the config file is not read (docs name files of the reader's); everything else is resolved
        config_lib.resolve(task.defaults, None, params.get("sets") or [], flags, task.choices)
        _check_dataset(task_name, flags.get("dataset"))
    elif name == "eval":
        _check_dataset(task_name, params.get("dataset"))
    elif name == "predict":
        task = get_task(task_name)
        tokens = list(params.get("inputs") or []) + extra
        after = ctx.meta.get("dlcli.after_dashes", [])
        if after and tokens[len(tokens) - len(after):] == after:
            tokens = tokens[: len(tokens) - len(after)] + ["--", *after]
        parsing.parse_task_options(tokens, task.predict_options, f"`dlcli predict {task_name}`")
        if params.get("engine", "auto") not in lite.ENGINES:
            raise DocsCommandError(f"--engine must be one of {', '.join(lite.ENGINES)}")
    elif name == "export":
        export_lib.exportable(get_task(task_name))
        if params.get("fmt", "tflite") not in export_lib.FORMATS:
            raise DocsCommandError(f"--format must be one of {', '.join(export_lib.FORMATS)}")
    elif name == "visualize":
        view_name = params.get("view_name")
        views = all_views()
        if view_name not in views:
            raise DocsCommandError(f"unknown view {view_name!r}; views: {', '.join(views)}")
        owner, view = views[view_name]
        wanted = params.get("task_name")
        if owner and wanted and wanted != owner:
            raise DocsCommandError(f"view {view_name} belongs to task {owner}, not {wanted}")
        _, inputs = parsing.parse_task_options(extra, view.options, f"`dlcli visualize {view_name}`")
        if inputs:
            raise DocsCommandError(f"unexpected argument {inputs[0]!r}")
        if owner or wanted:
            _check_dataset(owner or wanted, params.get("dataset"))
    elif extra:
        raise DocsCommandError(f"unexpected arguments {extra}")


# -- the tests ------------------------------------------------------------------------------

COMMANDS = all_commands()


def test_every_link_and_image_resolves():
    broken = [f"{_rel(path)}:{line}: {why}" for path in doc_files() for line, target in links(path)
              if (why := broken_link(path, target))]
    assert not broken, "broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.args is not None], ids=lambda c: c.where)
def test_documented_command_parses(command: Command):
    try:
        check_command(command.args)
    except DocsCommandError as exc:
        pytest.fail(f"{command.where}: `{command.text}`: {exc}", pytrace=False)


def test_the_docs_hold_commands_of_every_kind():
    """The checker sees the docs' commands (a broken extraction would check nothing)."""
    seen = {c.args[0] for c in COMMANDS if c.args}
    assert {"train", "eval", "predict", "export", "visualize", "tasks"} <= seen
    assert len(COMMANDS) > 40


def test_skipped_lines_are_few():
    skipped = [c.where for c in COMMANDS if c.args is None]
    assert len(skipped) <= 5, skipped


@pytest.mark.parametrize(
    "line",
    [
        "dlcli train mnist --epoch 3",                    # misspelt config flag
        "dlcli train mnist --set hiden=128",              # misspelt --set key
        "dlcli train mnist --epochs three",               # a value of the wrong type
        "dlcli train mnist --epochs 0",                   # out of range
        "dlcli train cnn --set precision=float16",        # not an allowed value
        "dlcli train mnist --model resnet",               # not an allowed value
        "dlcli train linear --dataset cifar10",           # a kind of data the task does not take
        "dlcli trian mnist",                              # no such command
        "dlcli train mnst",                               # no such task
        "dlcli eval mnist --jsn",                         # misspelt option
        "dlcli predict cnn photo.jpg --topk 3",           # misspelt predict option
        "dlcli predict names --temperature hot",          # wrong type of a predict option
        "dlcli predict cnn photos/ --json --jsonl",       # options that exclude each other
        "dlcli export linear",                            # a task without an export
        "dlcli export mnist --format onnx",               # no such format
        "dlcli visualize cnn-stimuli --filter 0-7",       # misspelt view option
        "dlcli visualize no-such-view",                   # no such view
        "dlcli visualize mnist-confusion --task cnn",     # a view of another task
        "dlcli --verison",                                # misspelt top-level option
    ],
)
def test_the_checker_refuses_a_bad_line(line: str):
    segments = dlcli_segments(line)
    assert len(segments) == 1
    with pytest.raises(DocsCommandError):
        check_command(segments[0])


def test_a_misspelt_option_in_a_docs_page_fails_its_check(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Train:\n\n```sh\ndlcli train mnist --epochs 2   # fine\n"
                    "find . -name '*.png' | dlcli predict mnist - --jsonl --top-kk 3 > out.jsonl\n```\n")
    good, bad = commands_in(page)
    check_command(good.args)
    assert bad.line == 5 and bad.args == ["predict", "mnist", "-", "--jsonl", "--top-kk", "3"]
    with pytest.raises(DocsCommandError, match="top-kk"):
        check_command(bad.args)


@pytest.mark.parametrize(
    "line",
    [
        "dlcli train mnist --dataset npz:digits.npz --epochs 2 --model cnn --set dropout=0.3",
        "dlcli train cnn --set precision=float32 --lr 5e-3",
        "dlcli predict names --n 25 --prefix Al --temperature 0.8 --seed 1",
        "dlcli predict autoencoder face.jpg --morph a.jpg b.jpg --steps 7",
        "dlcli visualize cnn-stimuli --layer -1 --filters 0-7",
        "dlcli visualize training-curves --task mnist",
        "dlcli tasks mnist --json",
        "dlcli --help",
        "dlcli predict names --help",
    ],
)
def test_the_checker_accepts_a_good_line(line: str):
    check_command(dlcli_segments(line)[0])


def test_shell_lines_are_split_into_commands():
    line = "TF_CONFIG='{\"a\": 1}' timeout -s TERM 1800 dlcli train mnist --epochs 2 2> log.txt && dlcli eval mnist | head"
    assert dlcli_segments(line) == [["train", "mnist", "--epochs", "2"], ["eval", "mnist"]]
    assert dlcli_segments("pip install dlcli") == []
    assert dlcli_segments("dlcli predict names --n 2 > names.txt") == [["predict", "names", "--n", "2"]]


def test_a_broken_link_is_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\nSee [here](missing.md), [top](#title), [no](#nowhere), `[code](x.md)`.\n")
    problems = [broken_link(page, t) for _, t in links(page)]
    assert problems == ["missing.md: no such file", None, f"#nowhere: no heading #nowhere in {page}"]


def test_every_task_has_a_page_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for name in TASK_NAMES:
        assert (TASK_PAGES / f"{name}.md").exists(), f"docs/tasks/{name}.md is missing"
        assert f"docs/tasks/{name}.md" in readme, f"README.md does not link docs/tasks/{name}.md"


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


# Words of a project's history, spelt in pieces so this file does not match them itself.
HISTORY_WORDS = [r"(?i)\bses" + r"sions?\b", r"(?i)\bagen" + r"ts?'", r"[Ii]ss" + r"ue [0-9]"]


@pytest.mark.parametrize("pattern", HISTORY_WORDS)
def test_the_docs_and_the_code_speak_in_the_present(pattern: str):
    """The docs, the code, the tests and the benchmarks say what is, not how it came to be."""
    files = [*doc_files(), *(p for folder in ("dlcli", "tests", "benchmarks") for p in (ROOT / folder).rglob("*.py"))]
    hits = [f"{_rel(path)}:{n}: {line.strip()}" for path in files
            for n, line in enumerate(path.read_text().splitlines(), 1) if re.search(pattern, line)]
    assert not hits, "\n".join(hits)


def test_checking_every_documented_command_imports_no_tensorflow():
    code = ("import sys\nfrom tests import test_docs as t\n"
            "for c in t.all_commands():\n    if c.args is not None: t.check_command(c.args)\n"
            "print('tensorflow' in sys.modules, len(t.all_commands()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    imported, count = out.stdout.split()
    assert out.returncode == 0 and imported == "False" and int(count) > 50, out.stderr[-2000:]
