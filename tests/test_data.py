"""AMVLCollator with a chat template: the prompt is the template's user turn and assistant
header around the images' markers and the question, exactly as the tokenizer's own
``apply_chat_template`` writes it, with every image marker expanded to the image's tokens."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from amvl.config import AMVLConfig
from amvl.data import AMVLCollator, VisionTokens
from amvl.model import AMVLModel
from amvl.tiny import tiny_image_processor, tiny_qwen2_vl, word_tokenizer

WORDS = [f"w{i}" for i in range(30)] + ["user", "assistant", "system"]
# ChatML, as Qwen and SmolLM2 Instruct checkpoints write it (written here, not copied)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MARKERS = "<|vision_start|><|image_pad|><|vision_end|>"


def chat_tokenizer(vision: bool = True, template: str | None = CHATML,
                   eos: str = "<|im_end|>"):
    tokenizer = word_tokenizer(WORDS, vision=vision)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = eos
    tokenizer.chat_template = template
    return tokenizer


def vision_tokens(tokenizer) -> VisionTokens:
    return VisionTokens(*tokenizer.convert_tokens_to_ids(
        ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>"]))


def image(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


def expected_prompt(tokenizer, question: str, patches: list[int],
                    system: str | None = None) -> list[int]:
    """The tokenizer's own rendering of the whole turn, tokenized at once, with each image
    token repeated for its patches."""
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": MARKERS * len(patches) + question})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    counts = iter(patches)
    return [t for token in tokenizer(text, add_special_tokens=False)["input_ids"]
            for t in ([token] * next(counts) if token == pad else [token])]


def unpadded(batch: dict, row: int, key: str = "prompt") -> list[int]:
    return batch[f"{key}_ids"][row][batch[f"{key}_mask"][row]].tolist()


def test_prompts_are_the_templates_turn_with_each_image_expanded():
    rng = np.random.default_rng(0)
    tokenizer = chat_tokenizer()
    processor = tiny_image_processor()
    collator = AMVLCollator(tokenizer, processor, vision_tokens(tokenizer), chat_template=True)
    sizes = [[(16, 24), (32, 16)], [], [(24, 24)]]  # two images of other sizes, none, one
    examples = [{"images": [image(rng, *hw) for hw in hws],
                 "question": " ".join(rng.choice(WORDS[:30], size=3 + i)),
                 "answer": " ".join(rng.choice(WORDS[:30], size=2))}
                for i, hws in enumerate(sizes)]
    batch = collator(examples)
    plain = AMVLCollator(tokenizer, processor, vision_tokens(tokenizer))(examples)
    grids = iter(batch["image_grid_thw"].tolist())
    for row, example in enumerate(examples):
        patches = [int(np.prod(next(grids))) // processor.merge_size ** 2
                   for _ in example["images"]]
        assert unpadded(batch, row) == expected_prompt(tokenizer, example["question"], patches)
        # the answer is the text then EOS, as without a template
        assert unpadded(batch, row, "answer") == unpadded(plain, row, "answer")
        assert unpadded(batch, row, "answer")[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert torch.equal(batch["pixel_values"], plain["pixel_values"])
    assert torch.equal(batch["image_grid_thw"], plain["image_grid_thw"])


def test_a_template_given_as_text_and_a_system_prompt():
    tokenizer = chat_tokenizer(vision=False, template=None)
    with pytest.raises(ValueError, match="the tokenizer has no chat template"):
        AMVLCollator(tokenizer, chat_template=True)
    collator = AMVLCollator(tokenizer, chat_template=CHATML, system_prompt="w7 w8")
    batch = collator([{"question": "w1 w2", "answer": "w3"}])
    tokenizer.chat_template = CHATML
    assert unpadded(batch, 0) == expected_prompt(tokenizer, "w1 w2", [], system="w7 w8")
    assert tokenizer.convert_ids_to_tokens(unpadded(batch, 0))[:6] == [
        "<|im_start|>", "system", "w7", "w8", "<|im_end|>", "<|im_start|>"]
    with pytest.raises(ValueError, match="needs a chat_template"):
        AMVLCollator(tokenizer, system_prompt="w7")
    for bad in ("", 1, None):
        with pytest.raises(ValueError, match="chat_template must be True, False or"):
            AMVLCollator(tokenizer, chat_template=bad)
    with pytest.raises(ValueError, match="system_prompt must be a string"):
        AMVLCollator(tokenizer, chat_template=True, system_prompt=3)


@pytest.mark.parametrize("template,match", [
    ("{% for m in messages %}{{ m['content'] }} {{ m['content'] }}{% endfor %}",
     "wrote the user's message 2 times"),
    ("{% for m in messages %}{{ m['content'][:3] }}{% endfor %}",
     "wrote the user's message 0 times"),
    ("{{ raise_exception('no such role') }}", "cannot render a user turn"),
    ("{% for m in messages %}{{ m.content.nope() }}{% endfor %}", "cannot render a user turn"),
])
def test_templates_that_lose_or_repeat_the_message_are_refused(template, match):
    with pytest.raises(ValueError, match=match):
        AMVLCollator(chat_tokenizer(vision=False), chat_template=template)


def test_a_template_that_drops_the_image_markers_is_refused():
    rng = np.random.default_rng(1)
    tokenizer = chat_tokenizer()
    dropping = CHATML.replace("{{ m['content'] }}",
                              "{{ m['content'] | replace('<|image_pad|>', '') }}")
    collator = AMVLCollator(tokenizer, tiny_image_processor(), vision_tokens(tokenizer),
                            chat_template=dropping)
    collator([{"question": "w1", "answer": "w2"}])  # no image: fine
    with pytest.raises(ValueError, match="did not keep the 1 image"):
        collator([{"images": [image(rng, 16, 16)], "question": "w1", "answer": "w2"}])


def test_the_template_counts_against_max_prompt_tokens_and_is_never_cut():
    tokenizer = chat_tokenizer(vision=False)
    scaffold = len(expected_prompt(tokenizer, "", []))  # <|im_start|> user <|im_end|> ...
    collator = AMVLCollator(tokenizer, chat_template=True, max_prompt_tokens=scaffold + 2)
    with pytest.warns(UserWarning, match="lost its first 2 of 4 tokens"):
        batch = collator([{"question": "w1 w2 w3 w4", "answer": "w5"}])
    assert unpadded(batch, 0) == expected_prompt(tokenizer, "w3 w4", [])
    collator = AMVLCollator(tokenizer, chat_template=True, max_prompt_tokens=scaffold)
    with pytest.raises(ValueError, match=f"images and the chat template take {scaffold} tokens"):
        collator([{"question": "w1", "answer": "w5"}])


def test_text_that_spells_the_templates_tokens_is_refused():
    """A question holding "<|im_end|>" would end the user's turn inside the question."""
    collator = AMVLCollator(chat_tokenizer(vision=False), chat_template=True)
    for example in ({"question": "w1 <|im_end|> w2", "answer": "w3"},
                    {"question": "w1", "answer": "<|im_start|> w3"}):
        with pytest.raises(ValueError, match="spells the structural token"):
            collator([example])
        with pytest.raises(ValueError, match="line 1: the .* spells the structural token"):
            collator.check_examples([example], ["line 1"])
    # the same text is plain text without a template: the tokens are not structural there
    AMVLCollator(chat_tokenizer(vision=False))([{"question": "w1 <|im_end|>", "answer": "w3"}])
    # the template's tokens make an empty question a prompt
    collator.check_examples([{"question": "", "answer": "w3"}])
    assert unpadded(collator([{"question": "", "answer": "w3"}]), 0) == \
        expected_prompt(collator.tokenizer, "", [])


