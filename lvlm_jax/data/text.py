"""Conversations to tokens: chat templates, assistant-only loss masks, image-token expansion, box text.

A conversation is a list of turns `{"from": "human" | "gpt" | "system", "value": str}` (LLaVA's
layout; `{"role", "content"}` turns work too) with `<image>` placeholders in the text. Rendering
gives the prompt string and the character spans the loss is on; tokenizing with offsets maps those
spans to tokens, so the mask is right for any fast tokenizer, whatever its merges do at the seams.

LLaVA's own templates (vicuna_v1, plain) are tokenized as LLaVA's `tokenizer_image_token` does:
each piece between images on its own, so a SentencePiece tokenizer starts every piece with its
space piece as in LLaVA (with `legacy=False` a piece that follows a special token in one long
text would lose it). The other templates are tokenized as `apply_chat_template` does: the whole
text at once, its special tokens written in it.
"""

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence

import numpy as np

from lvlm_jax.errors import UserError

TEMPLATES = ("vicuna_v1", "plain", "llama3", "chatml", "mistral", "tokenizer")

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
CHATML_SYSTEM = "You are a helpful assistant."

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "system": "system"}


class BadConversation(UserError):
  """A conversation that no template can render as it is (the pipeline skips and counts it)."""


def to_messages(turns: Sequence[Mapping]) -> list[dict[str, str]]:
  """LLaVA turns (`from`/`value`) or chat messages (`role`/`content`) -> `{"role", "content"}`."""
  messages = []
  for i, turn in enumerate(turns):
    role = turn.get("from", turn.get("role"))
    content = turn.get("value", turn.get("content"))
    if role not in _ROLES or not isinstance(content, str):
      raise BadConversation(f"turn {i} is not a chat turn (role {role!r}, text "
                            f"{type(content).__name__}); expected roles {sorted(_ROLES)} and "
                            "string text")
    messages.append({"role": _ROLES[role], "content": content})
  return messages


def conversation_messages(turns: Sequence[Mapping],
                          inner_system: bool = False) -> list[dict[str, str]]:
  """The messages a template renders. Assistant turns before the first question are dropped, as
  LLaVA's `preprocess` drops a leading gpt turn (an answer to no question). Without
  `inner_system`, a system turn anywhere but first raises `BadConversation`: LLaVA's formats have
  no place for one, and rendered as a turn it would be trained as an answer."""
  messages = to_messages(turns)
  head = messages[:1] if messages and messages[0]["role"] == "system" else []
  rest = messages[len(head):]
  while rest and rest[0]["role"] == "assistant":
    rest = rest[1:]
  for i, m in enumerate(rest):
    if m["role"] == "system" and not inner_system:
      raise BadConversation(f"turn {len(messages) - len(rest) + i} is a system turn inside the "
                            "conversation; only the first turn may be 'system'")
  return head + rest


def ensure_image_placeholders(turns: Sequence[Mapping], num_images: int,
                              image_token: str = "<image>") -> list[dict]:
  """LLaVA's rule: with images but no placeholder, one `<image>\\n` per image starts the first
  user turn. Raises `UserError` when the placeholders present do not match the images."""
  turns = [dict(t) for t in turns]
  key = lambda t: "value" if "value" in t else "content"
  found = sum(str(t.get(key(t), "")).count(image_token) for t in turns)
  if found == 0 and num_images:
    for t in turns:
      if _ROLES.get(t.get("from", t.get("role"))) == "user":
        t[key(t)] = (image_token + "\n") * num_images + t[key(t)]
        return turns
    raise UserError(f"{num_images} image(s) but no user turn to put the {image_token} in")
  if found != num_images:
    raise UserError(f"the text has {found} {image_token} placeholder(s) but the record has "
                    f"{num_images} image(s)")
  return turns


@dataclasses.dataclass(frozen=True)
class Rendered:
  """A conversation as prompt text, with the character spans `[start, end)` the loss is on."""

  text: str
  targets: tuple[tuple[int, int], ...]
  # Tokenize as LLaVA's tokenizer_image_token: the pieces between image placeholders one by one,
  # a leading BOS in the text standing for the one the tokenizer adds.
  by_image: bool = False


