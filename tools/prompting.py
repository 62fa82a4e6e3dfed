"""Chat messages for proposing and repairing candidates, rendered from the Jinja templates.

Small models copy placeholders literally, so the delta system prompt shows a
concrete worked example: a real hunk against a tiny real network (kept short:
SmolLM2-135M has an 8k context). The example diff is computed from the two
sources below, so its `@@` header and context lines are always right.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

import jinja2

from deltanas.tools.diff_write import make_diff

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": "..."}

MODES = ("delta", "full")

EXAMPLE_SOURCE = """\
class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_shape[1], 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
"""

EXAMPLE_IMPROVED = EXAMPLE_SOURCE.replace(
    "            nn.ReLU(),\n",
    "            nn.BatchNorm2d(16),\n            nn.GELU(),\n",
)


def _load(name: str) -> str:
    try:
        return resources.files("deltanas.prompts").joinpath(name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise jinja2.TemplateNotFound(name) from None


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FunctionLoader(_load),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render(template: str, **values: object) -> str:
    """Render one template of `deltanas.prompts`; an unknown variable is an error."""
    return _env().get_template(template).render(**values).strip() + "\n"


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _with_newline(source: str) -> str:
    return source if source.endswith("\n") else source + "\n"


def format_accuracy(acc: float | None) -> str:
    if acc is None:
        return "not measured yet"
    pct = acc * 100 if acc <= 1.0 else acc  # the store keeps fractions; accept percentages too
    return f"{pct:.2f}%"


def system_message(mode: str = "delta") -> Message:
    _check_mode(mode)
    text = render("system.j2", mode=mode, example_source=EXAMPLE_SOURCE,
                  example_diff=make_diff(EXAMPLE_SOURCE, EXAMPLE_IMPROVED))
    return {"role": "system", "content": text}


def propose_messages(*, parent_source: str, dataset: str, in_shape: tuple, num_classes: int,
                     parent_accuracy: float | None, goal: str = "improve first-epoch test accuracy",
                     mode: str = "delta", allow_train_changes: bool = False,
                     sites: list[int] | None = None, families: tuple[str, ...] | None = None) -> list[Message]:
    """The system turn and the user turn that asks for one proposal against `parent_source`;
    `sites` (0-based) name the lines the edits go to, when the search chose them, and `families`
    the kinds of layer this candidate may add (tools/layer_types.py)."""
    from deltanas.tools.layer_types import family_names

    _check_mode(mode)
    user = render("full.j2" if mode == "full" else "propose.j2", sites=_where(parent_source, sites),
                  layers=family_names(families),
                  parent_source=_with_newline(parent_source), dataset=dataset,
                  in_shape=tuple(in_shape), num_classes=num_classes,
                  accuracy=format_accuracy(parent_accuracy), goal=goal.rstrip("."),
                  allow_train_changes=allow_train_changes)
    return [system_message(mode), {"role": "user", "content": user}]


def _where(parent_source: str, sites: list[int] | None) -> list[tuple[int, str]]:
    """Edit sites as the prompt names them: (1-based line number, the line's text)."""
    lines = parent_source.splitlines()
    return [(i + 1, lines[i].strip()) for i in sites or ()]


def duplicate_hint(*, parent_source: str, sites: list[int] | None = None,
                   families: tuple[str, ...] | None = None) -> str:
    """The repair hint for a near-copy: make a different change, at the newly drawn `sites`
    (0-based) with the newly drawn layer `families`, where the search draws them."""
    from deltanas.tools.layer_types import family_names

    return render("duplicate.j2", sites=_where(parent_source, sites), layers=family_names(families)).strip()


def revise_message(*, feedback: str, mode: str = "delta") -> Message:
    """The user turn that passes a person's feedback on the model's last answer back to it."""
    _check_mode(mode)
    return {"role": "user", "content": render("revise.j2", feedback=feedback.strip(), mode=mode)}


def repair_message(*, code: str, message: str, hint: str, attempt: int, max_attempts: int,
                   mode: str = "delta") -> Message:
    """The user turn that feeds an apply error back to the model."""
    _check_mode(mode)
    text = render("repair.j2", code=code, message=message.strip(), hint=hint.strip(), attempt=attempt,
                  max_attempts=max_attempts, mode=mode)
    return {"role": "user", "content": text}