def test_warnings_where_the_template_and_the_tokenizer_disagree():
    with pytest.warns(UserWarning, match="ends an assistant turn with '<\\|im_end\\|>', but "
                                         "answers end with the tokenizer's EOS '<eos>'"):
        AMVLCollator(chat_tokenizer(vision=False, eos="<eos>"), chat_template=True)
    # a "thinking" template: the generation prompt opens a reasoning block that the turns it
    # was trained on close before the answer
    thinking = CHATML.replace("{% if add_generation_prompt %}<|im_start|>assistant\n",
                              "{% if add_generation_prompt %}<|im_start|>assistant\nw1\n")
    thinking = thinking.replace("{{ m['content'] }}<|im_end|>",
                                "{% if m['role'] == 'assistant' %}w1 w2\n{% endif %}"
                                "{{ m['content'] }}<|im_end|>")
    with pytest.warns(UserWarning, match="generation prompt ends with '\\\\n' where its "
                                         "assistant turns write ' w2\\\\n' before"):
        AMVLCollator(chat_tokenizer(vision=False), chat_template=thinking)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AMVLCollator(chat_tokenizer(vision=False), chat_template=True)
        # no assistant header at all (Mistral's [INST] ... [/INST]) is how such a model's
        # answers follow the user's turn: nothing to warn of
        AMVLCollator(chat_tokenizer(vision=False), chat_template=(
            "{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|> {{ m['content'] }}"
            " <|im_end|>{% else %}{{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"))


