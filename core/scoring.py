"""Reference-based scores for generated replies: BLEU-4, ROUGE-1/2/L and exact match.

The eval job's predict task calls `score(prediction, reference)` once per row and
`mean_scores(rows)` for the summary. Every metric is on a 0-100 scale.

The arithmetic is the libraries': sacrebleu computes BLEU, Google's rouge_score
computes ROUGE, and jieba segments Chinese. This module only decides what the
words are (`words`), so that BLEU and ROUGE score the very same tokens. That
matters for Chinese: rouge_score's own tokenizer keeps only [a-z0-9] and would
delete Chinese text entirely, scoring every Chinese reply 0.

The libraries are imported inside functions: rouge_score pulls in nltk (over a
second), and jieba loads its dictionary on first use, so `import core.scoring`
stays cheap for the CLI and the web UI.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata

METRICS = ("bleu_4", "rouge_1", "rouge_2", "rouge_l", "exact_match")

# Runs of Han ideographs (unified, extension A, compatibility, extensions B and
# later) and Japanese kana go to jieba; jieba splits kana one character a word.
_CJK_RUN = re.compile(
    "([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]+)")
# Elsewhere a word is a run of letters and digits in any script; everything else
# (spaces, punctuation, symbols, underscores) separates words and is dropped.
_WORD = re.compile(r"[^\W_]+")


def words(text: str) -> list[str]:
    """The tokens that BLEU and ROUGE score, in order.

    Normalisation, applied the same way to predictions and references:
    - NFKC first, so full-width letters and digits (ＡＩ, １２３) match their
      ASCII forms and composed and decomposed accents match.
    - Lowercase: case does not count for BLEU or ROUGE (exact match is strict).
    - Chinese (Han runs, and kana) is segmented with jieba in precise mode.
    - Any other text is split into runs of letters and digits; punctuation and
      symbols are dropped, as rouge_score does by default. "don't" gives
      ["don", "t"] and "3.14" gives ["3", "14"], so plain ASCII English
      tokenizes exactly as rouge_score's default tokenizer (without stemming);
      unlike it, letters outside a-z (é, ß, Cyrillic) are kept.
    - Whitespace never makes a token; no stemming, no stop words.

    Han runs are cut apart from surrounding Latin text before jieba sees them, so
    the rare dictionary word mixing the two ("T恤") splits as "t" and "恤".
    """
    text = unicodedata.normalize("NFKC", text).lower()
    tokens: list[str] = []
    # re.split with a capture group alternates: other text, CJK run, other text...
    for index, part in enumerate(_CJK_RUN.split(text)):
        if index % 2:
            tokens.extend(_segment_chinese(part))
        else:
            tokens.extend(_WORD.findall(part))
    return tokens


def score(prediction: str, reference: str) -> dict[str, float]:
    """Score one prediction against its reference; keys are METRICS, each 0-100.

    - bleu_4: sentence BLEU up to 4-grams over `words()` joined by spaces
      (sacrebleu, tokenize="none"), with sacrebleu's sentence-level defaults:
      "exp" smoothing (Chen & Cherry 2014 method 3, the NIST/mteval smoothing)
      and effective order, so a reply shorter than four words is scored on the
      n-gram orders it has instead of scoring 0.
    - rouge_1, rouge_2, rouge_l: rouge_score's F-measure over the same words;
      rouge_l is sentence-level longest common subsequence.
    - exact_match: 100 when prediction and reference are equal once leading,
      trailing and repeated whitespace is ignored; case, width and punctuation
      do count, since BLEU and ROUGE already give the lenient view.

    When either side has no words (empty, or only punctuation), BLEU and ROUGE
    are 0: there is nothing to compare. Two empty texts still match exactly.
    Values are rounded to 4 decimals, so float noise such as 100.00000000000004
    does not leak into reports.
    """
    result = dict.fromkeys(METRICS, 0.0)
    result["exact_match"] = 100.0 if _same_text(prediction, reference) else 0.0
    predicted, expected = words(prediction), words(reference)
    if predicted and expected:
        result["bleu_4"] = _bleu_4(predicted, expected)
        result.update(_rouge(predicted, expected))
    return {name: round(value, 4) for name, value in result.items()}


def mean_scores(rows: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each metric over rows, rounded to 4 decimals; {} for no rows.

    The metrics are the first row's keys; every row must carry all of them,
    since a mean over a subset of rows would silently mislead.
    """
    if not rows:
        return {}
    names = list(rows[0])
    for index, row in enumerate(rows):
        missing = [name for name in names if name not in row]
        if missing:
            raise ValueError(f"score row {index} lacks {', '.join(missing)}; "
                             f"every row needs {', '.join(names)}")
    return {name: round(math.fsum(row[name] for row in rows) / len(rows), 4)
            for name in names}


def _same_text(prediction: str, reference: str) -> bool:
    """Equal after stripping and collapsing whitespace; nothing else is forgiven."""
    return prediction.split() == reference.split()


def _bleu_4(predicted: list[str], expected: list[str]) -> float:
    """sacrebleu's sentence BLEU over tokens we have already made."""
    return _bleu_metric().sentence_score(" ".join(predicted), [" ".join(expected)]).score


def _rouge(predicted: list[str], expected: list[str]) -> dict[str, float]:
    """rouge_score's F-measures, scaled to 0-100."""
    # Tokens are joined with spaces and split again by _SpaceTokenizer, so each
    # text is segmented once (jieba is the slow part), not once per metric.
    found = _rouge_scorer().score(" ".join(expected), " ".join(predicted))
    return {"rouge_1": 100.0 * found["rouge1"].fmeasure,
            "rouge_2": 100.0 * found["rouge2"].fmeasure,
            "rouge_l": 100.0 * found["rougeL"].fmeasure}


def _segment_chinese(text: str) -> list[str]:
    """jieba's precise-mode words for a run of CJK characters."""
    return [word for word in _jieba().lcut(text, cut_all=False) if not word.isspace()]


class _SpaceTokenizer:
    """Hands rouge_score the tokens `words()` made, which never contain spaces."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


@functools.lru_cache(maxsize=None)
def _jieba():
    """jieba, quiet: it logs "Building prefix dict..." to stderr on first use."""
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    return jieba


@functools.lru_cache(maxsize=None)
def _rouge_scorer():
    """One RougeScorer for every row: building it is the expensive part."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"],
                                    tokenizer=_SpaceTokenizer())


@functools.lru_cache(maxsize=None)
def _bleu_metric():
    """One sacrebleu BLEU set up for sentence scoring of pre-tokenized text."""
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize="none", smooth_method="exp", effective_order=True)