class _Builder:

  def __init__(self):
    self.parts, self.targets, self.length = [], [], 0

  def add(self, text: str, target: bool = False):
    if target:
      self.targets.append((self.length, self.length + len(text)))
    self.parts.append(text)
    self.length += len(text)

  def build(self, by_image: bool = False) -> Rendered:
    return Rendered("".join(self.parts), tuple(self.targets), by_image)


def _split_system(messages, system, default):
  """The system prompt in force (a leading system turn wins) and the remaining turns."""
  if messages and messages[0]["role"] == "system":
    return messages[0]["content"], messages[1:]
  return (default if system is None else system), messages


def _vicuna_v1(messages, system, tokenizer, add_generation_prompt):
  # LLaVA's conv_vicuna_v1 (SeparatorStyle.TWO): system + " ", "USER: q ", "ASSISTANT: a</s>".
  # The target starts at the space after "ASSISTANT:", as preprocess_v1's masks do: a space
  # piece of its own (before a digit, in SentencePiece) is trained.
  system, messages = _split_system(messages, system, VICUNA_SYSTEM)
  b = _Builder()
  b.add((tokenizer.bos_token or "") + system + " ")
  for m in messages:
    if m["role"] == "user":
      b.add("USER: " + m["content"] + " ")
    else:
      b.add("ASSISTANT:")
      b.add(" " + m["content"] + tokenizer.eos_token, target=True)
  if add_generation_prompt:
    b.add("ASSISTANT:")
  return b.build(by_image=True)


def _plain(messages, system, tokenizer, add_generation_prompt, image_token="<image>"):
  # LLaVA's pretraining format (preprocess_plain, conv_llava_plain): the question is replaced by
  # its image(s), then the answer and "\n"; no system prompt, roles or end token.
  del system
  _, messages = _split_system(messages, None, "")
  roles = [m["role"] for m in messages]
  if roles != ["user", "assistant"] and not (add_generation_prompt and roles == ["user"]):
    raise BadConversation(f"the plain template takes one question and its answer, got turns {roles}")
  images = messages[0]["content"].count(image_token)
  if not images:
    raise BadConversation(f"the plain template needs an {image_token} in the question")
  b = _Builder()
  b.add((tokenizer.bos_token or "") + image_token * images)
  if len(messages) == 2:
    b.add(messages[1]["content"] + "\n", target=True)
  return b.build(by_image=True)


def _llama3(messages, system, tokenizer, add_generation_prompt):
  system, messages = _split_system(messages, system, "")
  header = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"
  b = _Builder()
  b.add(tokenizer.bos_token or "")
  if system:
    b.add(header("system") + system.strip() + "<|eot_id|>")
  for m in messages:
    b.add(header(m["role"]))
    b.add(m["content"].strip() + "<|eot_id|>", target=m["role"] == "assistant")
  if add_generation_prompt:
    b.add(header("assistant"))
  return b.build()


def _chatml(messages, system, tokenizer, add_generation_prompt):
  del tokenizer
  system, messages = _split_system(messages, system, CHATML_SYSTEM)
  b = _Builder()
  if system:
    b.add(f"<|im_start|>system\n{system}<|im_end|>\n")
  for m in messages:
    b.add(f"<|im_start|>{m['role']}\n")
    b.add(m["content"] + "<|im_end|>", target=m["role"] == "assistant")
    b.add("\n")
  if add_generation_prompt:
    b.add("<|im_start|>assistant\n")
  return b.build()


def _mistral(messages, system, tokenizer, add_generation_prompt):
  # Mistral-7B-Instruct's template; a system prompt joins the first user turn (as v0.3 does).
  del add_generation_prompt  # "[INST] q [/INST]" already ends where the answer starts
  system, messages = _split_system(messages, system, "")
  b = _Builder()
  b.add(tokenizer.bos_token or "")
  for i, m in enumerate(messages):
    if m["role"] == "user":
      text = system + "\n\n" + m["content"] if system and i == 0 else m["content"]
      b.add("[INST] " + text + " [/INST]")
    else:
      b.add(m["content"] + tokenizer.eos_token, target=True)
  return b.build()


