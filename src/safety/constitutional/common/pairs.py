"""Reading preference pairs in the hh-rlhf format ("\n\nHuman: ...\n\nAssistant: ..." transcripts).

Every stage that touches human or AI preference pairs reads them through `load_pairs`, so there is
one parser and one fixed train/held-out split.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Sequence

from .io import read_jsonl

_TURN = re.compile(r"\n\n(Human|Assistant):")

# Fixed split of the shipped 1,800 harmless-base pairs: the first 1,500 may be trained on, the last
# 300 are held out for every accuracy figure this project reports.
HH_TRAIN_SIZE = 1500


@dataclass
class PreferencePair:
    prompt: List[dict]      # chat messages up to (not including) the final assistant turn
    chosen: str             # the preferred final assistant answer
    rejected: str
    label: float = 1.0      # P(chosen is better); < 1 for soft AI-feedback labels
    principle: Optional[str] = None

    @property
    def first_user_turn(self) -> str:
        return next(m["content"] for m in self.prompt if m["role"] == "user")


def parse_transcript(text: str) -> List[dict]:
    """"\n\nHuman: a\n\nAssistant: b" -> [{"role": "user", ...}, {"role": "assistant", ...}]"""
    parts = _TURN.split(text)
    if len(parts) < 3:
        raise ValueError("not an hh-rlhf transcript: no '\\n\\nHuman:' / '\\n\\nAssistant:' turns")
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return messages


def pair_from_record(record: dict) -> PreferencePair:
    """One JSON record: hh-rlhf {"chosen", "rejected"} transcripts, or this toolkit's
    {"prompt", "chosen", "rejected", "label"?, "principle"?} with `prompt` a string or messages."""
    if "prompt" in record:
        prompt = record["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return PreferencePair(prompt, record["chosen"], record["rejected"], float(record.get("label", 1.0)),
                              record.get("principle"))
    chosen, rejected = parse_transcript(record["chosen"]), parse_transcript(record["rejected"])
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise ValueError("transcript does not end with an assistant turn")
    return PreferencePair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"])


def load_pairs(path, limit: Optional[int] = None, split: Optional[str] = None) -> List[PreferencePair]:
    """Pairs from JSONL (gzip allowed). `split`: None (all), "train" (first HH_TRAIN_SIZE) or "heldout"."""
    records = read_jsonl(path, skip_torn_tail=False)
    if split == "train":
        records = records[:HH_TRAIN_SIZE]
    elif split == "heldout":
        records = records[HH_TRAIN_SIZE:]
    elif split is not None:
        raise ValueError(f"split must be None, 'train' or 'heldout', got {split!r}")
    pairs = []
    for number, record in enumerate(records, 1):
        try:
            pair = pair_from_record(record)
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"{path}: record {number}: {err}") from err
        if pair.chosen.strip() == pair.rejected.strip():
            continue  # identical answers carry no preference
        pairs.append(pair)
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        raise ValueError(f"{path}: no usable preference pairs")
    return pairs


def pair_to_record(pair: PreferencePair) -> dict:
    return {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected, "label": pair.label,
            "principle": pair.principle}


def red_team_prompts(pairs: Sequence[PreferencePair]) -> List[str]:
    """Distinct first user turns: the red-team attempts that opened each conversation."""
    seen, prompts = set(), []
    for pair in pairs:
        text = pair.first_user_turn
        key = text.lower().strip()
        if key and key not in seen:
            seen.add(key)
            prompts.append(text)
    return prompts
