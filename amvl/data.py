"""Turning examples ``{"images": [...], "question": str, "answer": str}`` into model batches.

Prompts are left-padded so every tail (latent slots, answer) starts in the same column; answers
are right-padded and end with the tokenizer's EOS. For Qwen2-VL-family models the images go
through the image processor alone (pillow; the full processor needs torchvision), and each
image becomes ``<|vision_start|> <|image_pad|> x N <|vision_end|>`` in front of the question,
N = t * h * w / merge_size^2 from the processor's grid, exactly what the model's vision tower
emits.
"""

from __future__ import annotations

import io
import os
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image, ImageOps
from torch import Tensor

from amvl.config import AMVLConfig
from amvl.families import vision_markers

if TYPE_CHECKING:
    from transformers import BaseImageProcessor, PreTrainedConfig, PreTrainedTokenizerBase


_TEXT_ONLY = object()  # an example's image when it has none and image_for_text_only is set
# What a chat template is rendered with in place of the question and the answer: private-use
# characters, which no text or template holds and no whitespace filter (``trim``) strips.
_QUESTION = "\ue000amvl question\ue000"
_ANSWER = "\ue000amvl answer\ue000"


_EXIF_ORIENTATION = 0x0112


def _example_name(index: int, example) -> str:
    """How an error names an example of a batch: its place, and its id where it has one (a
    benchmark's record, whose place in the batch alone would not find it)."""
    ident = example.get("id") if isinstance(example, dict) else None
    return f"example {index}" + ("" if ident is None else f" (id {ident!r})")


def rgb_image(image: Image.Image) -> Image.Image:
    """``image`` as every path into a model sees it: turned upright by its EXIF orientation
    (as a camera's JPEG is meant to be shown) and in RGB, transparent pixels composited onto
    white as transformers' ``convert_to_rgb`` (Qwen2-VL's image processor) does; dropping the
    alpha channel would show whatever colour lies under them, often black. ``image`` itself
    when it is upright RGB already."""
    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)),
                                     rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


class ImageDecodeError(OSError):
    """An image file that exists but does not decode (named by its path)."""


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether ``tokenizer`` starts a text with its BOS token by itself (its special tokens
    on, as ``tokenizer(text)`` is called in training recipes)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a")["input_ids"]
    return bool(with_special) and with_special[0] == bos and \
        tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]