def test_named_templates_and_read_only_settings():
    tokenizer = chat_tokenizer(vision=False)
    tokenizer.chat_template = {"default": CHATML,
                               "terse": "{% for m in messages %}{{ m['content'] }} {% endfor %}"}
    collator = AMVLCollator(tokenizer, chat_template="terse")
    assert tokenizer.convert_ids_to_tokens(unpadded(collator([{"question": "w1",
                                                               "answer": "w2"}]), 0)) == \
        ["w1"]
    with pytest.raises(ValueError, match="'tersee' is neither a Jinja template nor one of the "
                                         "tokenizer's named templates \\['default', 'terse'\\]"):
        AMVLCollator(tokenizer, chat_template="tersee")
    with pytest.raises(AttributeError):  # its renderings are cached
        collator.system_prompt = "w3"


QWEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
              r"\s+(?!\S)|\s+")  # Qwen2's pre-tokenizer pattern: newlines group together


def trained_tokenizer(kind: str):
    """A small BPE trained here with a real family's pre-tokenization: "bytelevel" (Qwen2's,
    whose merges join a header's newline with a question's) or "metaspace" (SentencePiece's
    "▁" for spaces, as Llama 2 and Mistral have it, whose merges join a template's space with
    the question's first word)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["system\nuser\nassistant\n\nHow many red shapes?\n\n  How many?\n",
              "[INST] How many blue circles? [/INST] Three. \n\n\t Is it raining? No"] * 40
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "[INST]", "[/INST]",
                *VISION_MARKERS]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    if kind == "bytelevel":
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
        backend.decoder = decoders.Metaspace(prepend_scheme="first")
        alphabet = []
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=alphabet))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        bos_token="<s>", eos_token="<|im_end|>",
                                        additional_special_tokens=specials[3:])
    tokenizer.chat_template = CHATML
    return tokenizer


VISION_MARKERS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
INST = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
        "{{ m['content'] }} [/INST]{% else %}{{ m['content'] }}<|im_end|>{% endif %}{% endfor %}")
TRIM = CHATML.replace("{{ m['content'] }}", "{{ m['content'] | trim }}")


@pytest.mark.parametrize("kind,template,question", [
    ("bytelevel", CHATML, "\nHow many red shapes?"),  # "\n\n" is one token across the turn
    ("bytelevel", CHATML, "  How many?\n\n"),
    ("metaspace", INST, "How many blue circles?"),  # "▁How": the template's space is its
    ("metaspace", CHATML, "How many?"),
    ("bytelevel", TRIM, " \n How many red shapes?  \n"),  # trimmed, as the template does
    ("metaspace", TRIM, "  How many? "),
], ids=["bpe-newline-merge", "bpe-spaces", "sentencepiece-inst", "sentencepiece-chatml",
        "bpe-trim", "sentencepiece-trim"])
def test_prompts_are_the_whole_turn_tokenized_at_once(kind, template, question):
    """The question is tokenized inside the rendered turn, as apply_chat_template(...,
    tokenize=True) does, not on its own: tokens that merge across its edges, and a template
    that trims the message, give the same ids as the tokenizer's own rendering. Tokenized on
    its own, every one of these prompts differed."""
    tokenizer = trained_tokenizer(kind)
    tokenizer.chat_template = template
    batch = AMVLCollator(tokenizer, chat_template=True)([{"question": question,
                                                          "answer": "Three."}])
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         tokenize=False, add_generation_prompt=True)
    assert unpadded(batch, 0) == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert unpadded(batch, 0).count(tokenizer.bos_token_id) == (template == INST)


def test_prompts_start_with_bos_where_the_tokenizer_adds_one():
    """Llama's, Mistral's and Gemma's tokenizers start a text with BOS, and their models were
    trained so (Gemma falters without it): the collator's prompts lacked it. A chat template
    writes the start itself; add_bos=False keeps prompts as before."""
    from tokenizers import processors

    tokenizer = trained_tokenizer("metaspace")
    question = {"question": "How many blue circles?", "answer": "Three."}
    assert not AMVLCollator(tokenizer).add_bos  # this one adds nothing by itself
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)])
    own = tokenizer(question["question"])["input_ids"]
    assert own[0] == bos
    collator = AMVLCollator(tokenizer)
    assert collator.add_bos and unpadded(collator([question]), 0) == own
    assert unpadded(AMVLCollator(tokenizer, add_bos=False)([question]), 0) == own[1:]
    with pytest.warns(UserWarning, match="the question lost its first 2"):
        cut = AMVLCollator(tokenizer, max_prompt_tokens=len(own) - 2)([question])
    assert unpadded(cut, 0) == [bos] + own[3:]  # BOS stays: only the question is cut
    assert not AMVLCollator(tokenizer, chat_template=CHATML).add_bos
    with pytest.raises(ValueError, match="add_bos=True with a chat_template"):
        AMVLCollator(tokenizer, chat_template=CHATML, add_bos=True)
    tokenizer.bos_token = None
    with pytest.raises(ValueError, match="the tokenizer has no BOS token"):
        AMVLCollator(tokenizer, add_bos=True)


def test_truncation_never_cuts_the_templates_text():
    """The question's first token may hold some of the template's text (BPE's "\\n\\n" across
    the user header and a question starting with a newline): cut from the left, it took the
    header's newline with it ("<|im_start|>userHow many ..."). The template's own tokens
    stay whole now, and only the question loses tokens."""
    tokenizer = trained_tokenizer("bytelevel")
    question = "\nHow many red shapes?"
    whole = AMVLCollator(tokenizer, chat_template=True)([{"question": question,
                                                          "answer": "Three."}])
    length = len(unpadded(whole, 0))
    header = tokenizer.apply_chat_template([{"role": "user", "content": "X"}], tokenize=False,
                                           add_generation_prompt=True).split("X")[0]
    for cut in (1, 3):
        with pytest.warns(UserWarning, match="the question lost its first"):
            batch = AMVLCollator(tokenizer, chat_template=True, max_prompt_tokens=length - cut)(
                [{"question": question, "answer": "Three."}])
        text = tokenizer.decode(unpadded(batch, 0))
        assert text.startswith(header) and len(unpadded(batch, 0)) <= length - cut
        assert question.strip().endswith(text[len(header):].split("<|im_end|>")[0].strip())


def test_a_vlm_trains_and_scores_on_templated_prompts():
    """The template's prompts run through both training paths alike, and generation decodes
    from them (the latent block follows the assistant's header)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    tokenizer = chat_tokenizer()
    base = tiny_qwen2_vl(tokenizer)
    model = AMVLModel(base, tokenizer, AMVLConfig(num_slots=3, latent_dim=5,
                                                  kernel_backend="torch")).double()
    collator = AMVLCollator(tokenizer, tiny_image_processor(),
                            VisionTokens.from_model_config(base.config), chat_template=True)
    batch = collator([{"images": [image(rng, 16, 24)], "question": "w1 w2", "answer": "w3"},
                      {"images": [], "question": "w4", "answer": "w5 w6"}])
    batch["pixel_values"] = batch["pixel_values"].double()
    losses = []
    for shared in (True, False):
        out = model(**batch, seed=3, prefix_sharing=shared)
        losses.append(out.loss.item())
    assert np.isfinite(losses).all()
    assert losses[0] == pytest.approx(losses[1], rel=1e-9)
    generated = model.generate(batch["prompt_ids"], batch["prompt_mask"],
                               batch["pixel_values"], batch["image_grid_thw"],
                               max_new_tokens=3)
    assert generated.sequences.shape == (2, 1, 3)


try:
    from amvl.smollm2 import find_smollm2_gguf
    find_smollm2_gguf()
    import gguf  # noqa: F401
    HAVE_SMOLLM2 = True
except (FileNotFoundError, ImportError):
    HAVE_SMOLLM2 = False


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="SmolLM2 GGUF or gguf not installed")
def test_smollm2_instructs_own_template_and_bpe():
    """A real tokenizer (byte-level BPE) and template: the prompt's ids are those of
    ``apply_chat_template(..., tokenize=True)``, and prompt, latent block aside, answer and
    EOS are the tokenized conversation with the answer."""
    from transformers import AutoTokenizer

    path = find_smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # transformers 5.17 reads the GGUF's EOS as "<|im_start|>" (5.24: "<|im_end|>"), which
    # the collator warns of; set as that warning advises
    tokenizer.eos_token = "<|im_end|>"
    collator = AMVLCollator(tokenizer, chat_template=True)
    question, answer = "Two red squares and one blue circle: how many shapes?", "Three."
    batch = collator([{"question": question, "answer": answer},
                      {"question": "Is it raining?", "answer": "No"}])
    messages = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    assert unpadded(batch, 0) == prompt
    whole = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}],
                                          tokenize=False)
    whole = tokenizer(whole, add_special_tokens=False)["input_ids"]
    assert prompt + unpadded(batch, 0, "answer") == whole[:-1]  # the template's final newline


