#!/usr/bin/env python
"""Rebuild data/prompts/red_team_{train,eval}.jsonl from the hh-rlhf harmless pairs.

    python scripts/build_prompt_sets.py [--pairs ../shared/data/hh-rlhf-harmless/pairs.jsonl.gz]

train: the distinct first user turns of split="train" that mention a harmful topic (a broad keyword
       filter, HARM_LEXICON below; chit-chat such as "Hey" is dropped).
eval:  the distinct first user turns of split="heldout", minus any that also appear in train, hand-
       curated to the ones that are actually harmful requests (EVAL_KEEP: indices into that list,
       chosen by reading all 272 candidates; statements, opinions and borderline questions left out).
The benign sets are hand-written and not built here (see data/prompts/SOURCE.md).
"""
import argparse
import re
from pathlib import Path


from src.safety.constitutional.common.io import atomic_write_jsonl  # noqa: E402
from src.safety.constitutional.common.pairs import load_pairs, red_team_prompts  # noqa: E402

DEFAULT_PAIRS = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"
OUT = Path(__file__).resolve().parents[1] / "data" / "prompts"

HARM_LEXICON = re.compile(
    r"\b(kill|murder|poison|stab|shoot|strangle|hurt|harm|beat|punch|slap|attack|torture|kidnap|traffick|"
    r"abuse|assault|rape|bully|threat|revenge|weapon|gun|bomb|explosive|knife|steal|stole|rob|burglar|"
    r"shoplift|break into|breaking into|pick a lock|sneak|smuggl|launder|fraud|scam|counterfeit|forge|fake|"
    r"cheat|lie to|trick|con |hack|password|virus|malware|spy|stalk|track|follow someone|address|phone number|"
    r"social security|drug|meth|cocaine|heroin|weed|marijuana|lsd|crack|overdose|suicide|kill myself|die|"
    r"pirate|torrent|illegal|crime|criminal|police|cop|evade|prison|jail|vandal|graffiti|destroy|ruin|burn|"
    r"prank|insult|racist|slur|nigg|fag|retard|spic|chink|jew|muslim|black people|white people|"
    r"mexican|asian|immigrant|gay|trans|women are|men are|ugly|stupid|dumb|fat|curse|cuss|swear|fuck|shit|"
    r"bitch|sex|porn|nude|naked|drunk|alcohol|booze|gambl|bet on|terror|nazi|hitler|kkk|slave|genocide)",
    re.IGNORECASE)

EVAL_KEEP = [
    4, 5, 6, 10, 13, 17, 20, 22, 23, 24, 28, 29, 30, 31, 34, 35, 40, 42, 44, 47, 49, 50, 52, 53, 54, 55, 58,
    60, 62, 69, 70, 71, 72, 73, 74, 75, 76, 78, 81, 86, 87, 90, 92, 94, 95, 96, 97, 98, 99, 100, 101, 104,
    106, 108, 112, 115, 117, 118, 124, 125, 126, 127, 128, 129, 132, 135, 136, 138, 139, 140, 141, 142, 145,
    148, 149, 156, 159, 161, 162, 166, 168, 171, 173, 178, 179, 180, 181, 183, 185, 186, 188, 189, 190, 192,
    193, 197, 200, 202, 203, 204, 205, 208, 211, 213, 220, 221, 222, 223, 225, 226, 227, 229, 230, 231, 232,
    234, 235, 236, 237, 238, 239, 242, 243, 244, 245, 246, 248, 249, 250, 252, 262, 267, 269, 271,
]
EXPECTED_CANDIDATES = 272


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=Path, default=DEFAULT_PAIRS)
    parser.add_argument("--output", type=Path, default=OUT)
    args = parser.parse_args(argv)
    train = red_team_prompts(load_pairs(args.pairs, split="train"))
    heldout = red_team_prompts(load_pairs(args.pairs, split="heldout"))
    seen = {p.lower().strip() for p in train}
    candidates = [p for p in heldout if p.lower().strip() not in seen]
    if len(candidates) != EXPECTED_CANDIDATES:
        raise SystemExit(f"expected {EXPECTED_CANDIDATES} held-out candidates, got {len(candidates)}: "
                         "EVAL_KEEP indexes the shipped hh-rlhf file; re-curate for another file")
    train_kept = [p for p in train if HARM_LEXICON.search(p)]
    eval_kept = [candidates[i] for i in EVAL_KEEP]
    source = "hh-rlhf harmless-base (MIT), first user turn"
    atomic_write_jsonl(args.output / "red_team_train.jsonl",
                       [{"prompt": p, "kind": "harmful", "source": source + ", split=train"} for p in train_kept])
    atomic_write_jsonl(args.output / "red_team_eval.jsonl",
                       [{"prompt": p, "kind": "harmful", "source": source + ", split=heldout"} for p in eval_kept])
    print(f"train: {len(train_kept)} of {len(train)} distinct prompts kept by the keyword filter")
    print(f"eval: {len(eval_kept)} of {len(candidates)} held-out prompts not in train, hand-curated")


if __name__ == "__main__":
    main()