def decode_image(data: bytes) -> Image.Image:
    """The image an encoded file's ``data`` holds, decoded whole, as :func:`rgb_image` gives
    it. PIL's errors for data it cannot decode propagate."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return rgb_image(image)


class EncodedImage:
    """An image kept as its encoded file's bytes (PNG, JPEG, ...) and decoded only when a batch
    needs it, which :class:`AMVLCollator` does: a tenth of a decoded image's memory or less,
    for data sets held whole in memory (``amvl eval``'s benchmarks, on every process of a
    run). ``data`` must decode (:func:`decode_image`); the loaders that make these have
    decoded it once to check."""

    __slots__ = ("data", "__weakref__")  # weak references: the collator's image cache

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)

    def decode(self) -> Image.Image:
        """The image, decoded whole, as :func:`decode_image` gives it."""
        return decode_image(self.data)

    def __repr__(self) -> str:
        return f"EncodedImage({len(self.data)} bytes)"


@dataclass
class VisionTokens:
    """Token ids a Qwen2-VL-family model marks images with, from its config."""

    image: int
    start: int
    end: int

    @classmethod
    def from_model_config(cls, config: PreTrainedConfig) -> VisionTokens:
        """The ids under the config's own names (Qwen's ``vision_start_token_id``, GLM-4.1V's
        ``image_start_token_id``, ...)."""
        return cls(config.image_token_id, *vision_markers(config))


class AMVLCollator:
    """Callable collator for :class:`amvl.model.AMVLModel` batches (and ``Trainer``).

    Args:
        tokenizer: the model's tokenizer (must have a pad or EOS token).
        image_processor: a Qwen2-VL image processor, for examples with images.
        vision_tokens: image marker ids (:meth:`VisionTokens.from_model_config`).
        max_prompt_tokens, max_answer_tokens: truncate longer texts (the question from the
            left, so its end, usually the options, stays; the answer from the right), with a
            warning each time a text loses tokens. Images are never truncated: an example
            whose images alone exceed ``max_prompt_tokens`` is an error, since the question
            would vanish entirely.
        cache_images: keep each processed image for as long as the image object lives (for
            many epochs over a small image set, e.g. the built-in puzzles); images given as
            file paths are kept by path for the collator's life.
        special_tokens: the latent block's token strings (``AMVLConfig.special_tokens()``;
            default: AMVLConfig's defaults). Text that spells one of them, or an image marker,
            is refused: the tokenizer would read it as the structural token itself.
        image_for_text_only: an image (e.g. a small blank one) that examples without images
            get instead, so that every batch runs the vision tower. Training a VLM sharded
            across processes (DeepSpeed ZeRO-3, FSDP) needs this when text-only examples are
            mixed in: the tower's parameters are gathered from all processes, so a process
            whose batch has no images would leave the others waiting.
        chat_template: format each prompt as a chat's user turn followed by the assistant's
            header (``apply_chat_template(..., add_generation_prompt=True)``), as an Instruct
            checkpoint was tuned on: True for the tokenizer's own template, a template's Jinja
            text, or the name of one of the tokenizer's named templates. The latent block
            then opens the assistant's turn, before the answer. The user's message is the
            images' markers (``<|vision_start|><|image_pad|><|vision_end|>`` each, as
            Qwen2-VL's template writes them) followed by the question. The turn is tokenized
            whole (with a fast tokenizer), as ``apply_chat_template(..., tokenize=True)``
            does, and split at the question's characters: tokens that merge across its edges
            count as the question's, a template that trims the message trims the question,
            and ``max_prompt_tokens`` cuts only the question. Default False: the prompt is
            the images' markers and the question alone.
        system_prompt: the chat's system message (with ``chat_template`` only; None: none,
            or whatever the template writes by default).
        add_bos: start each prompt with the tokenizer's BOS token (without ``chat_template``
            only: a template writes the prompt's start itself). None (default): where the
            tokenizer adds one to a text by itself, as Llama's, Mistral's and Gemma's do and
            their models were trained on (Qwen's has none).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase,
                 image_processor: BaseImageProcessor | None = None,
                 vision_tokens: VisionTokens | None = None,
                 max_prompt_tokens: int | None = None, max_answer_tokens: int | None = None,
                 cache_images: bool = False, special_tokens: Sequence[str] | None = None,
                 image_for_text_only: object | None = None,
                 chat_template: bool | str = False, system_prompt: str | None = None,
                 add_bos: bool | None = None):
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs a pad or an EOS token")
        if not isinstance(chat_template, (bool, str)) or chat_template == "":
            raise ValueError("chat_template must be True, False or a template's text, got "
                             f"{chat_template!r}")
        if chat_template is True and not tokenizer.chat_template:
            raise ValueError("chat_template=True, but the tokenizer has no chat template: pass "
                             "the template's text as chat_template (amvl train: "
                             "data.chat_template, a Jinja file)")
        named = tokenizer.chat_template if isinstance(tokenizer.chat_template, dict) else {}
        if isinstance(chat_template, str) and "{" not in chat_template \
                and chat_template not in named:
            # transformers renders a string that names none of the tokenizer's templates as
            # a template, which writes it out as it is
            raise ValueError(f"chat_template {chat_template!r} is neither a Jinja template nor "
                             f"one of the tokenizer's named templates {sorted(named)}")
        if system_prompt is not None and (not chat_template or not isinstance(system_prompt,
                                                                              str)):
            raise ValueError("system_prompt must be a string, and needs a chat_template "
                             f"(got system_prompt={system_prompt!r}, "
                             f"chat_template={chat_template!r})")
        if add_bos is not None and not isinstance(add_bos, bool):
            raise ValueError(f"add_bos must be True, False or None, got {add_bos!r}")
        if add_bos and chat_template:
            raise ValueError("add_bos=True with a chat_template: the template writes the "
                             "prompt's start itself (its {{ bos_token }}, where it has one)")
        if add_bos and tokenizer.bos_token_id is None:
            raise ValueError("add_bos=True, but the tokenizer has no BOS token")
        if image_processor is not None and vision_tokens is None:
            raise ValueError("image_processor given without vision_tokens: pass "
                             "vision_tokens=VisionTokens.from_model_config(<the VLM>.config) "
                             "(an AMVLModel's: model.base.config)")
        if image_for_text_only is not None and image_processor is None:
            raise ValueError("image_for_text_only given without an image_processor")
        for name, value in (("max_prompt_tokens", max_prompt_tokens),
                            ("max_answer_tokens", max_answer_tokens)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.vision_tokens = vision_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.max_answer_tokens = max_answer_tokens
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        # id(image) -> (weak reference, processed): PIL images are unhashable, and a weak
        # reference tells a live image from a new one that reuses a freed id.
        self._image_cache: dict[int, tuple[weakref.ref, dict]] | None = {} if cache_images else None
        self._path_cache: dict[str, dict] = {}  # file names cannot be weakly referenced
        self.special_tokens = tuple(AMVLConfig().special_tokens() if special_tokens is None
                                    else special_tokens)
        self._markers: tuple[int, dict[int, str]] | None = None  # (vocabulary size, markers)
        self.image_for_text_only = image_for_text_only
        # processed once (cache_images or not): every text-only example gets the same
        self._text_only_image: dict | None = None
        # read-only (properties): the template's renderings are cached
        self._chat_template = chat_template
        self._system_prompt = system_prompt
        self._add_bos = (not chat_template and _adds_bos(tokenizer)) if add_bos is None \
            else add_bos
        # (vocabulary size, number of images) -> the template's token ids before and after
        # the question
        self._template_parts_cache: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
        # number of images -> (text before the question, text after it, strips its start,
        # strips its end)
        self._template_texts_cache: dict[int, tuple[str, str, bool, bool]] = {}
        if chat_template:
            self._check_template()

    @property
    def chat_template(self) -> bool | str:
        """The chat template in use: False (none), True (the tokenizer's) or its text."""
        return self._chat_template

    @property
    def system_prompt(self) -> str | None:
        """The chat's system message (None: none, or the template's default)."""
        return self._system_prompt

    @property
    def add_bos(self) -> bool:
        """Whether each prompt starts with the BOS token (resolved: never None)."""
        return self._add_bos

    def __getstate__(self) -> dict:
        # DataLoader workers started by "spawn" or "forkserver" get a pickled copy: the caches
        # (weak references among them) stay behind, and each worker fills its own.
        state = dict(self.__dict__)
        state["_image_cache"] = None if self._image_cache is None else {}
        state["_path_cache"] = {}
        return state

    def _process_image(self, image) -> dict:
        if isinstance(image, os.PathLike):
            image = os.fspath(image)
        if self._image_cache is None:
            return self._processed(image)
        if isinstance(image, str):
            if image not in self._path_cache:
                self._path_cache[image] = self._processed(image)
            return self._path_cache[image]
        hit = self._image_cache.get(id(image))
        if hit is not None and hit[0]() is image:
            return hit[1]
        processed = self._processed(image)
        cache, key = self._image_cache, id(image)

        def forget(ref: weakref.ref) -> None:  # the image is gone: so is its entry
            if cache.get(key, (None,))[0] is ref:
                del cache[key]
        try:
            cache[key] = (weakref.ref(image, forget), processed)
        except TypeError:  # an object without weak references: processed each time
            pass
        return processed

    def _processed(self, image) -> dict:
        """The image processor's output for one image: a file's path, an
        :class:`EncodedImage` or a PIL image as :func:`rgb_image` gives it (transformers' own
        loading of a path would drop its alpha channel, where ``amvl eval``'s loaders
        composite it onto white), anything else (an array, a URL) as the image processor
        takes it."""
        if isinstance(image, str) and os.path.isfile(image):
            with open(image, "rb") as file:
                data = file.read()
            try:
                image = decode_image(data)
            except Exception as err:  # noqa: BLE001 - PIL raises many types for bad data
                raise ImageDecodeError(f"cannot decode the image {image} "
                                       f"({type(err).__name__}: {err})") from err
        elif isinstance(image, Image.Image):
            image = rgb_image(image)
        elif isinstance(image, EncodedImage):
            image = image.decode()
        return self.image_processor(images=[image], return_tensors="pt")

    def _images_for_text_only(self) -> list[object]:
        """The images of an example without any: ``image_for_text_only`` (processed once, and
        stood for by ``_TEXT_ONLY``) when one is given."""
        if self.image_for_text_only is None:
            return []
        if self._text_only_image is None:  # as an example's image: a path, alpha on white
            self._text_only_image = self._processed(self.image_for_text_only)
        return [_TEXT_ONLY]

    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _render(self, user: str, answer: str | None = None) -> str:
        """The chat template's text for a user turn, then an assistant turn ``answer`` or, when
        there is none, the generation prompt (the assistant's header)."""
        messages = [] if self.system_prompt is None else [{"role": "system",
                                                           "content": self.system_prompt}]
        messages.append({"role": "user", "content": user})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
        template = None if self.chat_template is True else self.chat_template
        return self.tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False,
            add_generation_prompt=answer is None)

    def _template_texts(self, n_images: int) -> tuple[str, str, bool, bool]:
        """The rendered template's text before and after the question, and whether the
        template strips the message's leading / trailing whitespace (``trim``, ``strip()``, as
        Llama-3's, Gemma's and Qwen3.5's do), which then applies to the question too."""
        if n_images in self._template_texts_cache:
            return self._template_texts_cache[n_images]
        markers = ""
        if n_images:
            vt = self.vision_tokens
            markers = "".join(self.tokenizer.convert_ids_to_tokens([vt.start, vt.image,
                                                                    vt.end])) * n_images
        parts = self._render(markers + _QUESTION).split(_QUESTION)
        if len(parts) != 2:
            raise ValueError(f"the chat template wrote the user's message {len(parts) - 1} "
                             "times; it must write it once")
        padded = self._render(markers + " " + _QUESTION + " ")
        texts = (parts[0], parts[1], " " + _QUESTION not in padded,
                 _QUESTION + " " not in padded)
        self._template_texts_cache[n_images] = texts
        return texts

    def _split_prompt(self, n_images: int, question: str
                      ) -> tuple[list[int], list[int], list[int], bool]:
        """The templated prompt's ids before the question (one image token per image), the
        question's and after it: the whole rendered text tokenized at once, as
        ``apply_chat_template(..., tokenize=True)`` does, and split at the question's
        characters (a token that crosses a boundary, e.g. BPE's "\\n\\n" across the user
        header and a question starting with a newline, counts as the question's); and whether
        the question's first token crosses into the text before it."""
        head, tail = self._template_parts(n_images)  # checks the image markers (cached)
        before, after, lstrip, rstrip = self._template_texts(n_images)
        question = question.lstrip() if lstrip else question
        question = question.rstrip() if rstrip else question
        if not getattr(self.tokenizer, "is_fast", False):  # no offsets: the parts' own ids
            return head, self._text_ids(question), tail, False
        encoded = self.tokenizer(before + question + after, add_special_tokens=False,
                                 return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        start, end = len(before), len(before) + len(question)
        k = 0
        while k < len(ids) and offsets[k][1] <= start:
            k += 1
        m = len(ids)
        while m > k and offsets[m - 1][0] >= end:
            m -= 1
        return ids[:k], ids[k:m], ids[m:], k < m and offsets[k][0] < start

    def _template_parts(self, n_images: int) -> tuple[list[int], list[int]]:
        """The chat template's token ids before the question (with one image token per image
        between its start and end markers, which the caller repeats for the image's patches)
        and after it, up to the assistant's header."""
        key = (len(self.tokenizer), n_images)
        if key in self._template_parts_cache:
            return self._template_parts_cache[key]
        before, after = (self._text_ids(part) for part in self._template_texts(n_images)[:2])
        if n_images:
            vt = self.vision_tokens
            at = [i for i, token in enumerate(before) if token == vt.image]
            if len(at) != n_images or any(
                    i == 0 or i + 1 == len(before) or before[i - 1] != vt.start
                    or before[i + 1] != vt.end for i in at):
                raise ValueError(f"the chat template did not keep the {n_images} image(s)' "
                                 "markers in front of the question as the user's message "
                                 "wrote them")
        self._template_parts_cache[key] = before, after
        return before, after

    def _check_template(self) -> None:
        """Render the template once, so an unusable one fails when the collator is built, and
        warn where its assistant turn does not fit how answers are trained and decoded."""
        try:
            self._template_parts(0)
            with_header = self._render(_QUESTION)
            answered = self._render(_QUESTION, _ANSWER)
        except ValueError:
            raise
        except Exception as err:  # Jinja's errors, or a template that raises on our messages
            raise ValueError(f"the chat template cannot render a user turn: "
                             f"{type(err).__name__}: {err}") from None
        if answered.count(_ANSWER) != 1:
            return
        opening = answered.split(_ANSWER)[0]
        if opening != with_header:  # e.g. a thinking template: "<think>\n" against
            # "<think>\n\n</think>\n\n" before an answer without reasoning
            common = len(os.path.commonprefix([opening, with_header]))
            warnings.warn(f"the chat template's generation prompt ends with "
                          f"{with_header[common:]!r} where its assistant turns write "
                          f"{opening[common:]!r} before the answer: the latent block and the "
                          "answer follow the generation prompt (pass a template whose "
                          "generation prompt opens the answer as its turns do)", stacklevel=3)
        turn_end = self._text_ids(answered.split(_ANSWER)[1])
        eos = self.tokenizer.eos_token_id
        if turn_end and eos is not None and turn_end[0] != eos:
            token = self.tokenizer.convert_ids_to_tokens(turn_end[0])
            warnings.warn(f"the chat template ends an assistant turn with {token!r}, but "
                          f"answers end with the tokenizer's EOS {self.tokenizer.eos_token!r}, "
                          f"where generate stops: set the tokenizer's eos_token to {token!r} "
                          "(as Instruct checkpoints have it) for answers that end as the "
                          "template's turns do", stacklevel=3)

    def _check(self, where: str, example: dict) -> None:
        """Refuse an example that is not a dict of string texts, or that has images the
        collator cannot process; ``where`` names it ("example 3")."""
        if not isinstance(example, dict):
            raise TypeError(f"{where} must be a dict, got {type(example).__name__}")
        for key in ("question", "answer"):
            if not isinstance(example.get(key), str):
                raise ValueError(f"{where}: {key!r} must be a string, "
                                 f"got {type(example.get(key)).__name__}")
        images = example.get("images")
        if images is not None and not isinstance(images, (list, tuple)):
            # a single path would be read character by character
            raise TypeError(f"{where}: 'images' must be a list (of images or paths), got "
                            f"{type(images).__name__}")
        if images and self.image_processor is None:
            raise ValueError(f"{where} has images but the collator has no image processor")

    @staticmethod
    def _check_not_empty(where: str, has_prompt: bool, has_answer: bool) -> None:
        """Refuse an example with nothing to condition on or nothing to predict."""
        if not has_prompt:
            raise ValueError(f"{where}: the prompt is empty (no images, no question)")
        if not has_answer:
            raise ValueError(f"{where}: the answer is empty and there is no EOS token")

    def answer_tokens(self, examples: Sequence[dict]) -> int:
        """How many answer tokens (EOS included) a batch of ``examples`` holds, counted from
        the answers' text alone: what ``answer_mask.sum()`` of their batch is, without
        processing any image (a training step counts its micro-batches' tokens first)."""
        eos = int(self.tokenizer.eos_token_id is not None)
        limit = self.max_answer_tokens or 1 << 62
        total = 0
        for index, example in enumerate(examples):
            self._check(f"example {index}", example)  # the batch's own errors, not the tokenizer's
            total += min(len(self._text_ids(example["answer"])), limit) + eos
        return total

    def check_examples(self, examples: Sequence[dict],
                       names: Sequence[str] | None = None) -> None:
        """Refuse the first of ``examples`` that a batch would refuse for its text, without
        processing any image: one that is not a dict, a question or answer that is not a
        string, images without an image processor, text that spells a structural token, an
        empty prompt (no images and a question of no tokens), an empty answer without an EOS
        token. The same checks as :meth:`__call__`'s, for a whole data set at once before
        training, where a bad example would otherwise stop the run only when its batch is
        built. Each text is tokenized once. The question is checked whole, where a batch
        checks only what ``max_prompt_tokens`` leaves of it. ``names`` name the examples in
        the errors (default: "example <index>"). Raises TypeError or ValueError."""
        if names is not None and len(names) != len(examples):
            raise ValueError(f"{len(names)} names for {len(examples)} examples")
        markers = self._marker_ids()  # once: the vocabulary does not change while checking
        has_eos = self.tokenizer.eos_token_id is not None
        has_template = bool(self.chat_template and sum(self._template_parts(0), []))
        for index, example in enumerate(examples):
            where = names[index] if names is not None else f"example {index}"
            self._check(where, example)
            question = self._text_ids(example["question"])
            answer = self._text_ids(example["answer"])
            self._check_no_markers(where, question, answer, markers)
            has_images = bool(example.get("images")) or self.image_for_text_only is not None
            self._check_not_empty(where, has_images or has_template or bool(question),
                                  bool(answer) or has_eos)

    def __call__(self, examples: Sequence[dict]) -> dict[str, Tensor]:
        """The batch of ``examples``: ``prompt_ids``/``prompt_mask`` (B, Lx) left-padded,
        ``answer_ids``/``answer_mask`` (B, Ly) right-padded with EOS, and for examples with
        images ``pixel_values`` and ``image_grid_thw`` in the images' order."""
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        prompts, answers, images, grids = [], [], [], []
        merge = getattr(self.image_processor, "merge_size", 2)
        markers = self._marker_ids()  # once a batch: len(tokenizer) alone takes ~0.1 ms
        for index, example in enumerate(examples):
            where = _example_name(index, example)
            self._check(where, example)
            patches: list[int] = []  # image tokens per image
            for image in example.get("images") or self._images_for_text_only():
                processed = self._text_only_image if image is _TEXT_ONLY \
                    else self._process_image(image)
                grid = processed["image_grid_thw"][0]
                patches.append(int(grid.prod()) // merge**2)
                images.append(processed["pixel_values"])
                grids.append(grid)
            lead: list[int] = []  # BOS, which is no content of the prompt's
            if self.chat_template:
                head, question, after, straddles = self._split_prompt(len(patches),
                                                                      example["question"])
                if straddles and self.max_prompt_tokens is not None and \
                        len(self._expanded(head, patches)) + len(question) + len(after) \
                        > self.max_prompt_tokens:
                    # cut from the left, the token the question shares with the template (BPE's
                    # "\n\n" across the user header) would take the template's text with it:
                    # the template's own tokens, and the question's after that token
                    head, question = self._template_parts(len(patches))[0], question[1:]
                prompt = self._expanded(head, patches)
            else:
                vt = self.vision_tokens
                prompt = [t for n in patches for t in (vt.start, *[vt.image] * n, vt.end)]
                question, after = self._text_ids(example["question"]), []
                lead = [self.tokenizer.bos_token_id] if self._add_bos else []
            if self.max_prompt_tokens is not None:
                question = self._truncated(where, question, len(lead + prompt) + len(after))
            self._check_no_markers(where, question, [], markers)
            answer = self._answer(where, example, markers)
            self._check_not_empty(where, bool(prompt + question + after), bool(answer))
            prompts.append(lead + prompt + question + after)
            answers.append(answer)
        batch = {}
        batch["prompt_ids"], batch["prompt_mask"] = self._pad(prompts, left=True)
        batch["answer_ids"], batch["answer_mask"] = self._pad(answers, left=False)
        if images:
            batch["pixel_values"] = torch.cat(images)
            batch["image_grid_thw"] = torch.stack(grids)
        return batch

    def answers(self, examples: Sequence[dict]) -> dict[str, Tensor]:
        """``answer_ids`` and ``answer_mask`` of the batch of ``examples``, exactly as
        :meth:`__call__` builds them, without building the prompts or processing any image:
        scoring other answers to prompts already built (a benchmark's choices)."""
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        markers = self._marker_ids()
        answers = []
        for index, example in enumerate(examples):
            where = _example_name(index, example)
            self._check(where, example)
            answer = self._answer(where, example, markers)
            self._check_not_empty(where, True, bool(answer))
            answers.append(answer)
        answer_ids, answer_mask = self._pad(answers, left=False)
        return {"answer_ids": answer_ids, "answer_mask": answer_mask}

    def _answer(self, where: str, example: dict, markers: dict[int, str]) -> list[int]:
        """An example's answer ids: its text's tokens (refused if they spell a structural
        token), cut to ``max_answer_tokens`` (warned), then the EOS."""
        answer = self._text_ids(example["answer"])
        self._check_no_markers(where, [], answer, markers)
        if self.max_answer_tokens is not None and len(answer) > self.max_answer_tokens:
            warnings.warn(f"{where}: the answer lost its last "
                          f"{len(answer) - self.max_answer_tokens} of {len(answer)} tokens "
                          f"to max_answer_tokens={self.max_answer_tokens} (the model then "
                          f"learns to stop there)", stacklevel=3)
            answer = answer[: self.max_answer_tokens]
        if self.tokenizer.eos_token_id is not None:
            answer = answer + [self.tokenizer.eos_token_id]
        return answer

    def _expanded(self, ids: list[int], patches: list[int]) -> list[int]:
        """``ids`` with its k-th image token repeated ``patches[k]`` times."""
        if not patches:
            return ids
        image, counts = self.vision_tokens.image, iter(patches)
        return [t for token in ids for t in ([token] * next(counts) if token == image
                                              else [token])]

    def _check_no_markers(self, where: str, question: list[int], answer: list[int],
                          markers: dict[int, str]) -> None:
        """Refuse text that spells a structural token (a latent or image marker): the tokenizer
        turns it into the token itself, which would open a latent block or announce an image
        inside the text."""
        for name, ids in (("question", question), ("answer", answer)):
            found = sorted({markers[i] for i in ids if i in markers})
            if found:
                raise ValueError(f"{where}: the {name} spells the structural token(s) "
                                 f"{found}, which the tokenizer reads as the tokens themselves")

    def _marker_ids(self) -> dict[int, str]:
        """Structural token ids -> their strings, rebuilt when the vocabulary grows (the latent
        tokens are added when AMVLModel is built, maybe after the collator)."""
        size = len(self.tokenizer)
        if self._markers is None or self._markers[0] != size:
            markers = {}
            for token in self.special_tokens:
                ids = self.tokenizer(token, add_special_tokens=False)["input_ids"]
                if len(ids) == 1 and ids[0] != self.tokenizer.unk_token_id:  # one token: added
                    markers[ids[0]] = token
            vt = self.vision_tokens
            if vt is not None:
                markers.update({i: self.tokenizer.convert_ids_to_tokens(i)
                                for i in (vt.image, vt.start, vt.end)})
            if self.chat_template:  # the template's own tokens: text must not end a turn
                added = self.tokenizer.added_tokens_decoder
                markers.update({i: added[i].content for i in sum(self._template_parts(0), [])
                                if i in added})
            self._markers = (size, markers)
        return self._markers[1]

    def _truncated(self, where: str, question: list[int], fixed_tokens: int) -> list[int]:
        """The question's last tokens that fit beside ``fixed_tokens`` (the images' and the
        chat template's) in max_prompt_tokens."""
        room = self.max_prompt_tokens - fixed_tokens
        if room < 0 or (room == 0 and question):
            what = "its images and the chat template" if self.chat_template else "its images"
            raise ValueError(f"{where}: {what} take {fixed_tokens} tokens, "
                             f"max_prompt_tokens is {self.max_prompt_tokens}, so no room is left "
                             "for the question; raise max_prompt_tokens or give the image "
                             "processor a smaller max_pixels")
        if len(question) > room:
            warnings.warn(f"{where}: the question lost its first "
                          f"{len(question) - room} of {len(question)} tokens to "
                          f"max_prompt_tokens={self.max_prompt_tokens}", stacklevel=3)
            return question[len(question) - room:]
        return question

    def _pad(self, rows: list[list[int]], left: bool) -> tuple[Tensor, Tensor]:
        width = max(1, max(len(r) for r in rows))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, row in enumerate(rows):
            if not row:
                continue
            cols = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, cols] = torch.tensor(row, dtype=torch.long)
            mask[i, cols] = True
        return ids, mask
