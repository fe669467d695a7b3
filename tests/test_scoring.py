"""Reply scores: BLEU-4, ROUGE-1/2/L and exact match, in English and Chinese."""

import subprocess
import sys
from pathlib import Path

import pytest

from core import scoring
from core.scoring import METRICS, mean_scores, score, words

REPO = Path(__file__).resolve().parents[1]


def test_identical_english_scores_100_everywhere():
    text = "The quick brown fox jumps over the lazy dog."
    assert score(text, text) == dict.fromkeys(METRICS, 100.0)


def test_partial_english_overlap_has_hand_computed_scores():
    result = score("the cat sat on a mat", "the cat is on the mat")
    assert list(result) == list(METRICS)
    # Unigrams: 6 each side; shared the, cat, on, mat = 4 -> P = R = F = 4/6.
    assert result["rouge_1"] == pytest.approx(100 * 4 / 6, abs=1e-4)
    # Bigrams: 5 each side; only "the cat" is shared -> F = 1/5.
    assert result["rouge_2"] == pytest.approx(20.0, abs=1e-4)
    # Longest common subsequence: the cat on mat = 4 of 6.
    assert result["rouge_l"] == pytest.approx(100 * 4 / 6, abs=1e-4)
    # BLEU precisions 4/6, 1/5, then no 3- or 4-gram matches, which "exp"
    # smoothing turns into 1/(2*4) and 1/(4*3); same length, so no brevity
    # penalty: BLEU = (4/6 * 1/5 * 1/8 * 1/12) ** (1/4) = (1/720) ** (1/4).
    assert result["bleu_4"] == pytest.approx(100 * (1 / 720) ** 0.25, abs=1e-4)
    assert 0 < result["bleu_4"] < 100
    assert result["exact_match"] == 0.0


def test_plain_english_bleu_agrees_with_sacrebleu_standard_tokenizer():
    # Without punctuation sacrebleu's own 13a tokenizer makes the same words,
    # so our pre-tokenized BLEU must equal its out-of-the-box sentence BLEU.
    import sacrebleu

    prediction, reference = "a small model answers quickly", "the small model answers well"
    expected = sacrebleu.sentence_bleu(prediction, [reference]).score
    assert score(prediction, reference)["bleu_4"] == pytest.approx(expected, abs=1e-4)


def test_english_words_match_rouge_scores_default_tokenizer():
    from rouge_score.tokenizers import DefaultTokenizer

    text = "Hello, World! It's 3.14 -- isn't_it? (yes)"
    assert words(text) == DefaultTokenizer().tokenize(text)
    assert words(text) == ["hello", "world", "it", "s", "3", "14", "isn", "t", "it", "yes"]


def test_case_and_punctuation_do_not_count_for_bleu_rouge_but_do_for_exact_match():
    result = score("hello world", "Hello, World!")
    assert {name: result[name] for name in METRICS[:4]} == dict.fromkeys(METRICS[:4], 100.0)
    assert result["exact_match"] == 0.0


def test_exact_match_ignores_only_surrounding_and_repeated_whitespace():
    assert score("  Paris \n is  big ", "Paris is big")["exact_match"] == 100.0
    assert score("paris is big", "Paris is big")["exact_match"] == 0.0


def test_chinese_is_segmented_into_words():
    segmented = words("我是一个人工智能助手")
    assert "".join(segmented) == "我是一个人工智能助手"
    assert {"一个", "人工智能", "助手"} <= set(segmented)
    assert len([word for word in segmented if len(word) > 1]) >= 3


def test_identical_chinese_scores_100_everywhere():
    text = "我是一个人工智能助手，很高兴为您服务。"
    assert score(text, text) == dict.fromkeys(METRICS, 100.0)


def test_partial_chinese_overlap_scores_only_because_of_segmentation():
    prediction, reference = "我是一个智能助手", "我是人工智能助手"
    assert words(prediction) == ["我", "是", "一个", "智能", "助手"]
    assert words(reference) == ["我", "是", "人工智能", "助手"]
    result = score(prediction, reference)
    # Shared words 我, 是, 助手 = 3 of 5 and 4 -> F = 2*3 / (5+4) = 2/3.
    assert result["rouge_1"] == pytest.approx(100 * 2 / 3, abs=1e-4)
    assert 0 < result["rouge_1"] < 100
    assert 0 < result["bleu_4"] < 100
    # rouge_score's own tokenizer keeps only [a-z0-9]: Chinese vanishes, score 0.
    from rouge_score.rouge_scorer import RougeScorer

    default = RougeScorer(["rouge1"]).score(reference, prediction)["rouge1"]
    assert default.fmeasure == 0.0


def test_mixed_chinese_and_english():
    prediction, reference = "我喜欢用Python写代码。", "我喜欢ＰＹＴＨＯＮ编程！"
    assert words(prediction) == ["我", "喜欢", "用", "python", "写", "代码"]
    # Full-width letters are folded by NFKC, then lowercased.
    assert words(reference) == ["我", "喜欢", "python", "编程"]
    result = score(prediction, reference)
    # Shared 我, 喜欢, python = 3 of 6 and 4 -> F = 2*3 / (6+4) = 60.
    assert result["rouge_1"] == pytest.approx(60.0, abs=1e-4)
    # Bigrams: only 我喜欢 is shared, 1 of 5 and 3 -> F = 2 / (5+3) = 25.
    assert result["rouge_2"] == pytest.approx(25.0, abs=1e-4)
    assert 0 < result["bleu_4"] < 100


def test_empty_or_wordless_texts_score_zero_without_crashing():
    zeros = dict.fromkeys(METRICS, 0.0)
    assert score("", "the answer") == zeros
    assert score("the answer", "") == zeros
    assert score("   ", "答案") == zeros
    assert score("!!!", "?") == zeros
    assert score("", "") == {**zeros, "exact_match": 100.0}
    assert score(" \n", "") == {**zeros, "exact_match": 100.0}


def test_mean_scores_averages_each_metric():
    rows = [score("a b c", "a b c"), score("", "a b c"), score("x y z", "a b c")]
    assert mean_scores(rows) == {name: pytest.approx(100 / 3, abs=1e-4) for name in METRICS}
    assert mean_scores([{"bleu_4": 1.0}, {"bleu_4": 2.0}, {"bleu_4": 2.0}]) == {"bleu_4": 1.6667}
    assert mean_scores([]) == {}


def test_mean_scores_names_a_row_missing_a_metric():
    with pytest.raises(ValueError, match="row 1 lacks rouge_1"):
        mean_scores([{"bleu_4": 1.0, "rouge_1": 2.0}, {"bleu_4": 1.0}])


def test_rouge_scorer_is_built_once():
    score("one two", "one three")
    before = scoring._rouge_scorer.cache_info()
    score("one two", "one three")
    after = scoring._rouge_scorer.cache_info()
    assert after.currsize == 1 and after.misses == before.misses


def test_import_is_cheap_and_jieba_is_quiet():
    # A fresh interpreter: importing loads no scoring library, and the first
    # Chinese text loads jieba without its "Building prefix dict" chatter.
    code = ("import sys, core.scoring as s\n"
            "assert not {'jieba', 'rouge_score', 'sacrebleu', 'nltk'} & set(sys.modules)\n"
            "s.score('我是助手', '我是一个助手')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
