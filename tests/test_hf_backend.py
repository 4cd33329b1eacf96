"""HFBackend on the real SmolLM2-135M (CPU, float32): letter logits, hidden states, batching, generation."""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from cascade_core.prompts import format_prompt
from cascade_core.types import OPTION_LETTERS, Backend, Generation, OptionScores, Question
from models.hf import letter_token_ids

pytestmark = pytest.mark.model

QUESTIONS = [
    Question("What is the capital of France?", ("Berlin", "Madrid", "Paris", "Oslo"), "geography"),
    Question("How many legs does a spider have? Spiders are arachnids, not insects, and they spin webs.",
             ("Four", "Six", "Eight", "Ten"), "biology"),
    Question("Is water wet?", ("Yes", "No"), ""),
    Question("Which of these numbers is prime?", ("4", "6", "7", "8", "9"), "elementary mathematics"),
]
PROMPTS = [format_prompt(q) for q in QUESTIONS]
N_OPTIONS = [len(q.options) for q in QUESTIONS]
HIDDEN = 576
LAYERS = 30


def _answer_in_context(letter: str, repeats: int = 5) -> str:
    """A question asked `repeats` times with `letter` as its answer, then once more, unanswered.

    SmolLM2-135M answers close to "A" whatever the question (its MMLU accuracy is below chance),
    so knowledge cannot test that the right letter is read out; an answer given five times in
    the context can: a mis-wired letter order or answer position would not follow it.
    """
    options = ["Berlin", "Madrid", "Oslo"]
    options.insert(OPTION_LETTERS.index(letter), "Paris")
    head, body = format_prompt(Question("What is the capital of France?", tuple(options), "geography")).split("\n\n", 1)
    return head + "\n\n" + (body + f" {letter}\n\n") * repeats + body


def test_is_a_backend_with_its_parameter_counts(smollm2_backend):
    b = smollm2_backend
    assert isinstance(b, Backend) and b.has_hidden_states and b.model_id == "smollm2-135m"
    # models.md: 134.5 M as transformers loads it; the embedding is tied to the output layer.
    assert abs(b.total_params - 134.5e6) < 0.1e6
    assert b.non_embedding_params == b.total_params - 49152 * HIDDEN
    assert (b.n_layers, b.hidden_size) == (LAYERS, HIDDEN)
    assert b.dtype == torch.float32 and b.quantization == "none" and b.device.type == "cpu"


def test_letter_tokens_are_the_space_letter_tokens(smollm2_backend):
    tok = smollm2_backend.tokenizer
    ids = letter_token_ids(tok)
    assert all(ids[letter] is not None for letter in OPTION_LETTERS)
    assert len(set(ids.values())) == len(OPTION_LETTERS)
    for letter in "ABCD":
        assert tok.convert_ids_to_tokens(ids[letter]) == f"Ġ{letter}"  # " A", as after "Answer:"
        assert tok(f"Answer: {letter}", add_special_tokens=False)["input_ids"][-1] == ids[letter]


def test_letter_logits_shape_and_finiteness(smollm2_backend):
    scores = smollm2_backend.score_options(PROMPTS, N_OPTIONS, layers=[])
    assert len(scores) == len(PROMPTS)
    for s, n, prompt in zip(scores, N_OPTIONS, PROMPTS):
        assert isinstance(s, OptionScores)
        assert s.letter_logits.shape == (n,) and s.letter_logits.dtype == np.float32
        assert np.isfinite(s.letter_logits).all()
        assert s.prompt_tokens == len(smollm2_backend.tokenizer(prompt)["input_ids"])
        assert s.output_tokens == 0 and s.seconds > 0
        assert s.hidden_states == {}


