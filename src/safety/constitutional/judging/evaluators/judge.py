"""The model judge: ask a chat model a principle's question and read the answer's log-probabilities.

No text is generated. The judge prompt ends where the model's answer starts, and one forward pass
per batch gives the next-token distribution; the score is P("Yes") / (P("Yes") + P("No")), summed
over the spellings of each word. Comparisons ask "which answer, A or B, better follows ..." in
both orders and average, which cancels the model's preference for a position:

    p(a > b) = (P(A | a shown first) + P(B | a shown second)) / 2,   so p(a > b) + p(b > a) = 1.

The judge prompt is sent as a user message through the model's chat template with the generation
prompt appended (`generation.render_prompt`, as every prompt in the toolkit), so the next token is
the assistant's first word; a tokenizer without a template gets "User: ...\nAssistant:". The
templates and the answer words can be replaced (constructor arguments, or the constitution's
`judge:` block), e.g. to use a guard model that answers "safe"/"unsafe".

A 135M model is a weak judge (see docs/evaluators.md for its measured accuracy); give it a small
weight next to the classifier, or use a bigger chat model through `judge_model` (`load_judge`).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ...training.generation import GenerationConfig, tokenize_prompts
from ...training.logprobs import lm_logits
from ..constitution import template_problem
from .base import Evaluator, PrincipleScore, make_score

SCORE_TEMPLATE = ("Here is a conversation between a human and an AI assistant.\n\n{conversation}\n\n"
                  "Assistant: {response}\n\nQuestion: {question}\nAnswer with Yes or No.")
COMPARE_TEMPLATE = ("Here is a conversation between a human and an AI assistant, and two possible "
                    "replies.\n\n{conversation}\n\nReply (A): {first}\n\nReply (B): {second}\n\n"
                    "Which reply better follows this principle: {description}\nAnswer with A or B.")


def _clip(text: str, limit: int, keep_end: bool = False) -> str:
    if len(text) <= limit:
        return text
    return "..." + text[-limit:] if keep_end else text[:limit] + "..."


def format_conversation(prompt, limit: int = 1200) -> str:
    """A string prompt or chat messages as 'Human: ... / Assistant: ...' lines (the end kept if long)."""
    if isinstance(prompt, str):
        text = f"Human: {prompt}"
    else:
        text = "\n\n".join(f"{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
                           for m in prompt if m.get("role") in ("user", "assistant"))
    return _clip(text, limit, keep_end=True)


YES_WORDS, NO_WORDS = ("Yes", "yes", "YES"), ("No", "no", "NO")
A_WORDS, B_WORDS = ("A", "(A"), ("B", "(B")


def _single_token_spellings(tokenizer, word: str) -> List[int]:
    """Ids of `word` as one token, with and without a leading space. Each spelling is encoded alone
    and after a newline (the difference of the two encodings): SentencePiece tokenizers add a
    space to a text's first word, so only the second way finds their no-space token."""
    newline = tokenizer.encode("\n", add_special_tokens=False)
    ids = []
    for spelling in (word, " " + word.lstrip()):
        alone = tokenizer.encode(spelling, add_special_tokens=False)
        after = tokenizer.encode("\n" + spelling, add_special_tokens=False)
        tail = after[len(newline):] if after[:len(newline)] == newline else []
        for encoded in (alone, tail):
            if len(encoded) == 1 and encoded[0] not in ids:
                ids.append(encoded[0])
    return ids


def answer_token_ids(tokenizer, words: Sequence[str], what: str = "answer") -> List[int]:
    """The token ids the judge reads for one answer: every single-token spelling of `words`, with
    and without a leading space. Raises if none of the words is a single token."""
    ids: List[int] = []
    for word in words:
        ids += [i for i in _single_token_spellings(tokenizer, word) if i not in ids]
    if not ids:
        raise ValueError(f"judge: none of the {what} words {list(words)} is a single token for this tokenizer "
                         f"({type(tokenizer).__name__}), with or without a leading space; pass words that are "
                         f"(yes_words/no_words/a_words/b_words, or the constitution's judge: block)")
    return ids


