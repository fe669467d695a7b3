"""The benchmark's workloads: which data, which model, which shared hyperparameters.

The mixed-length set is generated from the repository's own bundled text
(data/*), seeded, so every machine benchmarks the very same 600 conversations:
answers run from a few words to about 300 words, which is what makes padding
(and so batching strategy) matter. The preference set (dpo) is built the same
way, two replies of independent lengths per prompt; the arithmetic prompts
(grpo) are seeded sums and differences with their answers.
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
SEED = 20261122
N_MIXED = 600
N_PAIRS = 128
N_SUMS = 50


@dataclass(frozen=True)
class Workload:
    name: str
    dataset: str              # a registered name in data/ or a file path
    method: str               # lora or full
    epochs: float
    batch_size: int
    cutoff_len: int
    learning_rate: float
    lora_rank: int = 8
    lora_alpha: int = 16
    identity: tuple[str, str] = ("Tuney", "the tunebench team")
    notes: str = ""
    stage: str = "sft"
    # The stage's own settings, shared by both sides: tunebench's names (pref_beta,
    # pref_loss, num_generations, max_completion_length); the baselines map them to TRL's.
    extra: dict = field(default_factory=dict)

    def samples(self, n_records: int) -> float:
        """What one run trains on: records x epochs (GRPO: sampled replies)."""
        per_record = self.extra.get("num_generations", 1) if self.stage == "grpo" else 1
        return n_records * per_record * self.epochs


def workloads(data_dir: Path) -> dict[str, Workload]:
    """FINDINGS' two reference workloads and one per preference/RL stage, on the demo model."""
    return {
        "mixed": Workload("mixed", str(write_mixed(data_dir)), "lora", 1.0, 8, 512, 2e-4,
                          notes="600 generated rows, answers 3..300 words; LoRA r8 all-linear"),
        "identity": Workload("identity", str(write_identity(data_dir)), "full", 3.0, 8, 512, 1e-5,
                             notes="bundled identity set x6 (408 rows, placeholders filled), full fine-tune"),
        "dpo": Workload("dpo", str(write_pairs(data_dir)), "lora", 3.0, 8, 512, 2e-3,
                        # pref_ftx 0: the plain DPO loss, no SFT term (the demo recommends 1)
                        stage="dpo", extra={"pref_beta": 0.1, "pref_loss": "sigmoid",
                                            "pref_ftx": 0.0},
                        notes=f"{N_PAIRS} generated preference pairs, replies 3..100 words; "
                              "DPO sigmoid, beta 0.1, LoRA r8 all-linear, 3 epochs"),
        "grpo": Workload("grpo", str(write_sums(data_dir)), "lora", 1.0, 8, 512, 2e-4,
                         stage="grpo", extra={"pref_beta": 0.1, "num_generations": 4,
                                              "max_completion_length": 32,
                                              "reward_funcs": "exact_match"},
                         notes=f"{N_SUMS} arithmetic prompts, 4 replies each of <=32 tokens, "
                               "exact_match reward, beta 0.1, LoRA r8 all-linear, 1 epoch"),
    }


# --- the mixed-length instruction set ---------------------------------------------

