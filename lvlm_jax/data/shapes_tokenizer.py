"""A word-level Hugging Face tokenizer for the shapes-world language, built offline.

Every word the shapes world writes is one token, so a tiny LVLM learns the world with a vocabulary of a
few hundred words (and 1,110 digit groups). A word keeps its leading space, SentencePiece style ('▁red' vs 'red'), punctuation is
one token per character, and a run of digits is read three at a time, each group one token
('123', '4', '007'), so a box coordinate of the 0..999 grid is one token: the box text
'<box>(123,456),(789,999)</box>' is 13 tokens, not 21, and a tiny model places a coordinate with
one choice instead of three digit by digit. decode(encode(text)) gives the text back exactly up to
lower case. The vocabulary is sorted, so ids are the same on every run and host.
"""

import re
import string
from typing import Iterable

import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from lvlm_jax.data import shapes

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
BOX_START, BOX_END = "<box>", "</box>"
REF_START, REF_END = "<ref>", "</ref>"
SYSTEM_PROMPT = "A chat between a user and an assistant."
_SPACE = "▁"  # stands for the space before a word, as in SentencePiece
# Every digit string of 1..3 digits (leading zeros too, so any digit run round-trips).
_NUMBERS = [f"{n:0{width}d}" for width in (1, 2, 3) for n in range(10 ** width)]

# Vicuna v1: '<s>{system} USER: {user} ASSISTANT: {assistant}</s>USER: ...'. A leading system
# message replaces SYSTEM_PROMPT.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] }} {% set turns = messages[1:] %}"
    "{% else %}" + SYSTEM_PROMPT + " {% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}USER: {{ message['content'] }} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('roles must be user or assistant after an optional system message') }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def shapes_tokenizer(extra_texts: Iterable[str] = ()) -> transformers.PreTrainedTokenizerFast:
  """The tokenizer; ids 0..8 are <pad>, <s>, </s>, <unk>, <image>, <box>, </box>, <ref>, </ref>.

  extra_texts: more text (e.g. a method's prompt list) whose words join the vocabulary.
  encode() adds <s> in front, as LLaMA's tokenizer does; the chat template writes its own <s>.
  """
  words = set(shapes.vocabulary())
  for text in (SYSTEM_PROMPT, "user assistant", *extra_texts):
    words.update(re.findall(r"[a-z]+", text.lower()))
  pieces = {*words, *(_SPACE + w for w in words), *string.punctuation, *_NUMBERS, _SPACE, "\n"}
  specials = [PAD, BOS, EOS, UNK, IMAGE, BOX_START, BOX_END, REF_START, REF_END]
  vocab = {token: i for i, token in enumerate(specials + sorted(pieces))}

  tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      # Whitespace other than ' ' (newlines) is a token of its own; ' ' becomes the '▁' of a word.
      pre_tokenizers.Split(Regex(r"[^\S ]"), behavior="isolated"),
      pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="never"),
      pre_tokenizers.Punctuation(behavior="isolated"),
      pre_tokenizers.Split(Regex(r"\d{1,3}"), behavior="isolated"),
  ])
  tok.decoder = decoders.Metaspace(replacement=_SPACE, prepend_scheme="never")
  tok.post_processor = processors.TemplateProcessing(
      single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])])
  # Added tokens are matched before normalisation, so they are never lower-cased or split.
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (PAD, BOS, EOS, UNK, IMAGE)])
  # Box and reference markup (Qwen-VL's) is ordinary text that decode must keep, so it is not
  # "special".
  tok.add_tokens([AddedToken(t, special=False, normalized=False)
                  for t in (BOX_START, BOX_END, REF_START, REF_END)])

  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
      extra_special_tokens={"image_token": IMAGE}, chat_template=CHAT_TEMPLATE,
      clean_up_tokenization_spaces=False)


CLIP_EOS = "<|endoftext|>"


def shapes_clip_tokenizer(extra_texts: Iterable[str] = ()) -> transformers.PreTrainedTokenizerFast:
  """The shapes tokenizer for a CLIP text tower: '<s> text <|endoftext|>', the end token last in
  the vocabulary. CLIP pools at its eos_token_id, and an HF CLIP whose eos_token_id is 2 (the
  shapes '</s>') pools at argmax(ids) instead (checkpoints older than transformers PR #24773)."""
  base = shapes_tokenizer(extra_texts)
  tok = Tokenizer.from_str(base.backend_tokenizer.to_str())
  tok.add_special_tokens([AddedToken(CLIP_EOS, special=True, normalized=False)])
  tok.post_processor = processors.TemplateProcessing(
      single=f"{BOS} $A {CLIP_EOS}", special_tokens=[(BOS, base.bos_token_id),
                                                      (CLIP_EOS, tok.token_to_id(CLIP_EOS))])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=CLIP_EOS, unk_token=UNK,
      clean_up_tokenization_spaces=False)