def load_judge(path_or_name="default", device=None, dtype=None):
    """(model, tokenizer) of a local chat model for the judge, in eval mode with gradients off.
    Weights default to bf16 on CUDA (the judge only reads log-probs; a 7B model then takes ~15 GB)
    and fp32 on CPU. `path_or_name`: "default", "tiny" or a local Hugging Face model folder."""
    from src.models import load_causal_lm, resolve_device

    device = resolve_device(device)
    if dtype is None and device.type == "cuda":
        dtype = torch.bfloat16
    model, tokenizer = load_causal_lm(path_or_name, device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    return model, tokenizer


class JudgeEvaluator(Evaluator):
    name = "judge"
    weight = 0.25  # measured near chance for SmolLM2-135M (docs/evaluators.md)

    def __init__(self, model, tokenizer, batch_size: int = 8, max_response_chars: int = 800,
                 weight: Optional[float] = None, score_template: Optional[str] = None,
                 compare_template: Optional[str] = None, yes_words: Optional[Sequence[str]] = None,
                 no_words: Optional[Sequence[str]] = None, a_words: Optional[Sequence[str]] = None,
                 b_words: Optional[Sequence[str]] = None):
        """`score_template` needs {conversation} {response} {question}; `compare_template` needs
        {conversation} {first} {second} {description}. The words are what the model answers with:
        P(yes) = P(any yes word) / (P(any yes word) + P(any no word)), likewise A/B."""
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = batch_size
        self.max_response_chars = max_response_chars
        if weight is not None:
            self.weight = weight
        self.score_template = score_template or SCORE_TEMPLATE
        self.compare_template = compare_template or COMPARE_TEMPLATE
        for name, template in (("score_template", self.score_template), ("compare_template", self.compare_template)):
            problem = template_problem(template, name)
            if problem:
                raise ValueError(f"judge {name} {problem}")
        self.yes_ids = answer_token_ids(tokenizer, yes_words or YES_WORDS, "yes")
        self.no_ids = answer_token_ids(tokenizer, no_words or NO_WORDS, "no")
        self.a_ids = answer_token_ids(tokenizer, a_words or A_WORDS, "A")
        self.b_ids = answer_token_ids(tokenizer, b_words or B_WORDS, "B")
        for first, second, ids_1, ids_2 in (("yes", "no", self.yes_ids, self.no_ids), ("A", "B", self.a_ids, self.b_ids)):
            shared = set(ids_1) & set(ids_2)
            if shared:
                raise ValueError(f"judge: the {first} and {second} words share token(s) "
                                 f"{[tokenizer.decode([i]) for i in sorted(shared)]}; choose words that differ in their first token")
        self._config = GenerationConfig(max_prompt_tokens=4096, do_sample=False, batch_size=batch_size)

    @torch.inference_mode()
    def next_token_logprobs(self, texts: Sequence[str]) -> torch.Tensor:
        """Log-softmax of the next token after each chat-templated user message. (n, vocab)"""
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        rows = []
        for start in range(0, len(texts), self.batch_size):
            ids, mask, _ = tokenize_prompts(self.tokenizer, list(texts[start:start + self.batch_size]),
                                            self._config, device)
            logits = lm_logits(self.model, ids, mask, torch.tensor([ids.shape[1] - 1], device=ids.device))[:, -1]  # (batch, vocab)
            rows.append(torch.log_softmax(logits, dim=-1).cpu())
        if was_training:
            self.model.train()
        return torch.cat(rows)

    def _two_way(self, texts: Sequence[str], first_ids, second_ids) -> List[float]:
        """P(first word) / (P(first) + P(second)) for each text."""
        logp = self.next_token_logprobs(texts)
        first = torch.logsumexp(logp[:, first_ids], dim=-1)
        second = torch.logsumexp(logp[:, second_ids], dim=-1)
        return torch.sigmoid(first - second).tolist()

    def score_batch(self, prompts, responses, principles, kinds=None) -> List[List[PrincipleScore]]:
        texts = [self.score_template.format(conversation=format_conversation(p),
                                       response=_clip(r, self.max_response_chars), question=pr.question)
                 for p, r in zip(prompts, responses) for pr in principles]
        probs = self._two_way(texts, self.yes_ids, self.no_ids)
        k = len(principles)
        return [[make_score(v, f"judge P(yes)={v:.2f}") for v in probs[i * k:(i + 1) * k]]
                for i in range(len(prompts))]

    def compare_batch(self, prompts, responses_a, responses_b, principles, kinds=None) -> List[List[float]]:
        def text(p, first, second, pr):
            return self.compare_template.format(conversation=format_conversation(p),
                                           first=_clip(first, self.max_response_chars),
                                           second=_clip(second, self.max_response_chars),
                                           description=pr.description)
        items = list(zip(prompts, responses_a, responses_b))
        forward = [text(p, a, b, pr) for p, a, b in items for pr in principles]    # a shown as (A)
        backward = [text(p, b, a, pr) for p, a, b in items for pr in principles]   # a shown as (B)
        probs = self._two_way(forward + backward, self.a_ids, self.b_ids)
        n = len(forward)
        averaged = [(probs[i] + (1.0 - probs[n + i])) / 2 for i in range(n)]
        k = len(principles)
        return [averaged[i * k:(i + 1) * k] for i in range(len(items))]
