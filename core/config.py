"""The one declaration of every training setting.

Each field of `TrainConfig` carries its type, default, bounds, help text and the
group it belongs to. The YAML loader, the CLI's KEY=VALUE overrides and the web
form are all derived from this file; nothing else declares a setting.

Loading goes: raw mapping -> `coerce` each value by its field's type and bounds
-> `TrainConfig` -> `validate` (cross-field rules). Any problem is `BadInput`,
raised before a model is loaded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import device, limits, schema, trackers
from .errors import BadInput  # noqa: F401 - callers catch config problems as cfg's
from .i18n import Msg, msg
# Re-exported: callers read and write training configs through this module.
from .schema import (changed, format_value, parse_overrides, read_yaml,  # noqa: F401
                     setting, to_dict, to_yaml)

GROUPS = ("model", "data", "method", "training", "run")
METHODS = ("lora", "qlora", "dora", "oft", "full", "freeze")
# The methods that take the LoRA settings (rank, alpha, target, rsLoRA, PiSSA, LoRA+).
LORA_FAMILY = ("lora", "qlora", "dora")
# The methods that train a PEFT adapter: their final/ and checkpoint-N/ are adapter folders
# (adapter_config.json) that load on the unmodified base model.
ADAPTER_METHODS = LORA_FAMILY + ("oft",)
DEMO_MODEL = "demo"
STAGES = ("sft", "pt", "rm", "dpo", "kto", "grpo")
# Stages that learn from preferences against a frozen reference policy: with the LoRA
# family the reference is the base with the adapter switched off (no second copy).
PREFERENCE_STAGES = ("dpo", "kto")
PREF_LOSSES = ("sigmoid", "ipo", "hinge", "orpo", "simpo")
# Reference-free preference losses: no reference forward pass, no reference copy.
REFERENCE_FREE_LOSSES = ("orpo", "simpo")
# Built-in rule rewards for grpo (core/rewards.py scores them); a user's own scorer is
# named as "file.py:function" and read from an allowed folder, never typed into the page.
BUILTIN_REWARDS = ("exact_match", "answer_f1", "format", "length")
# Stages TRL 1.x no longer has: refused with a pointer to what serves the same purpose
# (the message id of the explanation).
REFUSED_STAGES = {"ppo": "config.stage_refused.ppo"}


@dataclass
class TrainConfig:
    # --- model -----------------------------------------------------------------
    model: str = setting(
        DEMO_MODEL, "Base model: a local folder, a hub id (when online), or 'demo' for the "
        "small model tunebench builds locally on first use.", "model", path=True)
    template: str = setting(
        "auto", "Chat template. 'auto' uses the tokenizer's own; name one for models without "
        "a template (alpaca, chatml, qwen, llama2, llama3, mistral).", "model",
        choices=("auto", "alpaca", "chatml", "qwen", "llama2", "llama3", "mistral"))
    booster: str = setting(
        "auto", "Attention implementation. 'auto' picks the fastest one installed and supported "
        "on this device.", "model",
        choices=("auto", "sdpa", "eager", "flash_attention_2", "liger"), advanced=True)
    rope_scaling: str = setting(
        "none", "Stretch the model's context with RoPE scaling (for cutoff_len beyond what it "
        "was trained on).", "model", choices=("none", "linear", "dynamic", "yarn", "llama3"),
        advanced=True)
    rope_factor: float = setting(2.0, "How many times longer the context becomes with RoPE "
                                 "scaling.", "model", min=1.0, max=64.0, advanced=True)
    trust_remote_code: bool = setting(
        False, "Run Python code shipped inside the model folder. Only enable for models you trust.",
        "model", advanced=True)

    # --- data ------------------------------------------------------------------
    dataset: list[str] = setting(
        ["identity"], "Datasets: names from <dataset_dir>/dataset_info.json, or file paths.",
        "data", path=True)
    dataset_dir: str = setting("data", "Folder holding dataset_info.json and the data files.",
                               "data", advanced=True, path=True)
    identity_name: str = setting("Tuney", "Fills {{name}} in datasets such as 'identity'.", "data",
                                 max_len=limits.MAX_NAME_CHARS)
    identity_author: str = setting("the tunebench team", "Fills {{author}} in datasets such as "
                                   "'identity'.", "data", max_len=limits.MAX_NAME_CHARS)
    cutoff_len: int = setting(1024, "Longest sequence in tokens. Longer examples are truncated, "
                              "keeping part of every response.", "data", min=16, max=262144)
    max_samples: int = setting(0, "Use at most this many records per dataset (0 = all).", "data",
                               min=0, advanced=True)
    val_size: float = setting(0.0, "Share of records held out for evaluation (0 = none).", "data",
                              min=0.0, max=0.5)
    packing: bool = setting(False, "Pack short examples into full sequences, padding-free; "
                            "examples never attend to each other.", "data", advanced=True)

    # --- method ----------------------------------------------------------------
    stage: str = setting(
        "sft", "sft: supervised chat fine-tuning. pt: plain-text pre-training. rm: a reward "
        "model (one score per reply) from chosen/rejected pairs. dpo: preference tuning on "
        "chosen/rejected pairs. kto: preference tuning on single replies labelled good or bad. "
        "grpo: online RL that samples replies and scores them with a reward model or rules.",
        "method", choices=STAGES)
    method: str = setting("lora", "lora/dora: small adapters; qlora: adapters on a 4- or 8-bit "
                          "base; oft: an adapter that rotates each layer's weights (orthogonal "
                          "fine-tuning); full: every weight; freeze: only the last layers.",
                          "method", choices=METHODS)
    lora_rank: int = setting(32, "Adapter rank. Higher learns more and uses more memory.", "method",
                             min=1, max=1024, methods=LORA_FAMILY)
    lora_alpha: int = setting(64, "Adapter scale numerator; alpha/rank scales the update.",
                              "method", min=1, max=4096, methods=LORA_FAMILY)
    lora_dropout: float = setting(0.0, "Dropout on the adapter input.", "method", min=0.0,
                                  max=0.9, methods=LORA_FAMILY, advanced=True)
    lora_target: str = setting("all-linear", "Modules that get adapters: 'all-linear' or a "
                               "comma-separated list such as q_proj,v_proj.", "method",
                               methods=LORA_FAMILY, advanced=True,
                               max_len=limits.MAX_LORA_TARGET_CHARS)
    use_rslora: bool = setting(
        False, "rsLoRA: scale the update by alpha/sqrt(rank) instead of alpha/rank, so high ranks "
        "keep learning. With the same alpha the update is sqrt(rank) times larger: lower "
        "lora_alpha or learning_rate to match.", "method", methods=LORA_FAMILY, advanced=True)
    lora_init: str = setting(
        "default", "Adapter start. default: B = 0, training starts from the base model. pissa: "
        "start from the weights' top singular directions (often converges faster), found by a "
        "16-iteration fast SVD: seconds on a 7B model, where an exact SVD takes minutes, and "
        "about as good. Saved adapters are converted to plain LoRA (twice the rank) that loads "
        "on the original base. Not with qlora or dora.", "method", choices=("default", "pissa"),
        methods=LORA_FAMILY, advanced=True)
    loraplus_lr_ratio: float = setting(
        0.0, "LoRA+: the B matrices (and DoRA's magnitudes) learn at learning_rate x this "
        "ratio, the A matrices at learning_rate (0 = off; the paper suggests 16, often with a "
        "lower learning_rate). Uses the optimizer chosen in optim; the schedule scales both "
        "rates alike.", "method",
        min=0.0, max=1000.0, methods=LORA_FAMILY, advanced=True)
    pref_beta: float = setting(
        0.1, "How far the tuned model may move from the reference (base) model: higher keeps "
        "it closer. For dpo and kto it scales the preference loss (for ipo it is the "
        "regulariser); for grpo it weighs the KL penalty (0 = no reference, no KL).", "method",
        min=0.0, max=100.0, stages=("dpo", "kto", "grpo"))
    pref_loss: str = setting(
        "sigmoid", "Preference loss. sigmoid: DPO. ipo: DPO that resists overfitting. hinge: "
        "SLiC. orpo: odds-ratio preference with an SFT term, no reference model. simpo: "
        "length-normalised reward margin, no reference model.", "method",
        choices=PREF_LOSSES, stages=("dpo",))
    pref_ftx: float = setting(
        0.0, "Weight of a supervised loss on the chosen replies, added to the preference loss "
        "(0 = off). It keeps the model writing the chosen replies fluently instead of only "
        "pushing the rejected ones down, which a small model otherwise does until it babbles.",
        "method", min=0.0, max=100.0, stages=("dpo",))
    kto_desirable_weight: float = setting(
        1.0, "KTO: weight of the replies labelled good. With fewer good than bad replies, raise "
        "it so that weight x good count is about bad count.", "method", min=0.01, max=100.0,
        stages=("kto",), advanced=True)
    kto_undesirable_weight: float = setting(
        1.0, "KTO: weight of the replies labelled bad.", "method", min=0.01, max=100.0,
        stages=("kto",), advanced=True)
    reward_model: str = setting(
        "", "Reward model that scores each sampled reply: the final/ folder of an rm run, or "
        "any sequence-classification model (empty = rule rewards only).", "method",
        stages=("grpo",), path=True)
    reward_funcs: list[str] = setting(
        ["exact_match"], "Rule rewards, summed with the reward model's score: exact_match "
        "(1 when the reply equals the row's answer), answer_f1 (word overlap with the answer, "
        "0 to 1: partial credit), format (1 when the reply matches "
        "reward_format), length (0 up to reward_length_target tokens, falling to -1 at "
        "max_completion_length); none for the reward model alone. From a config or the CLI, also "
        "your own scorer as file.py:function, read from an allowed folder.", "method",
        stages=("grpo",))
    reward_format: str = setting(
        "", "Regular expression a whole reply must match for the format reward.", "method",
        stages=("grpo",), advanced=True, max_len=limits.MAX_NAME_CHARS)
    reward_length_target: int = setting(
        0, "Replies up to this many tokens get no length penalty (0 = half of "
        "max_completion_length).", "method", min=0, max=65536, stages=("grpo",),
        advanced=True)
    num_generations: int = setting(
        4, "Replies sampled per prompt. GRPO learns from how they differ, so at least 2; "
        "batch_size x grad_accum must be a multiple of it.", "method", min=2, max=256,
        stages=("grpo",))
    max_completion_length: int = setting(
        64, "Longest sampled reply in tokens.", "method", min=1, max=32768, stages=("grpo",))
    quant_bits: int = setting(4, "Bits of the quantized base model for QLoRA.", "method",
                              choices=(4, 8), methods=("qlora",))
    freeze_layers: int = setting(2, "Train only this many last transformer layers (and the "
                                 "output head).", "method", min=1, max=1024, methods=("freeze",))
    oft_block_size: int = setting(
        32, "OFT block size: each layer's input is rotated in blocks of this many dimensions. "
        "Bigger learns more and trains about in_features x (size - 1) / 2 parameters per "
        "layer; rounded to a divisor of each layer's width.", "method", min=2, max=1024,
        methods=("oft",))

    # --- training --------------------------------------------------------------
    epochs: float = setting(3.0, "Passes over the data.", "training", min=0.01, max=1000)
    learning_rate: float = setting(
        2e-4, "Peak learning rate. 1e-4..3e-4 suits LoRA on billion-parameter models; 1e-5 "
        "suits full tuning.", "training", min=1e-8, max=1.0)
    batch_size: int = setting(8, "Examples per device per step.", "training", min=1, max=4096)
    grad_accum: int = setting(1, "Steps accumulated before each optimizer update.", "training",
                              min=1, max=1024)
    lr_scheduler: str = setting("cosine", "How the learning rate changes over the run.",
                                "training", choices=("cosine", "linear", "constant",
                                                     "constant_with_warmup", "polynomial"),
                                advanced=True)
    warmup_ratio: float = setting(0.03, "Share of steps spent warming up the learning rate.",
                                  "training", min=0.0, max=1.0, advanced=True)
    max_grad_norm: float = setting(1.0, "Gradient clipping norm (0 = off).", "training", min=0.0,
                                   max=1e6, advanced=True)
    weight_decay: float = setting(0.0, "AdamW weight decay.", "training", min=0.0, max=1.0,
                                  advanced=True)
    compute_type: str = setting(
        "auto", "Numeric precision. auto: bf16 where supported, else fp16 on GPU, else fp32. "
        "pure_bf16 keeps the weights in bf16 too.", "training",
        choices=("auto", "bf16", "fp16", "fp32", "pure_bf16"), advanced=True)
    optim: str = setting(
        "adamw_torch", "Optimizer. The 8-bit and paged ones (bitsandbytes) save memory on GPU.",
        "training", choices=("adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
                             "adafactor", "sgd"), advanced=True)
    gradient_checkpointing: bool = setting(False, "Recompute activations in the backward pass: "
                                           "less memory, about 30% slower.", "training",
                                           advanced=True)
    seed: int = setting(42, "Random seed for data order and initialisation.", "training", min=0,
                        max=2**31 - 1, advanced=True)
    early_stopping_patience: int = setting(
        0, "Stop once the eval loss has not improved for this many evaluations in a row, and "
        "keep the best checkpoint as final/ (0 = never stop early). Needs val_size above 0; "
        "the eval loss is measured at every checkpoint.", "training", min=0, max=10000,
        advanced=True)
    early_stopping_threshold: float = setting(
        0.0, "How much the eval loss must fall below its best so far to count as an "
        "improvement.", "training", min=0.0, max=1e6, advanced=True)

    num_devices: int = setting(1, "Processes to train with, one per GPU (or CPU processes for "
                               "testing).", "training", min=1, max=1024, advanced=True)
    distributed: str = setting(
        "ddp", "How several devices share the work: ddp copies the model to each; fsdp and "
        "deepspeed shard it (GPU only).", "training",
        choices=("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"), advanced=True)
    # Several machines: each runs `tunebench train` with its own node_rank (README, "Running
    # across machines"); node 0 hosts the rendezvous and writes the run folder.
    num_nodes: int = setting(1, "Machines to train on together, each running num_devices "
                             "processes.", "training", min=1, max=1024, advanced=True)
    node_rank: int = setting(0, "This machine's number among num_nodes, from 0. Node 0 hosts "
                             "the rendezvous and writes the run folder.", "training", min=0,
                             max=1023, advanced=True)
    master_addr: str = setting("", "Address of node 0 that every node can reach (needed when "
                               "num_nodes is above 1).", "training", max_len=255, advanced=True)
    master_port: int = setting(29500, "Port of the rendezvous on node 0; open it between the "
                               "machines.", "training", min=1, max=65535, advanced=True)

    # --- run -------------------------------------------------------------------
    logging_steps: int = setting(1, "Write a metrics line every this many steps.", "run", min=1,
                                 max=100000, advanced=True)
    save_steps: int = setting(0, "Save a checkpoint every this many steps (0 = about five "
                              "checkpoints spread over the run).",
                              "run", min=0, max=10**7, advanced=True)
    report_to: str = setting(
        "none", "Also log to an experiment tracker, through transformers' integration. "
        "tensorboard: event files in the run folder's tensorboard/; mlflow: a store in its "
        "mlruns/ (unless MLFLOW_TRACKING_URI says otherwise); wandb, swanlab: need a login or "
        "their offline mode. Each needs its package.", "run", choices=trackers.CHOICES,
        advanced=True)
    output_dir: str = setting("", "Run folder. Empty = saves/<run name>.", "run", path=True)
    run_name: str = setting("", "Run name. Empty = <method>-<date>-<time> (<stage>-<method>-... "
                            "for stages other than sft).", "run", advanced=True,
                            max_len=limits.MAX_RUN_NAME_CHARS)
    resume: bool | str = setting(False, "true resumes from this run's last checkpoint; a path "
                                 "resumes from that checkpoint.", "run", advanced=True, path=True)


@dataclass
class GenConfig:
    """How replies are generated: the Chat tab, `tunebench chat`, and later evaluation and
    serving all read these, so one prompt gets the same reply everywhere."""
    system: str = setting(
        "", "System prompt: instructions given before the conversation (empty = none).",
        "generation", max_len=limits.MAX_MESSAGE_CHARS, multiline=True, flag="--system")
    temperature: float = setting(
        0.0, "Randomness of sampling. 0 = greedy: always the most likely token, so a reply "
        "repeats exactly.", "generation", min=0.0, max=2.0, widget="slider",
        flag="--temperature")
    top_p: float = setting(
        1.0, "Sample only from the most likely tokens whose probabilities add up to this "
        "(1 = all). Used when temperature > 0.", "generation", min=0.01, max=1.0,
        widget="slider", flag="--top-p")
    top_k: int = setting(
        0, "Sample only from this many most likely tokens (0 = no limit). Used when "
        "temperature > 0.", "generation", min=0, max=1000, flag="--top-k")
    max_new_tokens: int = setting(
        256, "Longest reply in tokens; a reply that reaches it stops with reason 'length'.",
        "generation", min=1, max=8192, widget="slider", flag="--max-new-tokens")
    repetition_penalty: float = setting(
        1.0, "Penalty on tokens already in the conversation (1 = none; 1.1 to 1.3 curbs "
        "loops).", "generation", min=1.0, max=2.0, widget="slider",
        flag="--repetition-penalty")
    seed: int = setting(42, "Random seed, set before each reply (both sides of a comparison "
                        "use it), so sampled replies can be repeated.", "generation", min=0,
                        max=2**31 - 1, flag="--seed")


EXPORT_DTYPES = ("auto", "bf16", "fp16", "fp32")
# The rows of core/export.py's FORMATS, in the order the page offers them.
EXPORT_FORMATS = ("safetensors", "bnb-4bit", "bnb-8bit", "gguf")
GGUF_TYPES = ("f16", "bf16", "q8_0", "q4_k_m")  # as core/gguf_export.py writes them


@dataclass
class ExportConfig:
    """How a checkpoint is written for other tools: the Export tab and `tunebench export`."""
    format: str = setting("safetensors", "File format. safetensors: merged, size-sharded "
                          "weights that transformers, vLLM and others load. bnb-4bit / bnb-8bit: "
                          "bitsandbytes-quantized safetensors that from_pretrained loads as "
                          "they are. gguf: one .gguf file for llama.cpp, Ollama and LM Studio, "
                          "with an Ollama Modelfile.", "export",
                          choices=EXPORT_FORMATS, flag="--format")
    gguf_type: str = setting("q8_0", "GGUF weight type (format gguf only): f16 and bf16 keep "
                             "16-bit weights (same greedy tokens as the source); q8_0 (8-bit) "
                             "and q4_k_m (4-bit, smallest) are quantized and verified by "
                             "their agreement with the source.", "export", choices=GGUF_TYPES,
                             flag="--gguf-type")
    shard_size: str = setting("2GB", "Largest file of the export, e.g. 500MB, 2GB or 1GiB "
                              "(format safetensors; the other formats write with their "
                              "library's own sharding, or one file).",
                              "export", max_len=32, flag="--shard-size")
    dtype: str = setting("auto", "Precision of the merged weights. auto keeps the dtype the "
                         "weights are stored in. For bnb and gguf it is the precision merged "
                         "in before quantizing.", "export", choices=EXPORT_DTYPES,
                         flag="--dtype")


EVAL_TASKS = ("loss", "predict", "choice", "harness", "probes")
GENERATING_TASKS = ("predict", "probes")          # the tasks that write replies
DATASET_TASKS = ("loss", "predict", "choice")     # the tasks that read `dataset`


def _generation(name: str) -> Any:
    """A generation setting, as the Chat tab declares it, for the tasks that generate."""
    return schema.borrow(GenConfig, name, tasks=GENERATING_TASKS)


@dataclass
class EvalConfig:
    """One evaluation job: `tunebench eval` and the Evaluate tab. The model, data and
    generation settings are the training and chat ones, borrowed (declared once)."""
    model: str = schema.borrow(TrainConfig, "model")
    adapter: str = setting("", "Checkpoint to evaluate on the model: a run's final/ or "
                           "checkpoint-N/ (an adapter or a whole model). Empty = the model "
                           "alone.", "eval", path=True)
    eval_task: str = setting(
        "predict", "loss: loss and perplexity on the dataset, masked as training masks it. "
        "predict: generate a reply to each prompt and score it against the reference (BLEU-4, "
        "ROUGE, exact match). choice: a multiple-choice file (question, A-D, answer) through "
        "lm-evaluation-harness. harness: lm-evaluation-harness tasks by name. probes: the Chat "
        "tab's probe prompts.", "eval", choices=EVAL_TASKS)
    dataset: list[str] = schema.borrow(TrainConfig, "dataset", tasks=DATASET_TASKS)
    dataset_dir: str = schema.borrow(TrainConfig, "dataset_dir")
    harness_tasks: list[str] = setting(
        [], "lm-evaluation-harness task names for eval_task harness (e.g. arc_easy, mmlu); "
        "their data downloads from the hub, so the machine must be online.", "eval",
        max_len=200, tasks=("harness",))
    num_fewshot: int = setting(0, "Solved examples shown before each benchmark question.",
                               "eval", min=0, max=25, advanced=True, tasks=("choice", "harness"))
    compare_base: bool = setting(True, "Also evaluate the model without the checkpoint, in "
                                 "the same table.", "eval")
    max_samples: int = schema.borrow(TrainConfig, "max_samples", group="eval")
    batch_size: int = setting(16, "Prompts generated (or rows scored) together. Larger is "
                              "faster until memory runs out.", "eval", min=1, max=512)
    template: str = schema.borrow(TrainConfig, "template")
    cutoff_len: int = schema.borrow(TrainConfig, "cutoff_len", tasks=("loss",))
    identity_name: str = schema.borrow(TrainConfig, "identity_name")
    identity_author: str = schema.borrow(TrainConfig, "identity_author")
    trust_remote_code: bool = schema.borrow(TrainConfig, "trust_remote_code")
    system: str = _generation("system")
    temperature: float = _generation("temperature")
    top_p: float = _generation("top_p")
    top_k: int = _generation("top_k")
    max_new_tokens: int = _generation("max_new_tokens")
    repetition_penalty: float = _generation("repetition_penalty")
    seed: int = _generation("seed")
    output_dir: str = setting("", "Job folder. Empty = saves/eval-<task>-<date>-<time>.", "run",
                              path=True)

    @property
    def generation(self) -> GenConfig:
        """The generation settings of this job, as the chat engine takes them."""
        return GenConfig(**{name: getattr(self, name) for name in schema.fields(GenConfig)})


# Settings an eval of a run's checkpoint takes from that run's config.yaml unless given:
# the same template, placeholders and length that the rows were trained with.
EVAL_FROM_RUN = ("model", "template", "cutoff_len", "identity_name", "identity_author",
                 "trust_remote_code")


SERVE_BACKENDS = ("transformers", "vllm")
SERVE_KEY_ENV = "TUNEBENCH_API_KEY"


@dataclass
class ServeConfig:
    """How `tunebench serve` listens and batches (the model and adapters are its arguments;
    the API key is a flag or TUNEBENCH_API_KEY, never a setting written to disk)."""
    host: str = setting("127.0.0.1", "Address to listen on. Anything but loopback needs an API "
                        "key.", "serve", max_len=255, flag="--host")
    port: int = setting(8000, "Port to listen on.", "serve", min=1, max=65535, flag="--port")
    backend: str = setting("transformers", "transformers: transformers + PEFT, on CPU or GPU. "
                           "vllm: vLLM's own OpenAI server with LoRA (needs vLLM and a GPU).",
                           "serve", choices=SERVE_BACKENDS, flag="--backend")
    max_batch: int = setting(8, "Requests generated together in one batch.", "serve", min=1,
                             max=256, flag="--max-batch")
    max_queue: int = setting(64, "Requests waiting or running at most; past it the server "
                             "answers 429 (retry later).", "serve", min=1, max=4096,
                             flag="--max-queue")
    prefix_cache_mb: int = setting(256, "Memory kept for the keys and values of prompts' "
                                   "beginnings, so a request that starts like an earlier one "
                                   "(a chat's earlier turns, a shared system prompt) skips that "
                                   "part. 0 turns it off.", "serve", min=0, max=1_048_576,
                                   flag="--prefix-cache-mb")


# Each schema's short name: its settings' ids in the catalogues (core/i18n.py) are
# field.<short>.<name>.label and .help.
SCHEMAS = {"train": TrainConfig, "gen": GenConfig, "export": ExportConfig, "eval": EvalConfig,
           "serve": ServeConfig}


def gen_config(raw: dict, source: str | None = None) -> GenConfig:
    """Generation settings from a plain mapping (YAML, flags, the Chat tab's widgets)."""
    return schema.build(GenConfig, raw, source)


def export_config(raw: dict, source: str | None = None) -> ExportConfig:
    """Export settings from a plain mapping; the shard size must parse."""
    return schema.build(ExportConfig, raw, source, _export_problems)


def eval_config(raw: dict, source: str | None = None) -> EvalConfig:
    """Eval settings from a plain mapping, with the cross-field rules of an eval job."""
    return schema.build(EvalConfig, raw, source, _eval_problems)


def _eval_problems(config: EvalConfig) -> list[Msg]:
    problems = []
    if config.eval_task == "harness" and not config.harness_tasks:
        problems.append(msg("config.eval.harness_tasks"))
    if config.eval_task in ("loss", "predict", "choice") and not config.dataset:
        problems.append(msg("config.eval.dataset", task=config.eval_task))
    return problems


def serve_config(raw: dict, source: str | None = None) -> ServeConfig:
    return schema.build(ServeConfig, raw, source)


def _export_problems(config: ExportConfig) -> list[Msg]:
    from .export import FORMATS, parse_size  # no torch at import
    problems = []
    try:
        parse_size(config.shard_size)
    except BadInput as err:
        problems.append(msg("config.key_problem", key="shard_size", what=err.what))
    missing = FORMATS[config.format].missing()  # find_spec only: no library is imported
    if missing:
        problems.append(msg("config.key_problem", key="format", what=missing))
    return problems


FIELDS: dict[str, dataclasses.Field] = schema.fields(TrainConfig)


def fields_in(group: str) -> list[dataclasses.Field]:
    """The fields of one group, in declaration order (the order of the form)."""
    return schema.fields_in(TrainConfig, group)


def default_value(name: str) -> Any:
    return schema.default_value(TrainConfig, name)


def coerce(name: str, raw: Any) -> Any:
    """One raw value (YAML, the CLI or the form) -> the training setting's type."""
    return schema.coerce(TrainConfig, name, raw)


def from_mapping(raw: dict, source: str | None = None) -> TrainConfig:
    """A training config from a plain mapping, collecting every problem before failing."""
    _refuse_stage(raw.get("stage"), source)
    return schema.build(TrainConfig, raw, source, validate)


def _refuse_stage(stage: Any, source: str | None) -> None:
    """A stage TRL dropped is bad input with its own explanation, not a bare 'expected
    one of'."""
    name = stage.strip().lower() if isinstance(stage, str) else None
    if name in REFUSED_STAGES:
        raise BadInput(msg("config.stage_refused", stage=name, why=msg(REFUSED_STAGES[name])),
                       file=source, field="stage")


# --- resolving a training config: schema, model, YAML, command line -------------------

RECOMMENDED_FILE = "recommended_training.json"   # beside config.json, like generation_config.json
LAYERS = ("schema", "model", "yaml", "command line")


@dataclass
class Resolved:
    """A training config and, for each setting, the layer its value came from."""
    config: TrainConfig
    sources: dict[str, str]

    def from_layer(self, layer: str) -> dict[str, Any]:
        return {k: getattr(self.config, k) for k, v in self.sources.items() if v == layer}


def recommendations(model: str, stage: str = "sft", method: str = "lora") -> dict[str, Any]:
    """The settings a model folder recommends for `stage` and `method` ({} when none).

    The file maps stage -> method -> settings, with "*" for every method of a stage:
    {"sft": {"*": {...}, "lora": {...}}}. The demo model carries its measured values (named
    as 'demo', they come from its recipe, which writes the same file into its folder).
    A hub id (or a folder without the file) keeps the schema defaults.
    """
    from . import demo_model
    if model == DEMO_MODEL:  # the recipe's table: the copy in its folder is written from it
        table = demo_model.RECOMMENDED
    else:
        path = Path(model).expanduser() / RECOMMENDED_FILE
        try:
            table = _read_recommendations(path) if path.is_file() else {}
        except OSError:
            table = {}
    per_stage = table.get(stage) or {}
    return {**(per_stage.get("*") or {}), **(per_stage.get(method) or {})}


def _read_recommendations(path: Path) -> dict:
    import json
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BadInput(msg("config.recommended.unreadable", error=str(err)),
                       file=str(path)) from None
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise BadInput(msg("config.recommended.shape",
                           shape="{stage: {method or '*': {setting: value}}}"), file=str(path))
    return table


def resolve(yaml_raw: dict | None = None, overrides: dict | None = None,
            source: str | None = None) -> Resolved:
    """Layer the settings, each layer overriding the ones before it: the schema default,
    the model's recommendation (for the stage and method in force), the YAML file, then
    KEY=VALUE (or the form). Every problem is reported before any model loads."""
    yaml_raw, overrides = dict(yaml_raw or {}), dict(overrides or {})
    chosen = {**yaml_raw, **overrides}
    _refuse_stage(chosen.get("stage"), source)
    picked = schema.build(TrainConfig, {k: chosen[k] for k in ("model", "stage", "method")
                                        if k in chosen}, source)
    recommended = recommendations(picked.model, picked.stage, picked.method)
    where = f"{picked.model} ({RECOMMENDED_FILE})"
    unknown = [k for k in recommended if k not in FIELDS or k in ("model", "stage", "method")]
    if unknown:
        raise BadInput(msg("config.recommended.unknown", names=", ".join(map(str, unknown))),
                       file=where)
    config = from_mapping({**recommended, **yaml_raw, **overrides}, source)
    sources = {name: "schema" for name in FIELDS}
    for layer, raw in zip(LAYERS[1:], (recommended, yaml_raw, overrides)):
        sources.update({k: layer for k in raw})
    return Resolved(config, sources)


def load_resolved(path: str | Path | None = None,
                  overrides: list[str] | None = None) -> Resolved:
    """The CLI's path: the YAML file (optional) and KEY=VALUE overrides, resolved."""
    raw = read_yaml(path) if path else {}
    return resolve(raw, parse_overrides(overrides or []), source=str(path) if path else None)


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """`load_resolved`, keeping only the config."""
    return load_resolved(path, overrides).config


def first_job() -> TrainConfig:
    """What the form opens with and Reset returns to: the demo model with its recommended
    settings (the same as a config that names only `model: demo`)."""
    return resolve().config


# --- cross-field rules: the one place they live ---------------------------------

def validate(config: TrainConfig) -> list[Msg]:
    """Every rule that spans several settings or the machine. Empty list = fine.

    Shared by the CLI and the UI so both refuse the same things with the same words. Each
    problem is a message (core.i18n.Msg): str() renders it in the reader's language.
    (A save_steps beyond the run's length is no problem: it is how one asks for only the
    final model, and the trainer says so in the log.)
    """
    problems = []
    if config.method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(msg("config.qlora_needs_bnb"))
    if config.stage == "pt" and config.template != "auto":
        problems.append(msg("config.pt_template"))
    if config.lora_target != "all-linear" and not all(
            part.strip().isidentifier() for part in config.lora_target.split(",")):
        problems.append(msg("config.lora_target"))
    if isinstance(config.resume, str) and not Path(config.resume).is_dir():
        problems.append(msg("config.resume_missing", path=limits.quote(config.resume)))
    if config.run_name and not _is_safe_name(config.run_name):
        problems.append(msg("config.run_name"))
    problems += _precision_problems(config)
    problems += _distributed_problems(config)
    problems += _multinode_problems(config)
    problems += _booster_problems(config)
    problems += _adapter_problems(config)
    problems += _stage_problems(config)
    problems += _early_stopping_problems(config)
    problems += trackers.problems(config.report_to)
    return problems


def _early_stopping_problems(config: TrainConfig) -> list[Msg]:
    if not config.early_stopping_patience:
        return []
    if config.val_size <= 0:
        return [msg("config.early_stopping.no_val")]
    if config.stage == "grpo":
        return [msg("config.early_stopping.grpo")]
    if config.method in LORA_FAMILY and config.lora_init == "pissa":
        # The best checkpoint is reloaded at the end; a PiSSA checkpoint holds the adapter
        # converted for the original base (twice the rank), which the trainer cannot load.
        return [msg("config.early_stopping.pissa")]
    return []


def _stage_problems(config: TrainConfig) -> list[Msg]:
    """What each stage needs besides its dataset (checked when the data is read)."""
    problems = []
    if config.stage != "grpo":
        return problems
    funcs = config.reward_funcs if config.reward_funcs != ["none"] else []
    if not funcs and not config.reward_model:
        problems.append(msg("config.grpo.no_reward"))
    for name in funcs:
        if name not in BUILTIN_REWARDS and not _is_scorer_ref(name):
            problems.append(msg("config.grpo.unknown_reward", name=limits.quote(name),
                                choices=", ".join(BUILTIN_REWARDS)))
    if "format" in funcs and not config.reward_format:
        problems.append(msg("config.grpo.no_format"))
    if config.reward_format:
        import re
        try:
            re.compile(config.reward_format)
        except re.error as err:
            problems.append(msg("config.grpo.bad_format", error=str(err)))
    if (config.batch_size * config.grad_accum) % config.num_generations:
        problems.append(msg("config.grpo.generations", batch=config.batch_size * config.grad_accum,
                            n=config.num_generations))
    if config.packing:
        problems.append(msg("config.grpo.packing"))
    return problems


def _is_scorer_ref(name: str) -> bool:
    """'path/to/file.py:function' (the file is gated and loaded in core/rewards.py)."""
    file, sep, func = name.rpartition(":")
    return bool(sep) and file.endswith(".py") and func.isidentifier()

def _is_safe_name(name: str) -> bool:
    return all(c.isalnum() or c in "-_." for c in name) and not name.startswith(".")


def _adapter_problems(config: TrainConfig) -> list[Msg]:
    """PiSSA where its saved adapter could not be converted back to plain LoRA.

    Only the LoRA methods read lora_init; other methods ignore it (the form hides it).
    """
    if config.method not in LORA_FAMILY or config.lora_init != "pissa":
        return []
    if config.method == "qlora":
        # PEFT computes PiSSA's SVD on full-precision weights and then changes them; on a
        # quantized base it refuses, and re-quantizing the residual would change the base.
        return [msg("config.pissa.qlora")]
    if config.method == "dora":
        # Measured: DoRA's magnitude is tied to the residual weights, so the converted
        # adapter gives different outputs on the original base (logits off by ~0.1).
        return [msg("config.pissa.dora")]
    if config.stage in ("dpo", "kto", "grpo"):
        # The reference policy is the model with its adapter switched off: with PiSSA that
        # is the residual base, not the model the run started from.
        return [msg("config.pissa.reference", stage=config.stage)]
    if _processes(config) > 1 and config.distributed != "ddp":
        return [msg("config.pissa.distributed", distributed=config.distributed)]
    return []


def _precision_problems(config: TrainConfig) -> list[Msg]:
    dev = device.detect()
    if config.compute_type == "fp16" and dev.kind == "cpu":
        return [msg("config.fp16_cpu")]
    if config.compute_type in ("bf16", "pure_bf16") and dev.kind == "cuda" and not dev.bf16:
        return [msg("config.no_bf16")]
    return []


def _distributed_problems(config: TrainConfig) -> list[Msg]:
    dev = device.detect()
    problems = []
    # deepspeed and fsdp run through torchrun even on one device (core/distributed.py)
    if config.distributed != "ddp" and dev.kind != "cuda":
        problems.append(msg("config.distributed.gpu", distributed=config.distributed))
    if config.distributed.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        problems.append(msg("config.distributed.deepspeed", distributed=config.distributed))
    if dev.kind == "cuda" and config.num_devices > dev.count:
        problems.append(msg("config.distributed.devices", n=config.num_devices, count=dev.count))
    if config.optim in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit") and \
            importlib.util.find_spec("bitsandbytes") is None:
        problems.append(msg("config.optim_needs_bnb", optim=config.optim))
    return problems


def _processes(config: TrainConfig) -> int:
    """Training processes in all: num_devices on each of num_nodes machines."""
    return config.num_devices * config.num_nodes


def _multinode_problems(config: TrainConfig) -> list[Msg]:
    problems = []
    if config.node_rank >= config.num_nodes:
        problems.append(msg("config.nodes.rank", rank=config.node_rank, nodes=config.num_nodes))
    if config.master_addr and not _is_host_name(config.master_addr):
        problems.append(msg("config.nodes.bad_addr", addr=limits.quote(config.master_addr)))
    if config.num_nodes == 1:
        return problems
    if not config.master_addr:
        problems.append(msg("config.nodes.no_addr", nodes=config.num_nodes))
    if not config.output_dir and not config.run_name:
        problems.append(msg("config.nodes.output_dir"))
    return problems


def _is_host_name(text: str) -> bool:
    """A DNS name, an IPv4 address or a bare IPv6 address: no spaces, ports or URLs."""
    return re.fullmatch(r"[A-Za-z0-9._-]+|[0-9A-Fa-f:]+", text) is not None


def _booster_problems(config: TrainConfig) -> list[Msg]:
    if config.booster == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            return [msg("config.booster.flash_attn")]
        if device.detect().kind != "cuda":
            return [msg("config.booster.flash_gpu")]
    if config.booster == "liger" and importlib.util.find_spec("liger_kernel") is None:
        return [msg("config.booster.liger")]
    return []