def test_a_slow_tokenizer_takes_the_parts_tokenized_apart():
    """A tokenizer without offsets (a Python "slow" one) cannot split the whole turn at the
    question's characters: the template's parts and the question are tokenized apart, which
    for a tokenizer whose tokens never cross the question's edges is the same."""
    from transformers import PreTrainedTokenizer

    class WordsAlone(PreTrainedTokenizer):
        def __init__(self, words, **kwargs):
            self.vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", *words])}
            super().__init__(pad_token="<pad>", unk_token="<unk>", **kwargs)

        @property
        def vocab_size(self) -> int:
            return len(self.vocab)

        def get_vocab(self) -> dict[str, int]:
            return dict(self.vocab)

        def _tokenize(self, text, **kwargs):
            return text.split()

        def _convert_token_to_id(self, token):
            return self.vocab.get(token, 1)

        def _convert_id_to_token(self, index):
            return {i: w for w, i in self.vocab.items()}.get(index, "<unk>")

    tokenizer = WordsAlone(WORDS)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHATML
    assert not tokenizer.is_fast
    batch = AMVLCollator(tokenizer, chat_template=True)([{"question": "w1 w2", "answer": "w3"}])
    assert unpadded(batch, 0) == expected_prompt(tokenizer, "w1 w2", [])
    assert tokenizer.convert_ids_to_tokens(unpadded(batch, 0)) == [
        "<|im_start|>", "user", "w1", "w2", "<|im_end|>", "<|im_start|>", "assistant"]


