"""Text in and out of the TEE: the model directory's tokenizer, prompts (with the BOS the
tokenizer adds, a chat template when asked), and decoded text as tokens stream in.

Plain `tokenizers` (no transformers import) keeps the TEE side light; chat templates are Jinja,
rendered in a sandbox as transformers renders them.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch

from .errors import InputError, ModelError


def load_tokenizer(model_dir: str | Path) -> tokenizers.Tokenizer | None:
    """The directory's tokenizer.json as a plain `tokenizers.Tokenizer` (no transformers
    import, so the TEE side stays light), or None when the model ships no tokenizer."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises plain Exception on a corrupt file
        raise ModelError(f"cannot read {path}: {exc}") from exc


@dataclass(frozen=True)
class Prompt:
    """A text's token ids, [batch, n], and how they came from it: what the user is told."""

    ids: torch.LongTensor
    tokenized: int  # tokens as the tokenizer gave them, the special tokens it added included
    text_tokens: int  # of those, the text's own
    added: tuple[str, ...]  # special tokens the tokenizer put in front (BOS); kept first when fitting

    @property
    def tokens(self) -> int:
        return self.ids.shape[1]

    def describe(self) -> str:
        """One line: how many tokens the text gave, whether a BOS was added, and any fitting."""
        if not self.added:
            added = "no BOS: the tokenizer adds no special token in front"
        else:
            added = f"the tokenizer added {'BOS ' if len(self.added) == 1 else ''}{' '.join(self.added)} in front"
        line = f"Prompt: {self.tokenized} tokens as tokenized ({added})"
        if self.tokens > self.tokenized:
            after = f" after {' '.join(self.added)}" if self.added else ""
            return f"{line}; fitted to {self.tokens} by repeating its {self.text_tokens} text tokens{after}"
        if self.tokens < self.tokenized:
            return f"{line}; fitted to {self.tokens} by keeping its first {self.tokens}"
        return line


def encode_prompt(tokenizer, text: str, n_tokens: int | None = None, batch: int = 1,
                  special_tokens: bool = True) -> Prompt:
    """Encode `text` with the tokenizer's own special tokens (BOS); with `n_tokens`, fit it to
    exactly that many ids per row: its text tokens repeated cyclically after the leading special
    tokens, or cut. Benchmarks want a fixed length whatever the text; a user's prompt runs as
    tokenized. Accepts a `tokenizers.Tokenizer` or a transformers fast tokenizer."""
    if (n_tokens is not None and n_tokens < 1) or batch < 1:
        raise InputError(f"need n_tokens >= 1 and batch >= 1, got {n_tokens} and {batch}")
    tok = getattr(tokenizer, "backend_tokenizer", tokenizer)
    enc = tok.encode(text, add_special_tokens=special_tokens)  # False: a chat template placed them
    prefix = [i for i, _ in itertools.takewhile(lambda p: p[1] == 1, zip(enc.ids, enc.special_tokens_mask))]
    body = [i for i, special in zip(enc.ids, enc.special_tokens_mask) if not special]
    if not body:
        raise InputError(f"the prompt {text!r} encodes to no tokens")
    if n_tokens is None:
        ids = list(enc.ids)
    else:
        ids = (prefix + list(itertools.islice(itertools.cycle(body), n_tokens)))[:n_tokens]
    row = torch.tensor(ids, dtype=torch.long)
    return Prompt(row.unsqueeze(0).repeat(batch, 1), len(enc.ids), len(body), tuple(tok.id_to_token(i) for i in prefix))


def fit_prompt(tokenizer, text: str, n_tokens: int, batch: int) -> torch.LongTensor:
    """`text` fitted to exactly `n_tokens` ids per row, shape [batch, n_tokens] (encode_prompt)."""
    return encode_prompt(tokenizer, text, n_tokens, batch).ids


def chat_text(model_dir: str | Path, message: str) -> str:
    """`message` as one user turn of the tokenizer's chat template, ready for the assistant's
    reply (tokenizer_config.json's `chat_template`, or chat_template.jinja beside it)."""
    model_dir = Path(model_dir)
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        config = {}
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not template and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text()
    if not isinstance(template, str) or not template:
        raise InputError(f"--chat: the tokenizer in {model_dir} has no chat template")
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    try:
        return environment.from_string(template).render(
            messages=[{"role": "user", "content": message}], add_generation_prompt=True,
            bos_token=_token_text(config.get("bos_token")), eos_token=_token_text(config.get("eos_token")))
    except TemplateError as err:
        raise InputError(f"--chat: the chat template of {model_dir} fails: {err}") from None


def _token_text(token) -> str:
    return token.get("content", "") if isinstance(token, dict) else (token or "")


class TextStream:
    """The text of a growing list of token ids, handed out as it becomes final: a byte-level
    BPE token can end in the middle of a character, which the next one completes."""

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def add(self, token: int) -> str:
        """The text that `token` completes (maybe nothing yet)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an unfinished character: wait for the rest of it
            return ""
        new, self.shown = text[len(self.shown):], text
        return new
