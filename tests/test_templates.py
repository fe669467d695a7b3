"""Chat templates and label masking, checked token by token."""

import pytest

from core import models, templates
from core.errors import BadInput
from core.templates import IGNORE, TEMPLATES

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "你是谁？"},
    {"role": "assistant", "content": "我是小智。"},
]


@pytest.fixture(scope="module")
def tokenizer(demo_model_path):
    return models.load_tokenizer(str(demo_model_path))


def test_mask_token_by_token_multi_turn(tokenizer):
    ids, labels = templates.encode_conversation(CONVERSATION, tokenizer)
    assert len(ids) == len(labels)
    # The text is exactly the chat template's rendering.
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert tokenizer.decode(ids) == rendered
    # Every token is either trained with its own id, or masked.
    assert all(lab in (IGNORE, tok) for tok, lab in zip(ids, labels))
    segments = templates.trained_segments(tokenizer, ids, labels)
    assert segments == [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("Hello!<|im_end|>\n", True),
        ("<|im_start|>user\n你是谁？<|im_end|>\n<|im_start|>assistant\n", False),
        ("我是小智。<|im_end|>\n", True),
    ]
    # Token level: the trained tokens are exactly the two replies' tokens.
    reply1 = tokenizer("Hello!<|im_end|>\n", add_special_tokens=False)["input_ids"]
    trained = [t for t, lab in zip(ids, labels) if lab != IGNORE]
    assert trained[: len(reply1)] == reply1
    assert tokenizer.decode(trained) == "Hello!<|im_end|>\n我是小智。<|im_end|>\n"


@pytest.mark.parametrize("name", sorted(templates.TEMPLATES))
def test_named_templates_mask_only_replies(tokenizer, name):
    tok = models.load_tokenizer(str(tokenizer.name_or_path), template=name)
    ids, labels = templates.encode_conversation(CONVERSATION, tok)
    trained = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
    assert "Hello!" in trained and "我是小智。" in trained
    assert "Hi there" not in trained and "你是谁" not in trained and "Be brief" not in trained
    assert templates.stop_string(tok, name) in trained


def test_truncation_keeps_part_of_every_response(tokenizer):
    long_prompt = [{"role": "user", "content": "word " * 300},
                   {"role": "assistant", "content": "answer " * 300}]
    ids, labels = templates.encode_conversation(long_prompt, tokenizer)
    for cutoff in (16, 64, 200):
        cut_ids, cut_labels = templates.truncate(ids, labels, cutoff)
        assert len(cut_ids) == len(cut_labels) == cutoff
        n_trained = sum(lab != IGNORE for lab in cut_labels)
        assert n_trained >= cutoff // 2


def test_truncation_drops_whole_later_turns_first(tokenizer):
    ids, labels = templates.encode_conversation(CONVERSATION, tokenizer)
    first_turn_end = templates._turn_ends(labels)[0]
    cut_ids, cut_labels = templates.truncate(ids, labels, first_turn_end + 3)
    assert cut_ids == ids[:first_turn_end]
    assert tokenizer.decode([t for t, lab in zip(cut_ids, cut_labels) if lab != IGNORE]) == \
        "Hello!<|im_end|>\n"


def test_text_records_train_every_token(tokenizer):
    row = templates.encode_example({"text": "plain pretraining text"}, tokenizer, 64)
    assert row["labels"] == row["input_ids"]
    assert row["input_ids"][-1] == tokenizer.eos_token_id


def test_unknown_template_is_bad_input(tokenizer):
    with pytest.raises(BadInput, match="unknown template"):
        templates.apply_template(tokenizer, "vicuna")


@pytest.mark.parametrize("name, expected", [
    ("alpaca", "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello</s>\n\n"
               "### Instruction:\nWho?\n\n### Response:\n"),
    ("llama2", "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] Who? "
               "[/INST]"),
    ("llama3", "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>"
               "assistant<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>user"
               "<|end_header_id|>\n\nWho?<|eot_id|><|start_header_id|>assistant"
               "<|end_header_id|>\n\n"),
    ("mistral", "<s>[INST] Be brief.\n\nHi [/INST]Hello</s>[INST] Who? [/INST]"),
    ("chatml", "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
               "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nWho?<|im_end|>\n"
               "<|im_start|>assistant\n"),
])
def test_named_templates_keep_their_newlines_and_spaces(name, expected):
    """Text between Jinja tags loses whitespace to `{%-`; each template must still render
    its separators exactly, as transformers renders chat templates."""
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Who?"}]
    rendered, _ = render_jinja_template([messages], chat_template=TEMPLATES[name].jinja,
                                        add_generation_prompt=True, bos_token="<s>",
                                        eos_token="</s>")
    assert rendered[0] == expected
