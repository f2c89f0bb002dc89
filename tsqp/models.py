"""Random LLaMA-family model directories built locally ("make-model").

Tests and demos need real-shaped checkpoints without any network access, so we build them
here: a `LlamaForCausalLM` with seeded random weights plus a small byte-level BPE tokenizer
trained on a generated corpus, saved as an ordinary Hugging Face directory.
"""

from __future__ import annotations

import copy
import fcntl
import inspect
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import tokenizers
import torch

from tsqp import __version__
from tsqp.errors import ModelError

# LlamaConfig kwargs. RoPE uses the transformers-5 native `rope_parameters` (which carries
# rope_theta); make_model also accepts the legacy `rope_theta` / `rope_scaling` overrides.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "tinyllama-1.1b": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "llama-3.2-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
}

MARKER = "tsqp-model.json"  # written last: its presence means the directory is complete
MODEL_FORMAT = 1  # bump when the generated weights or tokenizer change for a given seed
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 like the LLaMA tokenizers
TOKENIZER_VOCAB_CAP = 4096  # a bigger vocabulary needs a bigger corpus than we generate
NORM_STD = 0.1  # RMSNorm weights ~ N(1, 0.1): code that ignores them gets a visibly wrong answer
BIAS_STD = 0.02  # biases are random too (when the config has them), for the same reason

Progress = Callable[[str], None]


def make_model(
    preset: str,
    out: str | Path,
    seed: int = 0,
    *,
    overrides: dict | None = None,
    dtype: str = "float32",
    progress: Progress | None = None,
    force: bool = False,
) -> Path:
    """Write a random model + tokenizer directory at `out` and return its path.

    The directory is built next to `out` and renamed into place once complete, so a crash
    never leaves something that looks like a finished model. An existing tsqp model at
    `out` is replaced only with `force`; any other non-empty path is always refused.
    """
    say = progress or (lambda _msg: None)
    out = Path(out).expanduser().absolute()
    config = build_config(preset, overrides)
    torch_dtype = _torch_dtype(dtype)
    check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        say(f"training tokenizer for {preset}")
        fast = _build_tokenizer(config)
        config.bos_token_id = fast.bos_token_id
        config.eos_token_id = fast.eos_token_id
        config.architectures = ["LlamaForCausalLM"]
        say(f"building random weights ({preset}, seed {seed}, {dtype})")
        model = _build_model(config, seed, torch_dtype)
        say(f"writing {out}")
        with _quiet_progress():  # transformers' bar for the shards: the caller reports progress
            model.save_pretrained(tmp)
        del model
        fast.save_pretrained(tmp)
        marker = {"preset": preset, "seed": seed, "dtype": dtype,
                  "overrides": overrides or {}, "format": MODEL_FORMAT, "tsqp": __version__}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        _apply_umask(tmp)
        _swap_into_place(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"wrote {out}")
    return out


def build_config(preset: str, overrides: dict | None = None):
    """The LlamaConfig for a preset plus overrides, without touching any weights."""
    from transformers import LlamaConfig

    if preset not in PRESETS:
        raise ModelError(f"unknown preset '{preset}' (choose from: {', '.join(PRESETS)})")
    kwargs = _merge_kwargs(copy.deepcopy(PRESETS[preset]), dict(overrides or {}))
    return LlamaConfig(**kwargs)


