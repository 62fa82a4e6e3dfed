"""How each answer is held to the format, from the run's config and what the backend can do.

`llm.constrain = "grammar"` needs a backend that decodes under a grammar (`supports_grammar`:
hf, vllm, openai); one that can only pre-fill the answer gets the prefix, and one that takes
neither (the mutator, scripted replays) answers as it does. Under the grammar with
`llm.sites = "sampled"`, each candidate edits `search.edit_sites` layer lines drawn from the run's
seed, the cycle and the candidate's index (so a resume draws the same lines), one hunk apiece:
one-line edits are near-copies under the paper's novelty rule. With `llm.layers = "typed"`, a
line added inside an `nn.Sequential` is a layer that keeps the shapes there.
"""
from __future__ import annotations

import logging

from deltanas.agent.config import Config
from deltanas.agent.llm.base import Prompt
from deltanas.tools import prompting
from deltanas.tools.diff_grammar import AnswerFormat, DiffShape, answer_format, pick_sites
from deltanas.tools.layer_types import pick_families

log = logging.getLogger(__name__)


def effective_constrain(llm, wanted: str) -> str:
    if wanted == "grammar" and not getattr(llm, "supports_grammar", False):
        wanted = "prefix"
    if wanted == "prefix" and not getattr(llm, "supports_prefix", False):
        wanted = "none"
    return wanted


def _draw_key(config: Config, cycle: int, idx: int, attempt: int = 0) -> str:
    """A candidate's draw: its first answer's, or the redraw for its `attempt`-th retry of a near-copy."""
    return f"{config.search.seed}-{cycle}-{idx}" + (f"-r{attempt}" if attempt else "")


def _grammar(config: Config, llm) -> bool:
    return config.search.mode == "delta" and effective_constrain(llm, config.llm.constrain) == "grammar"


def families_for(config: Config, llm, parent_source: str, cycle: int, idx: int,
                 attempt: int = 0) -> tuple[str, ...] | None:
    """The kinds of layer a candidate may add under typed layers: an idea of its own."""
    if not _grammar(config, llm) or config.llm.layers != "typed":
        return None
    return pick_families(_draw_key(config, cycle, idx, attempt), parent_source)


def sites_for(config: Config, llm, parent_source: str, cycle: int, idx: int, attempt: int = 0) -> list[int] | None:
    """The parent lines a candidate's edits go to, when the search places edits: `search.edit_sites`
    of them, and `retry_widen` more for each near-copy retry (`attempt`)."""
    if not _grammar(config, llm) or config.llm.sites != "sampled":
        return None
    s = config.search
    return pick_sites(parent_source, _draw_key(config, cycle, idx, attempt), s.edit_sites + attempt * s.retry_widen,
                      allow_train_changes=config.search.allow_train_changes,
                      typed=config.llm.layers == "typed") or None


def format_for(config: Config, llm, parent_source: str, sites: list[int] | None,
               families: tuple[str, ...] | None = None) -> AnswerFormat:
    s = config.search
    fmt = answer_format(parent_source, mode=s.mode, constrain=effective_constrain(llm, config.llm.constrain),
                        shape=DiffShape(max_hunks=max(s.max_hunks, len(sites or ())), max_removed=s.max_removed,
                                        max_added=s.max_added, min_added=s.min_added,
                                        repeats=s.layer_repeats),
                        allow_train_changes=s.allow_train_changes, sites=sites,
                        typed=config.llm.layers == "typed", families=families)
    if fmt.note:
        log.warning("%s; this answer is pre-filled only", fmt.note)
    return fmt


def proposal(config: Config, llm, parent, info, draw: int, idx: int, goal: str):
    """One candidate's request against `parent` (an archived row) on its dataset `info` (a
    `DatasetInfo`): (the chat, the format its answer is held to, the edit sites drawn, the prompt
    for the backend). `draw` and `idx` seed the sites and layer kinds, so a resume draws the same."""
    s = config.search
    sites = sites_for(config, llm, parent.source, draw, idx)
    families = families_for(config, llm, parent.source, draw, idx)
    chat = prompting.propose_messages(
        parent_source=parent.source, dataset=info.name, in_shape=info.in_shape, num_classes=info.num_classes,
        parent_accuracy=parent.accuracy, goal=goal, mode=s.mode, allow_train_changes=s.allow_train_changes,
        sites=sites, families=families)
    fmt = format_for(config, llm, parent.source, sites, families)
    return chat, fmt, sites, Prompt(messages=chat, base_source=parent.source, mode=s.mode, prefix=fmt.prefix,
                                    grammar=fmt.grammar, hunks=fmt.hunks)