@pytest.mark.parametrize("template", [None, CHATML])
def test_answers_alone_are_the_batchs_answers_without_processing_images(template):
    """AMVLCollator.answers builds a batch's answer tensors without its prompts: scoring a
    benchmark's other choices processed every image again for each of them."""
    tokenizer = chat_tokenizer(template=template)
    calls = []
    processor = tiny_image_processor()
    real = processor.__call__
    processor.__class__ = type("Counting", (type(processor),), {
        "__call__": lambda self, *a, **k: calls.append(1) or real(*a, **k)})
    collator = AMVLCollator(tokenizer, processor, vision_tokens(tokenizer),
                            chat_template=template is not None, max_answer_tokens=3)
    rng = np.random.default_rng(0)
    examples = [{"images": [image(rng, 28, 28)], "question": "w1 w2", "answer": "w3 w4"},
                {"images": [], "question": "w5", "answer": "w6 w7 w8 w9 w10"},
                {"images": [image(rng, 28, 56)], "question": "w11", "answer": ""}]
    with pytest.warns(UserWarning, match="example 1: the answer lost its last 2 of 5"):
        whole = collator(examples)
    calls.clear()
    with pytest.warns(UserWarning, match="example 1: the answer lost its last 2 of 5"):
        alone = collator.answers(examples)
    assert not calls
    assert alone.keys() == {"answer_ids", "answer_mask"}
    for key in alone:
        assert torch.equal(alone[key], whole[key]), key
    with pytest.raises(ValueError, match="example 0: the answer spells the structural"):
        collator.answers([{"question": "w1", "answer": "<|image_pad|>"}])
    with pytest.raises(ValueError, match="empty list"):
        collator.answers([])