def test_letter_logits_are_the_plain_next_token_logits(smollm2_backend):
    """Against an independent path: one unpadded forward pass and the full vocabulary."""
    b = smollm2_backend
    (scores,) = b.score_options(PROMPTS[:1], [4], layers=[])
    ids = torch.tensor([b.tokenizer(PROMPTS[0])["input_ids"]])
    with torch.inference_mode():
        logits = b.model(input_ids=ids).logits[0, -1]
    letters = [b.tokenizer(f" {c}", add_special_tokens=False)["input_ids"][0] for c in "ABCD"]
    np.testing.assert_allclose(scores.letter_logits, logits[letters].numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("letter", ["C", "D"])
def test_argmax_follows_an_answer_given_in_context(smollm2_backend, letter):
    (scores,) = smollm2_backend.score_options([_answer_in_context(letter)], [4], layers=[])
    assert OPTION_LETTERS[int(np.argmax(scores.letter_logits))] == letter


def test_hidden_states_of_all_layers_and_of_chosen_ones(smollm2_backend):
    b = smollm2_backend
    full, chosen, none = (b.score_options(PROMPTS[:2], N_OPTIONS[:2], layers=layers)
                          for layers in (None, [-1, 5], []))
    for f, c, n in zip(full, chosen, none):
        assert sorted(f.hidden_states) == list(range(LAYERS + 1))  # embeddings + one per layer
        for h in f.hidden_states.values():
            assert h.shape == (HIDDEN,) and h.dtype == np.float32 and np.isfinite(h).all()
        assert sorted(c.hidden_states) == [5, LAYERS]
        np.testing.assert_allclose(c.hidden_states[LAYERS], f.hidden_states[LAYERS], rtol=1e-5, atol=1e-5)
        # Asking for hidden states does not change the logits.
        np.testing.assert_allclose(n.letter_logits, f.letter_logits, rtol=0, atol=1e-4)
    # The embedding layer at the last position is the embedding of that token (":" of "Answer:").
    last_id = b.tokenizer(PROMPTS[0])["input_ids"][-1]
    embedding = b.model.get_input_embeddings().weight[last_id].detach().float().numpy()
    np.testing.assert_allclose(full[0].hidden_states[0], embedding, rtol=0, atol=1e-6)


def test_batched_results_equal_one_at_a_time(smollm2_backend):
    b = smollm2_backend
    lengths = [s.prompt_tokens for s in b.score_options(PROMPTS, N_OPTIONS, layers=[])]
    assert len(set(lengths)) == len(lengths)  # different lengths, so rows are padded
    batched = b.score_options(PROMPTS, N_OPTIONS, layers=[0, 15, 30], batch_size=4)
    chunked = b.score_options(PROMPTS, N_OPTIONS, layers=[0, 15, 30], batch_size=3)
    single = [b.score_options([p], [n], layers=[0, 15, 30])[0] for p, n in zip(PROMPTS, N_OPTIONS)]
    for together in (batched, chunked):
        for t, s in zip(together, single):
            assert t.prompt_tokens == s.prompt_tokens
            np.testing.assert_allclose(t.letter_logits, s.letter_logits, rtol=0, atol=1e-3)
            for layer in (0, 15, 30):
                scale = np.abs(s.hidden_states[layer]).max()
                np.testing.assert_allclose(t.hidden_states[layer], s.hidden_states[layer], rtol=0, atol=1e-4 * scale)


def test_long_prompts_lose_tokens_from_the_left(smollm2_backend, monkeypatch):
    b = smollm2_backend
    long_prompt = "Some background. " * 40 + PROMPTS[0]
    ids = b.tokenizer(long_prompt)["input_ids"]
    monkeypatch.setattr(b, "max_length", 64)
    with pytest.warns(UserWarning, match="exceeds the 64-token limit"):
        (scores,) = b.score_options([long_prompt], [4], layers=[])
    assert scores.prompt_tokens == 64
    with torch.inference_mode():
        logits = b.model(input_ids=torch.tensor([ids[-64:]])).logits[0, -1]
    expected = logits[[b.letter_token_ids[c] for c in "ABCD"]].numpy()
    np.testing.assert_allclose(scores.letter_logits, expected, rtol=0, atol=1e-4)


def test_generate_is_greedy_with_per_token_logprobs(smollm2_backend):
    b = smollm2_backend
    g = b.generate("The capital of France is", max_new_tokens=4, chat=False)  # a raw continuation
    assert isinstance(g, Generation) and "Paris" in g.text
    assert g.output_tokens == len(g.token_logprobs) and 1 <= g.output_tokens <= 4
    assert (g.token_logprobs <= 0).all() and np.isfinite(g.token_logprobs).all()
    ids = b.tokenizer("The capital of France is")["input_ids"]
    assert g.prompt_tokens == len(ids)
    with torch.inference_mode():
        first = torch.log_softmax(b.model(input_ids=torch.tensor([ids])).logits[0, -1], dim=-1)
    assert g.token_logprobs[0] == pytest.approx(float(first.max()), abs=1e-4)  # greedy: the top token


def test_chat_template_puts_the_answer_cue_in_the_assistant_turn(smollm2_backend):
    chat = copy.copy(smollm2_backend)  # same model and tokenizer, chat formatting on
    chat.chat_template = True
    text = chat._chat_text(PROMPTS[0], multiple_choice=True)
    assert text.endswith("<|im_start|>assistant\nAnswer:")
    assert "D. Oslo<|im_end|>" in text  # the user turn ends with the options, not the cue
    (scores,) = chat.score_options(PROMPTS[:1], [4], layers=[LAYERS])
    ids = chat.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert scores.prompt_tokens == len(ids) and np.isfinite(scores.letter_logits).all()
    answer = chat.generate("What is the capital of France?", max_new_tokens=12)
    assert "Paris" in answer.text


def test_bad_inputs_are_named(smollm2_backend):
    b = smollm2_backend
    with pytest.raises(ValueError, match="2 prompts but 1 n_options"):
        b.score_options(PROMPTS[:2], [4])
    with pytest.raises(ValueError, match="n_options must be between 1 and 26"):
        b.score_options(PROMPTS[:1], [27])
    with pytest.raises(ValueError, match="layer 31 is out of range"):
        b.score_options(PROMPTS[:1], [4], layers=[31])
    with pytest.raises(ValueError, match="non-empty string"):
        b.score_options([""], [4])
    with pytest.raises(TypeError):
        b.score_options(PROMPTS[0], [4])
    with pytest.raises(ValueError, match="max_new_tokens"):
        b.generate("Hi", max_new_tokens=0)


def test_threads_sharing_the_model_get_their_own_answers(smollm2_backend):
    b = smollm2_backend
    expected = [s.letter_logits for s in b.score_options(PROMPTS, N_OPTIONS, layers=[])]
    results: dict[int, list] = {}

    def work(i: int) -> None:
        results[i] = b.score_options([PROMPTS[i]], [N_OPTIONS[i]], layers=[])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, want in enumerate(expected):
        np.testing.assert_allclose(results[i][0].letter_logits, want, rtol=0, atol=1e-3)


def test_nf4_on_the_cpu_counts_the_original_weights(smollm2_path, smollm2_backend):
    """The GPU default (bitsandbytes nf4) also loads on a CPU; packed 4-bit weights count as unpacked."""
    from models.hf import HFBackend

    b = HFBackend(smollm2_path, device="cpu", quantization="nf4", model_id="smollm2-135m")
    assert b.quantization == "nf4" and b.dtype == torch.float32
    assert (b.total_params, b.non_embedding_params) == (smollm2_backend.total_params,
                                                        smollm2_backend.non_embedding_params)
    (scores,) = b.score_options(PROMPTS[:1], [4], layers=[LAYERS])
    (reference,) = smollm2_backend.score_options(PROMPTS[:1], [4], layers=[LAYERS])
    assert np.isfinite(scores.letter_logits).all() and scores.hidden_states[LAYERS].shape == (HIDDEN,)
    # Re-quantising the de-quantised GGUF weights moves them, but not far.
    assert np.corrcoef(scores.hidden_states[LAYERS], reference.hidden_states[LAYERS])[0, 1] > 0.8


def test_free_form_uses_the_chat_template_and_stops_at_the_end_of_the_turn(smollm2_backend):
    b = smollm2_backend
    end = b.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in b.end_of_turn_ids()
    g = b.generate("Name the capital of France.", max_new_tokens=40)
    templated = b.tokenizer.apply_chat_template([{"role": "user", "content": "Name the capital of France."}],
                                                tokenize=False, add_generation_prompt=True)
    assert g.prompt_tokens == len(b.tokenizer(templated, add_special_tokens=False)["input_ids"])
    assert "Paris" in g.text and "<|im_end|>" not in g.text
    assert g.finish_reason == "stop" and g.tokens[-1] == "<|im_end|>" and g.output_tokens < 40


def test_generate_streams_its_text_and_stops_within_one_step_when_cancelled(smollm2_backend):
    import threading

    pieces: list[str] = []
    g = smollm2_backend.generate("1, 2, 3, 4,", max_new_tokens=10, chat=False, on_text=pieces.append)
    assert len(pieces) >= 5 and "".join(pieces) == g.text and g.finish_reason == "length"
    cancel, seen = threading.Event(), []

    def on_text(delta):
        seen.append(delta)
        if len(seen) == 4:
            cancel.set()

    stopped = smollm2_backend.generate("1, 2, 3, 4,", max_new_tokens=200, chat=False, on_text=on_text, cancel=cancel)
    assert stopped.finish_reason == "cancelled" and stopped.output_tokens <= 5  # the step in flight, no more
    already = smollm2_backend.generate("1, 2, 3, 4,", max_new_tokens=200, chat=False, cancel=cancel)
    assert (already.finish_reason, already.output_tokens, already.text) == ("cancelled", 0, "")  # no pass at all


def test_cpu_auto_dtype_is_bfloat16_only_where_it_is_native():
    from models.hf import cpu_has_native_bf16

    assert cpu_has_native_bf16("processor : 0\nflags : fpu sse2 avx2 avx512f avx512_bf16\n")
    assert cpu_has_native_bf16("flags\t\t: fpu amx_bf16 amx_tile\n")
    assert not cpu_has_native_bf16("flags : fpu sse2 avx avx2 fma f16c\n")


def test_warm_imports_imports_the_model_code_and_loads_no_weights(smollm2_path):
    """In a fresh interpreter: after warm_imports the architecture's modeling module is imported and
    no weights are in memory (the app's start-up head start must not cost the weights' memory)."""
    import subprocess
    import sys

    code = ("import gc, sys, torch\n"
            "from models.hf import warm_imports\n"
            f"warm_imports([{str(smollm2_path)!r}])\n"
            "assert 'transformers.models.llama.modeling_llama' in sys.modules\n"
            "weights = sum(o.numel() for o in gc.get_objects() if isinstance(o, torch.Tensor))\n"
            "assert weights < 1_000_000, weights  # SmolLM2 alone has 135 M\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=str(Path(__file__).resolve().parent.parent))
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_prepacked_linear_layers_give_the_plain_layers_logits_and_hidden_states(smollm2_path, smollm2_backend):
    """oneDNN-prepacked float32 layers (forced on: "auto" leaves a model as narrow as SmolLM2 plain)
    give the same letter logits and hidden states as plain nn.Linear, and the same greedy text,
    also while the background packing is under way (a mix of packed and plain layers)."""
    from models.hf import HFBackend

    packed = HFBackend(smollm2_path, device="cpu", dtype="float32", quantization="none", cpu_prepack=True)
    early = packed.score_options([format_prompt(Question(text="2 + 2 =", options=("3", "4", "5", "22")))], [4])
    assert packed.wait_prepacked(timeout=300)  # packed in the background; usable meanwhile
    assert packed.prepacked_layers == 210 and smollm2_backend.prepacked_layers == 0
    assert (packed.total_params, packed.non_embedding_params) == (smollm2_backend.total_params,
                                                                    smollm2_backend.non_embedding_params)
    question = Question(text="Which planet is known as the Red Planet?", options=("Venus", "Mars", "Jupiter", "Saturn"))
    prompts = [format_prompt(question), format_prompt(Question(text="2 + 2 =", options=("3", "4", "5", "22")))]
    plain = smollm2_backend.score_options(prompts, [4, 4], layers=[0, 15, 30])
    fast = packed.score_options(prompts, [4, 4], layers=[0, 15, 30])
    np.testing.assert_allclose(early[0].letter_logits, plain[1].letter_logits, atol=2e-4, rtol=1e-5)
    for a, b in zip(plain, fast):
        np.testing.assert_allclose(b.letter_logits, a.letter_logits, atol=2e-4, rtol=1e-5)
        for layer in (0, 15, 30):
            np.testing.assert_allclose(b.hidden_states[layer], a.hidden_states[layer], atol=2e-3, rtol=1e-4)
    assert packed.generate("Name a prime number.", max_new_tokens=12).text == \
        smollm2_backend.generate("Name a prime number.", max_new_tokens=12).text