_PROBE = "lvlm_jax probe text"


def _content_parts(message, image_token="<image>"):
  """A message as content parts, for templates (llava-hf's) that read `{"type": "image"}` and
  `{"type": "text"}` items instead of a string: one image item per placeholder, then the text
  without the placeholders (and the newline after each), which such templates render themselves."""
  content = message["content"]
  images = content.count(image_token)
  words = content.replace(image_token + "\n", "").replace(image_token, "")
  return {"role": message["role"],
          "content": [{"type": "image"}] * images + [{"type": "text", "text": words}]}


def _own_template(messages, system, tokenizer, add_generation_prompt):
  # The tokenizer's Jinja template: an assistant turn's span is what rendering it adds after the
  # generation prompt of the conversation so far, less trailing whitespace between turns.
  if system and not (messages and messages[0]["role"] == "system"):
    messages = [{"role": "system", "content": system}] + messages
  render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False,
                                                           add_generation_prompt=gen)
  if _PROBE not in render([{"role": "user", "content": _PROBE}], False):
    messages = [_content_parts(m) for m in messages]
  text = render(messages, add_generation_prompt)
  targets = []
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    before, through = render(messages[:i], True), render(messages[:i + 1], False)
    if not (through.startswith(before) and text.startswith(through)):
      raise UserError("the tokenizer's chat template renders a conversation differently from its "
                      "prefixes, so assistant turns cannot be found; pick a built-in template")
    targets.append((len(before), len(through.rstrip())))
  return Rendered(text, tuple(targets))


_RENDERERS = {"vicuna_v1": _vicuna_v1, "plain": _plain, "llama3": _llama3, "chatml": _chatml,
              "mistral": _mistral, "tokenizer": _own_template}
# Built-in templates that cannot show a system turn inside a conversation (chatml and llama3
# render it as a system message; the tokenizer's own template decides for itself).
_NO_INNER_SYSTEM = ("vicuna_v1", "plain", "mistral")


# Jinja twins of the built-in templates, for exported tokenizers: `{system}` is the system prompt
# in force (a leading system message replaces it). They render what `render` renders.
_SPLIT_SYSTEM = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = {system} %}{% set turns = messages %}{% endif %}")
_NO_SYSTEM_INSIDE = ("{% if message['role'] == 'system' %}{{ raise_exception('only the first "
                     "message may be a system message') }}{% endif %}")
_JINJA = {
    "vicuna_v1": (
        "{{ bos_token or '' }}" + _SPLIT_SYSTEM + "{{ system + ' ' }}"
        "{% for message in turns %}" + _NO_SYSTEM_INSIDE +
        "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"),
    "plain": (
        "{{ bos_token or '' }}{% for message in messages %}" + _NO_SYSTEM_INSIDE +
        "{% if message['role'] == 'user' %}{{ '<image>' * message['content'].count('<image>') }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + '\n' }}{% endif %}"
        "{% endfor %}"),
    "llama3": (
        "{{ bos_token or '' }}" + _SPLIT_SYSTEM +
        "{% if system %}{{ '<|start_header_id|>system<|end_header_id|>\n\n' + system | trim"
        " + '<|eot_id|>' }}{% endif %}"
        "{% for message in turns %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "chatml": (
        _SPLIT_SYSTEM +
        "{% if system %}{{ '<|im_start|>system\n' + system + '<|im_end|>\n' }}{% endif %}"
        "{% for message in turns %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "mistral": (
        "{{ bos_token or '' }}" + _SPLIT_SYSTEM +
        "{% for message in turns %}" + _NO_SYSTEM_INSIDE +
        "{% if message['role'] == 'user' %}{{ '[INST] ' }}"
        "{% if system and loop.first %}{{ system + '\n\n' }}{% endif %}"
        "{{ message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"),
}
_DEFAULT_SYSTEM = {"vicuna_v1": VICUNA_SYSTEM, "chatml": CHATML_SYSTEM, "llama3": "", "mistral": "",
                   "plain": ""}