def _sentences() -> list[str]:
    """Every English sentence in the bundled datasets, deduplicated, in file order."""
    texts = [json.loads(line)["text"] for line in _lines(DATA / "text_demo.jsonl")]
    for row in json.loads((DATA / "alpaca_demo.json").read_text(encoding="utf-8")):
        texts.append(row["output"])
    with open(DATA / "dolly_demo.csv", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            texts += [row["context"], row["response"]]
    for line in _lines(DATA / "sharegpt_demo.jsonl"):
        texts += [t["value"] for t in json.loads(line)["conversations"] if t["from"] == "gpt"]
    seen, out = set(), []
    for text in texts:
        for sentence in re.split(r"(?<=[.!?])\s+", text.strip()):
            if len(sentence.split()) >= 4 and sentence.isascii() and sentence not in seen:
                seen.add(sentence)
                out.append(sentence)
    return out


def _instructions() -> list[str]:
    rows = json.loads((DATA / "alpaca_demo.json").read_text(encoding="utf-8"))
    out = [r["instruction"] for r in rows if r["instruction"].isascii()]
    with open(DATA / "dolly_demo.csv", encoding="utf-8", newline="") as handle:
        out += [r["instruction"] for r in csv.DictReader(handle) if r["instruction"].isascii()]
    return out


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _answer_words(rng: random.Random) -> int:
    """A third short (3-20 words), a third medium (20-100), a third long (100-300)."""
    low, high = rng.choice(((3, 20), (20, 100), (100, 300)))
    return rng.randint(low, high)


def _answer(rng: random.Random, sentences: list[str], words: int) -> str:
    picked, count = [], 0
    while count < words:
        sentence = rng.choice(sentences)
        picked.append(sentence)
        count += len(sentence.split())
    return " ".join(" ".join(picked).split()[:words]).rstrip(",;:") + "."


def mixed_rows(n: int = N_MIXED, seed: int = SEED) -> list[dict]:
    """`n` single-turn conversations (OpenAI messages layout) with mixed answer lengths."""
    rng = random.Random(seed)
    sentences, instructions = _sentences(), _instructions()
    rows = []
    for _ in range(n):
        words = _answer_words(rng)
        prompt = rng.choice(instructions)
        if words > 60:
            prompt += f" Answer in detail, in about {words} words."
        rows.append({"messages": [{"role": "user", "content": prompt},
                                  {"role": "assistant", "content": _answer(rng, sentences, words)}]})
    return rows


def write_mixed(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mixed.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in mixed_rows()),
                    encoding="utf-8")
    return path


def identity_rows(name: str = "Tuney", author: str = "the tunebench team") -> list[dict]:
    """The bundled identity set as messages, placeholders filled (the baseline has no registry)."""
    rows = json.loads((DATA / "identity.json").read_text(encoding="utf-8"))
    fill = lambda s: s.replace("{{name}}", name).replace("{{author}}", author)  # noqa: E731
    return [{"messages": [{"role": "user", "content": fill(r["instruction"] + (
        "\n" + r["input"] if r.get("input") else ""))},
        {"role": "assistant", "content": fill(r["output"])}]} for r in rows]


def write_identity(folder: Path, copies: int = 6) -> Path:
    """The 68 identity rows six times over (408 rows), near FINDINGS' 400-row reference."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "identity.jsonl"
    rows = identity_rows() * copies
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


# --- the preference pairs (dpo) ---------------------------------------------------

def _reply_words(rng: random.Random) -> int:
    """A third short (3-20 words), a third medium (20-50), a third long (50-100): at
    about 2.7 demo tokens a word, prompt and reply stay under the 512-token cutoff, so
    neither side truncates and both train on the very same tokens."""
    low, high = rng.choice(((3, 20), (20, 50), (50, 100)))
    return rng.randint(low, high)


def pair_rows(n: int = N_PAIRS, seed: int = SEED) -> list[dict]:
    """`n` preference pairs in TRL's conversational layout; chosen and rejected have
    independent lengths, so a batch's sequences differ in length (padding matters)."""
    rng = random.Random(seed + 1)
    sentences, instructions = _sentences(), _instructions()
    rows = []
    for _ in range(n):
        prompt = rng.choice(instructions)
        chosen = _answer(rng, sentences, _reply_words(rng))
        rejected = _answer(rng, sentences, _reply_words(rng))
        rows.append({"prompt": [{"role": "user", "content": prompt}],
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return rows


def write_pairs(folder: Path) -> Path:
    return _write(folder / "pairs.jsonl", pair_rows())


# --- the arithmetic prompts (grpo) ------------------------------------------------

def sum_rows(n: int = N_SUMS, seed: int = SEED) -> list[dict]:
    """`n` questions "What is a + b?" (or a - b) with the answer the exact_match reward
    compares against."""
    rng = random.Random(seed + 2)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        op = rng.choice("+-")
        answer = a + b if op == "+" else a - b
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} {op} {b}?"}],
                     "answer": str(answer)})
    return rows


def write_sums(folder: Path) -> Path:
    return _write(folder / "sums.jsonl", sum_rows())


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path
