"""How each answer is held to the format, from the run's config and what the backend can do.

`llm.constrain = "grammar"` needs a backend that decodes under a grammar (`supports_grammar`:
hf, vllm, openai); one that can only pre-fill the answer gets the prefix, and one that takes
neither (the mutator, scripted replays) answers as it does. Under the grammar with
`llm.sites = "sampled"`, each candidate's edit is placed at a layer line drawn from the run's
seed, the cycle and the candidate's index, so a resume draws the same line.
"""
from __future__ import annotations

import logging

from deltanas.agent.config import Config
from deltanas.tools.diff_grammar import AnswerFormat, DiffShape, answer_format, pick_site

log = logging.getLogger(__name__)


def effective_constrain(llm, wanted: str) -> str:
    if wanted == "grammar" and not getattr(llm, "supports_grammar", False):
        wanted = "prefix"
    if wanted == "prefix" and not getattr(llm, "supports_prefix", False):
        wanted = "none"
    return wanted


def site_for(config: Config, llm, parent_source: str, cycle: int, idx: int) -> int | None:
    """The parent line a candidate's edit goes to, when the search places edits."""
    if (config.search.mode != "delta" or config.llm.sites != "sampled"
            or effective_constrain(llm, config.llm.constrain) != "grammar"):
        return None
    return pick_site(parent_source, f"{config.search.seed}-{cycle}-{idx}",
                     allow_train_changes=config.search.allow_train_changes)


def format_for(config: Config, llm, parent_source: str, site: int | None) -> AnswerFormat:
    s = config.search
    fmt = answer_format(parent_source, mode=s.mode, constrain=effective_constrain(llm, config.llm.constrain),
                        shape=DiffShape(max_hunks=s.max_hunks, max_removed=s.max_removed, max_added=s.max_added),
                        allow_train_changes=s.allow_train_changes, site=site)
    if fmt.note:
        log.warning("%s; this answer is pre-filled only", fmt.note)
    return fmt