def chat_template(template: str, system: str | None = None) -> str | None:
  """A Jinja chat template that renders as `render(..., template, system=system)` does, for the
  tokenizer of an exported model; None for "tokenizer" (the tokenizer's own template stays)."""
  if template == "tokenizer":
    return None
  if template not in _JINJA:
    raise UserError(f"unknown chat template {template!r}; choose one of {TEMPLATES}")
  system = _DEFAULT_SYSTEM[template] if system is None else system
  return _JINJA[template].replace("{system}", json.dumps(system, ensure_ascii=False))


def render(turns: Sequence[Mapping], tokenizer, template: str = "vicuna_v1", *,
           system: str | None = None, add_generation_prompt: bool = False) -> Rendered:
  """Renders a conversation with `template` (one of `TEMPLATES`).

  `system`: None keeps the template's default system prompt, "" drops it (built-in templates); a
  leading system turn overrides both. `add_generation_prompt` ends the text where the next assistant answer starts.
  Assistant turns, with their end-of-turn token, are the loss targets. Assistant turns before the
  first question are dropped (LLaVA's rule); a system turn after the first is rendered as a system
  message by chatml, llama3 and the tokenizer's template, and refused (`BadConversation`) by
  vicuna_v1, plain and mistral, which have no place for it.
  """
  if template not in _RENDERERS:
    raise UserError(f"unknown chat template {template!r}; choose one of {TEMPLATES}")
  if template == "tokenizer" and not getattr(tokenizer, "chat_template", None):
    raise UserError("template='tokenizer' but the tokenizer has no chat template")
  messages = conversation_messages(turns, inner_system=template not in _NO_INNER_SYSTEM)
  return _RENDERERS[template](messages, system, tokenizer, add_generation_prompt)


def _backend(tokenizer):
  # The Rust tokenizer itself: encoding through it never mutates shared state, so the pipeline's
  # reader threads can share one tokenizer.
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is None:
    raise UserError(f"a fast tokenizer is needed (PreTrainedTokenizerFast), got {type(tokenizer).__name__}")
  if backend.truncation is not None or backend.padding is not None:
    raise UserError("the tokenizer truncates or pads on its own; call no_truncation() and "
                    "no_padding() on tokenizer.backend_tokenizer")
  return backend


def image_token_id(tokenizer, image_token: str = "<image>") -> int:
  """The id of `image_token`, which the tokenizer must hold as one (added) token."""
  ids = _backend(tokenizer).encode(image_token, add_special_tokens=False).ids
  if len(ids) != 1:
    raise UserError(f"the tokenizer splits {image_token!r} into {len(ids)} tokens; add it with "
                    f"tokenizer.add_special_tokens({{'additional_special_tokens': ['{image_token}']}})")
  return ids[0]


def tokenize(rendered: Rendered, tokenizer, *, image_token: str = "<image>",
             tokens_per_image: int | Sequence[int] = 1) -> tuple[np.ndarray, np.ndarray]:
  """Rendered text -> (`input_ids int32 [L]`, `loss_mask int32 [L]`), each image token expanded
  to `tokens_per_image` copies (a sequence: the count of each image in order, for LLaVA-NeXT,
  whose counts follow the image sizes). A token is a target when it overlaps a target span (a token of
  no width, when it sits inside one). The tokenizer must hold `image_token` only when the text
  contains it (text-only tokenizers need not)."""
  if rendered.by_image:
    ids, offsets = _encode_by_image(rendered.text, tokenizer, image_token)
  else:
    encoding = _backend(tokenizer).encode(rendered.text, add_special_tokens=False)
    ids, offsets = encoding.ids, encoding.offsets
  ids = np.asarray(ids, np.int32)
  offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
  mask = np.zeros(len(ids), bool)
  empty = offsets[:, 0] == offsets[:, 1]  # e.g. a space piece the pre-tokenizer put in front
  for start, end in rendered.targets:
    mask |= (offsets[:, 0] < end) & ((offsets[:, 1] > start) | (empty & (offsets[:, 0] >= start)))
  is_image = np.zeros(len(ids), bool)
  if image_token in rendered.text:
    is_image = ids == image_token_id(tokenizer, image_token)
    if is_image.sum() != rendered.text.count(image_token):
      raise UserError(f"the tokenizer does not encode every {image_token!r} in the text as one "
                      "token")
  repeats = np.ones(len(ids), np.int64)
  if np.ndim(tokens_per_image) and len(tokens_per_image) != is_image.sum():
    raise ValueError(f"{len(tokens_per_image)} image token counts for {is_image.sum()} images")
  repeats[is_image] = tokens_per_image
  mask &= ~is_image
  return np.repeat(ids, repeats), np.repeat(mask, repeats).astype(np.int32)