def test_an_image_file_reaches_the_model_as_amvl_eval_decodes_it(tmp_path):
    """Training and generation (paths, which transformers' loading opened) and evaluation
    (images the loaders decode) saw one file differently: transparent pixels black in the one,
    white in the other, and a photo's EXIF orientation applied in the one only."""
    from amvl.evaluation import load_choices
    from amvl.run_config import read_jsonl_lines

    pixels = np.zeros((16, 16, 4), np.uint8)
    pixels[4:12, 4:12] = (0, 0, 0, 255)  # a black square on a transparent background
    Image.fromarray(pixels, "RGBA").save(tmp_path / "square.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned by 90 degrees: 16 wide, 24 high
    image(np.random.default_rng(0), 16, 24).save(tmp_path / "photo.jpg", exif=exif)
    tokenizer = word_tokenizer(["which", "one", "two"], vision=True)
    collator = AMVLCollator(tokenizer, tiny_image_processor(),
                            vision_tokens(tokenizer))
    for name, grid in (("square.png", [1, 4, 4]), ("photo.jpg", [1, 6, 4])):
        data = tmp_path / f"{name}.jsonl"
        data.write_text(json.dumps({"images": [name], "question": "which",
                                    "choices": ["one", "two"], "answer": "one"}) + "\n")
        trained = collator(read_jsonl_lines(data)[0])
        scored = collator([{**load_choices(data)[0], "answer": "one"}])
        assert trained["image_grid_thw"].tolist() == [grid]
        assert torch.equal(trained["pixel_values"], scored["pixel_values"])
    white = collator([{"images": [Image.new("RGB", (16, 16), "white")], "question": "which",
                       "answer": "one"}])["pixel_values"]
    square = collator([{"images": [str(tmp_path / "square.png")], "question": "which",
                        "answer": "one"}])["pixel_values"]
    # the background white, as the loaders make it, around the black square
    assert square.max() == white.max() and square.min() < white.min()


def test_a_vlm_collator_says_how_to_get_its_vision_tokens():
    from amvl.tiny import tiny_image_processor, word_tokenizer

    with pytest.raises(ValueError, match=r"vision_tokens=VisionTokens.from_model_config"):
        AMVLCollator(word_tokenizer(["a"], vision=True), tiny_image_processor())
