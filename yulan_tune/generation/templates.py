"""Prompt templates for synthesis: editable text files, one per pattern, shipped in `generation/templates/`.

A template file is a few `key: value` header lines (`task`: math | code | rewrite, `output`: what the model is asked
to write, which decides how a sample is checked), then a `[system]` section (optional) and a `[user]` section. Seed
fields are written `{{field}}` (double braces, so LaTeX such as \\boxed{...} needs no escaping); lines starting with
`#` are comments. `--template NAME` picks a shipped one, `--template PATH` any file written the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from yulan_tune.data.records import DataFormatError

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
TASKS = ("math", "code", "rewrite")
# what the model writes -> the tasks it belongs to
OUTPUTS = {"solution": "math", "problem_and_solution": "math", "program": "code", "text": "rewrite"}
DEFAULT_TEMPLATES = {"math": "math_solution", "code": "code_solution", "rewrite": "rewrite"}
_FIELD = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_SECTION = re.compile(r"^\[(system|user)\]\s*$")


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    task: str
    output: str
    system: str | None
    user: str
    text: str  # the file as read (part of a synth run's identity)

    @property
    def fields(self) -> list[str]:
        return sorted(set(_FIELD.findall(self.user)) | set(_FIELD.findall(self.system or "")))

    def render(self, values: dict, where: str) -> list[dict]:
        """The prompt turns for one seed row; a field the row lacks is one line naming the row and the field."""
        def fill(text: str) -> str:
            def value(match: re.Match) -> str:
                name = match.group(1)
                if values.get(name) in (None, ""):
                    raise DataFormatError(where, f"missing (template {self.name!r} uses {{{{{name}}}}}; "
                                          f"the row has {', '.join(sorted(values)) or 'no fields'})", field=name)
                return str(values[name])
            return _FIELD.sub(value, text)

        turns = [{"role": "system", "content": fill(self.system)}] if self.system else []
        return turns + [{"role": "user", "content": fill(self.user)}]


def shipped_templates() -> list[str]:
    return sorted(path.stem for path in TEMPLATES_DIR.glob("*.txt"))


def parse_template(text: str, name: str) -> PromptTemplate:
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("#"):
            continue
        section = _SECTION.match(line)
        if section:
            current = sections.setdefault(section.group(1), [])
        elif current is not None:
            current.append(line)
        elif line.strip():
            key, colon, value = line.partition(":")
            if not colon or key.strip() not in ("task", "output"):
                raise ValueError(f"template {name}:{number}: expected 'task: ...', 'output: ...' or a [system] / "
                                 f"[user] section, got {line.strip()!r}")
            header[key.strip()] = value.strip()
    output = header.get("output")
    if output not in OUTPUTS:
        raise ValueError(f"template {name}: 'output:' must be one of {', '.join(OUTPUTS)}, got {output!r}")
    task = header.get("task", OUTPUTS[output])
    if task != OUTPUTS[output]:
        raise ValueError(f"template {name}: output {output!r} belongs to task {OUTPUTS[output]!r}, not {task!r}")
    user = "\n".join(sections.get("user", [])).strip()
    if not user:
        raise ValueError(f"template {name}: no [user] section (or it is empty)")
    system = "\n".join(sections.get("system", [])).strip() or None
    return PromptTemplate(name, task, output, system, user, text)


def load_template(name_or_path: str | None, task: str) -> PromptTemplate:
    """A shipped template by name (default: the task's), or a template file; it must belong to `task`."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    name_or_path = name_or_path or DEFAULT_TEMPLATES[task]
    path = Path(name_or_path)
    if not path.is_file():
        path = TEMPLATES_DIR / f"{name_or_path}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"template {name_or_path!r}: neither a file nor a shipped template "
                                    f"({', '.join(shipped_templates())})")
    template = parse_template(path.read_text(encoding="utf-8"), path.stem)
    if template.task != task:
        raise ValueError(f"template {path.stem!r} is for --task {template.task}, not --task {task}")
    return template