def _encode_by_image(text: str, tokenizer, image_token: str) -> tuple[list[int], list[tuple]]:
  """LLaVA's `tokenizer_image_token`: (ids, character offsets) of the pieces between image
  placeholders, each tokenized on its own, joined by the image token; a leading BOS in the text
  is the one LLaVA's tokenizer call adds in front."""
  backend = _backend(tokenizer)
  ids, offsets, start = [], [], 0
  bos = tokenizer.bos_token
  if bos and text.startswith(bos):
    ids.append(tokenizer.bos_token_id)
    offsets.append((0, len(bos)))
    start = len(bos)
  pieces = text[start:].split(image_token)
  for i, piece in enumerate(pieces):
    if i:
      ids.append(image_token_id(tokenizer, image_token))
      offsets.append((start - len(image_token), start))
    encoding = backend.encode(piece, add_special_tokens=False)
    ids += encoding.ids
    offsets += [(a + start, b + start) for a, b in encoding.offsets]
    start += len(piece) + len(image_token)
  return ids, offsets


def tokenize_conversation(turns: Sequence[Mapping], tokenizer, template: str = "vicuna_v1", *,
                          system: str | None = None, add_generation_prompt: bool = False,
                          image_token: str = "<image>",
                          tokens_per_image: int | Sequence[int] = 1
                          ) -> tuple[np.ndarray, np.ndarray]:
  """`render` then `tokenize`: (`input_ids int32 [L]`, `loss_mask int32 [L]`)."""
  rendered = render(turns, tokenizer, template, system=system,
                    add_generation_prompt=add_generation_prompt)
  return tokenize(rendered, tokenizer, image_token=image_token, tokens_per_image=tokens_per_image)


def fit_to_length(input_ids: np.ndarray, loss_mask: np.ndarray, max_length: int, image_id: int,
                  require_target: bool = True) -> tuple[np.ndarray, np.ndarray] | str:
  """`[L]` arrays cut to `max_length` when only untrained text falls past it, or the reason the
  example is dropped instead of mangled: "answer_too_long" when the cut would fall in a target
  (an answer trained without its end, so the model learns not to stop), "too_long" when it would
  fall in image tokens or (with `require_target`) no target is left."""
  if len(input_ids) > max_length:
    if np.any(input_ids[max_length:] == image_id):
      return "too_long"
    if np.any(loss_mask[max_length:]):
      return "answer_too_long"
    input_ids, loss_mask = input_ids[:max_length], loss_mask[:max_length]
  if require_target and not loss_mask.any():
    return "too_long"
  return input_ids, loss_mask


# How BoxFormat writes a box: on an integer grid, or as JSON in absolute pixels.
BOX_STYLES = ("grid", "pixels_json")
_NUMBER = r"\s*(\d{1,9}(?:\.\d{1,9})?)\s*"