def _merge_kwargs(kwargs: dict, overrides: dict) -> dict:
    """Apply overrides, folding legacy rope_theta/rope_scaling into rope_parameters."""
    from transformers import LlamaConfig

    known = set(inspect.signature(LlamaConfig.__init__).parameters) - {"self"}
    known |= {"rope_theta", "rope_scaling"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ModelError(f"unknown config override(s): {', '.join(unknown)}")
    rope = kwargs.pop("rope_parameters")
    theta = rope["rope_theta"]
    if "rope_scaling" in overrides:
        rope = dict(overrides.pop("rope_scaling") or {"rope_type": "default"})
    if "rope_parameters" in overrides:
        rope = dict(overrides.pop("rope_parameters") or {"rope_type": "default"})
    rope.setdefault("rope_theta", theta)
    if "rope_theta" in overrides:
        rope["rope_theta"] = overrides.pop("rope_theta")
    kwargs.update(overrides)
    kwargs["rope_parameters"] = rope
    return kwargs


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype '{dtype}' (choose from: {', '.join(DTYPES)})")
    return DTYPES[dtype]


@contextmanager
def _quiet_progress() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def check_target(out: Path, force: bool) -> None:
    """Refuse to clobber anything that is not empty, and a previous tsqp model unless `force`."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ModelError(f"{out} exists and is not a directory")
    if any(out.iterdir()) and not (out / MARKER).is_file():
        raise ModelError(f"{out} is not empty and is not a tsqp model; refusing to overwrite it")
    if (out / MARKER).is_file() and not force:
        raise ModelError(f"{out} already holds a tsqp model (pass --force to replace it)")


def _apply_umask(directory: Path) -> None:
    """mkdtemp (and transformers' shard writer) create owner-only modes; give the model the
    modes an ordinary mkdir/open would, so a server running as another user can read it."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _swap_into_place(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished `tmp` to `out`, moving an old model aside first."""
    check_target(out, force)  # re-check: building took a while
    old = None
    if out.exists():
        if any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / out.name)
        else:
            out.rmdir()
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _build_model(config, seed: int, dtype: torch.dtype):
    """LlamaForCausalLM with seeded random weights, built without a slow default init.

    The module tree is made on the meta device and each parameter is then filled from our
    own generator, so the weights depend only on (config, seed) and a 1B model takes seconds.
    """
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    norms = [m for m in model.modules() if isinstance(m, LlamaRMSNorm)]
    norm_ids = {id(p) for m in norms for p in m.parameters()}
    gen = torch.Generator().manual_seed(seed)
    filled: dict[int, torch.nn.Parameter] = {}  # meta param id -> real param (keeps ties)
    for module in model.modules():
        for name, meta in list(module._parameters.items()):
            if meta is None:
                continue
            if id(meta) not in filled:
                filled[id(meta)] = torch.nn.Parameter(
                    _random_tensor(meta.shape, name, id(meta) in norm_ids, config, gen, dtype),
                    requires_grad=False,
                )
            module._parameters[name] = filled[id(meta)]
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its buffers were left on meta
    model.config.dtype = dtype
    return model.eval()


def _random_tensor(shape, name: str, is_norm: bool, config, gen, dtype) -> torch.Tensor:
    """Draw in float32 (so every dtype rounds the same numbers) and cast."""
    values = torch.randn(shape, generator=gen, dtype=torch.float32)
    if is_norm:
        values.mul_(NORM_STD).add_(1.0)
    elif name == "bias":
        values.mul_(BIAS_STD)
    else:
        values.mul_(config.initializer_range)
    return values.to(dtype)


# ---------------------------------------------------------------------------- tokenizer

_WORDS = """
the a an one two three some every no this that these those my your our their his her its
model token layer weight matrix vector server enclave secret key value query cache head
river mountain city garden window table letter story song morning evening winter summer
cat dog bird horse fish tree flower stone cloud rain wind fire water light shadow road
house door book paper music friend teacher student child king queen doctor farmer
runs walks reads writes sings builds finds keeps opens closes sends hears sees makes takes
brings holds moves turns starts stops carries counts learns teaches answers asks follows
quickly slowly quietly gently often never always sometimes again together almost nearly
red green blue black white small large old new young bright dark warm cold quiet loud
happy simple careful strange early late long short heavy light first last next other
in on at with from under over between after before through around near behind across
and but or so because while when where if then than although
beautiful better complex flat sparse readability special practicality purity errors
silently explicitly ambiguity temptation obvious implementation namespaces honking idea
""".split()

_PUNCT = [".", ".", ".", "!", "?", ";", ","]


def _corpus(n_sentences: int = 1500, seed: int = 1234) -> list[str]:
    """Deterministic pseudo-English lines (plus digits and a little non-ASCII) to train on."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 2025)))
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice(_PUNCT))
    lines += ["Café naïve façade — “quoted” ünïcödé", "def f(x):\n    return x * 2  # a comment"]
    return lines


def _build_tokenizer(config):
    """Byte-level BPE trained on the generated corpus, wrapped for transformers."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    min_vocab = 256 + len(SPECIAL_TOKENS)
    if config.vocab_size < min_vocab:
        raise ModelError(f"vocab_size {config.vocab_size} is too small for a byte-level tokenizer "
                         f"(need at least {min_vocab})")
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(config.vocab_size, TOKENIZER_VOCAB_CAP),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=config.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )


# ---------------------------------------------------------------------------- cache


def default_model_cache() -> Path:
    """Where cached_model keeps generated models: $TSQP_CACHE or ~/.cache/tsqp."""
    env = os.environ.get("TSQP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tsqp"


def cached_model(preset: str = "tiny", seed: int = 0) -> Path:
    """A model built once under the cache and reused, so tests don't rebuild it each run.

    Only a directory whose marker matches (preset, seed, format) counts; anything else at
    that path (an older format, a foreign leftover) is rebuilt. A file lock keeps parallel
    test workers from building the same model at once.
    """
    if preset not in PRESETS:
        raise ModelError(f"unknown preset '{preset}' (choose from: {', '.join(PRESETS)})")
    cache = default_model_cache()
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"{preset}-seed{seed}"
    with open(cache / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _marker_matches(out, preset, seed):
            return out
        if out.exists() and not (out / MARKER).is_file():
            shutil.rmtree(out)  # our own cache slot, but no complete model in it
        return make_model(preset, out, seed, force=True)  # an older format in our own slot


def _marker_matches(model_dir: Path, preset: str, seed: int) -> bool:
    try:
        marker = json.loads((model_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    wanted = {"preset": preset, "seed": seed, "format": MODEL_FORMAT, "dtype": "float32",
              "overrides": {}}
    return all(marker.get(key) == value for key, value in wanted.items())