@dataclasses.dataclass(frozen=True)
class BoxFormat:
  """Boxes as text, between `open` and `close`.

  style "grid": `<box>(x1,y1),(x2,y2)</box>` on an integer grid 0..grid-1 (Qwen-VL/SC-Tune); a
  normalised coordinate v becomes `int(v * (grid - 1))`, SC-Tune's `bbox_format`. Qwen2-VL's
  `<|box_start|>(x1,y1),(x2,y2)<|box_end|>` on 0..1000 is QWEN2_VL_BOXES.
  style "pixels_json": Qwen2.5-VL's `{"bbox_2d": [x1, y1, x2, y2]}` in absolute pixels of the
  image as the model sees it (after its resize), so writing and reading take that
  `image_size` (height, width); v becomes round(v * width) (or height). QWEN25_VL_BOXES.
  """

  grid: int = 1000
  open: str = "<box>"
  close: str = "</box>"
  style: str = "grid"

  def __post_init__(self):
    if self.style not in BOX_STYLES:
      raise UserError(f"box_format.style {self.style!r} is not one of {', '.join(BOX_STYLES)}")
    if self.style == "grid" and self.grid < 2:
      raise UserError(f"box_format.grid must be at least 2, got {self.grid}")

  def _scale(self, image_size: Sequence[int] | None) -> np.ndarray:
    """What a normalised 1.0 becomes on each of x1, y1, x2, y2."""
    if self.style == "grid":
      return np.full(4, self.grid - 1, np.float64)
    if image_size is None:
      raise ValueError("pixels_json boxes need the image_size (height, width) the model sees")
    height, width = image_size
    return np.asarray([width, height, width, height], np.float64)

  def to_text(self, box: Sequence[float], image_size: Sequence[int] | None = None) -> str:
    """Normalised `[x1, y1, x2, y2]` -> box text; image_size: (height, width), pixels_json only."""
    if self.style == "grid":
      x1, y1, x2, y2 = (int(np.clip(v, 0, 1) * (self.grid - 1)) for v in box)
      return f"{self.open}({x1},{y1}),({x2},{y2}){self.close}"
    scaled = np.clip(np.asarray(box, np.float64), 0, 1) * self._scale(image_size)
    return f"{self.open}{json.dumps({'bbox_2d': [int(round(v)) for v in scaled]})}{self.close}"

  @property
  def _pattern(self) -> re.Pattern:
    if self.style == "grid":
      number = r"\s*(\d{1,9})\s*"
      return re.compile(re.escape(self.open) + rf"\({number},{number}\)\s*,\s*\({number},{number}\)"
                        + re.escape(self.close))
    # After `open`, the first bbox_2d: an answer may wrap it in a list, a label, a code block.
    after_open = re.escape(self.open) + r"[\s\S]*?" if self.open else ""
    return re.compile(after_open + r"\"bbox_2d\"\s*:\s*\[" + ",".join([_NUMBER] * 4) + r"\]")

  def parse(self, text, image_size: Sequence[int] | None = None) -> np.ndarray | None:
    """The first box in `text` as normalised `float32 [4]`; None for anything else (a coordinate
    off the grid or the image). Never raises, but for a pixels_json format without image_size."""
    scale = self._scale(image_size)
    if not isinstance(text, str):
      return None
    match = self._pattern.search(text)
    if match is None:
      return None
    coords = np.asarray([float(g) for g in match.groups()], np.float64)
    if np.any(coords > scale):
      return None
    return (coords / scale).astype(np.float32)


# Qwen2-VL's grounding boxes: 0..1000 (normalised to [0, 1000), with 1000 for the far edge).
QWEN2_VL_BOXES = BoxFormat(grid=1001, open="<|box_start|>", close="<|box_end|>")
# Qwen2.5-VL's: JSON in absolute pixels, wherever the answer puts it (in a list, a code block).
QWEN25_VL_BOXES = BoxFormat(open="", close="", style="pixels_json")


def box_iou(a: np.ndarray, b: np.ndarray, eps: float = 1e-7) -> np.ndarray:
  """IoU of `[..., 4]` boxes (x1, y1, x2, y2) -> `float32 [...]`; inverted boxes have no area."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  area = lambda x: (np.clip(x[..., 2] - x[..., 0], 0, None) * np.clip(x[..., 3] - x[..., 1], 0, None))
  w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
  h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
  inter = w * h
  return (inter / (area(a) + area(b) - inter + eps)).astype(np.float32)
