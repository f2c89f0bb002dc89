"""Generation across the boundary: a prefill, then one token per sequence per step, sampled in
the TEE, streamed as it comes.

The KV cache lives where the protocol puts it (steps.py, guard.py): the runner opens the
sequences for prompt + max_new_tokens positions, and every pass writes its positions. If the
lean server loses the session (a restart, an eviction), the prompt and the tokens made so far
are replayed once from position 0, and generation goes on with the same tokens.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import torch

from ..errors import InputError, RemoteError, TsqpError
from ..transport import WireStats
from .sampling import Sampling, sample
from .steps import LeanSteps, one_core_rows

if TYPE_CHECKING:
    from .runner import TeeRunner

DECODE_CHUNK = 16  # decode steps whose one-time material (guarded modes) is made in one pass over the weights


def as_batch(input_ids: "torch.Tensor | list[list[int]]") -> torch.Tensor:
    """Prompts as an int64 [batch, prompt] tensor; prompts of unequal length are refused."""
    if isinstance(input_ids, torch.Tensor):
        return input_ids
    lengths = sorted({len(ids) for ids in input_ids})
    if len(lengths) > 1:
        raise InputError(f"prompts of unequal length ({', '.join(map(str, lengths))} tokens): a batch is "
                         "generated from prompts of one length for now")
    return torch.tensor(input_ids, dtype=torch.int64)


class GenerationStopped(TsqpError):
    """Generation ended early on an error; says how many tokens were made."""

    def __init__(self, produced: int, wanted: int, cause: BaseException):
        super().__init__(f"generation stopped after {produced} of {wanted} new tokens: {cause}")
        self.produced, self.cause = produced, cause


@dataclass
class GenerationResult:
    """The new tokens of one generation and where its time went."""

    tokens: torch.Tensor  # int64 [batch, new]
    prompt_tokens: int
    ttft_s: float  # prompt in to first token out: the prefill and one sampling
    token_s: list[float]  # each later token's decode step, in order
    prefill_wire: WireStats = field(default_factory=WireStats)
    decode_wire: WireStats = field(default_factory=WireStats)
    offline_s: float = 0.0  # guarded modes: one-time material made for this generation, not in the times above
    stopped: str = "length"  # "length": max_new_tokens reached; "eos": every sequence ended
    replays: int = 0  # times the prompt was replayed after the server lost the session
    logits: torch.Tensor | None = None  # float32 [batch, new, vocab]: what each new token was chosen from

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def new_tokens(self) -> int:
        return self.tokens.shape[1]

    @property
    def wire(self) -> WireStats:
        both = self.prefill_wire.copy()
        for key, value in self.decode_wire.as_dict().items():
            setattr(both, key, getattr(both, key) + value)
        return both

    @property
    def itl_median_s(self) -> float:
        """Inter-token latency: the median decode step (nan if only one token was made)."""
        return statistics.median(self.token_s) if self.token_s else float("nan")

    @property
    def itl_p90_s(self) -> float:
        if not self.token_s:
            return float("nan")
        ordered = sorted(self.token_s)
        return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: new tokens of every sequence per second of decode steps."""
        total = sum(self.token_s)
        return self.batch * len(self.token_s) / total if total > 0 else float("nan")


class Generation:
    """An iterator over each step's new tokens [batch]; `.result` once it is exhausted."""

    def __init__(self, runner: "TeeRunner", input_ids: "torch.Tensor | list[list[int]]", max_new_tokens: int, *,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, ignore_eos: bool = False, keep_logits: bool = False):
        if max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        self.runner, self.max_new = runner, max_new_tokens
        self.prompt = runner.check_input(as_batch(input_ids), max_new_tokens)
        self.sampling = Sampling(temperature, top_k, top_p, seed)
        if runner.protocol == "lean" and not runner.guarded:
            info = runner.client.ping()
            if "decode" not in info.get("features", ()):
                raise InputError("this GPU server cannot decode (its lean sessions keep no KV cache): update it, or "
                                 "use --protocol seed")
            if isinstance(runner.steps, LeanSteps):
                runner.steps.spin_rows = one_core_rows(info)
        self.eos = () if ignore_eos else runner.config.eos_token_ids
        self.keep_logits = keep_logits
        self.result: GenerationResult | None = None
        self._made: list[torch.Tensor] = []
        self._replays = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        runner, (batch, prompt) = self.runner, self.prompt.shape
        offline = runner.offline_for(batch, prompt)
        generator, kept, times = self.sampling.generator(), [], []
        finished = torch.zeros(batch, dtype=torch.bool)
        stats, stopped = runner.client.stats, "length"
        start, before = time.perf_counter(), stats.copy()
        runner.steps.open(batch, prompt + self.max_new)
        try:
            logits = self._pass(self.prompt, 0)
            ttft = time.perf_counter() - start
            prefill_wire, before = stats.since(before), stats.copy()
            for step in range(self.max_new):
                if step:
                    offline += runner.offline_for(batch, 1, count=min(DECODE_CHUNK, self.max_new - step))
                    tick = time.perf_counter()
                    logits = self._pass(self._made[-1][:, None], prompt + step - 1)
                token = sample(logits[:, -1], self.sampling, generator)
                if step:
                    times.append(time.perf_counter() - tick)
                if self.eos:
                    token = torch.where(finished, self.eos[0], token)  # an ended sequence pads with its EOS
                    finished |= torch.isin(token, torch.tensor(self.eos))
                self._made.append(token)
                if self.keep_logits:
                    kept.append(logits[:, -1].float())
                yield token
                if bool(finished.all()):
                    stopped = "eos"
                    break
            decode_wire = stats.since(before)  # the session's release below is no token's cost
        except TsqpError as err:
            raise GenerationStopped(len(self._made), self.max_new, err) from err
        finally:
            runner.steps.close()
        self.result = GenerationResult(
            tokens=torch.stack(self._made, dim=1), prompt_tokens=prompt, ttft_s=ttft, token_s=times,
            prefill_wire=prefill_wire, decode_wire=decode_wire, offline_s=offline, stopped=stopped,
            replays=self._replays, logits=torch.stack(kept, dim=1) if kept else None)

    def run(self) -> GenerationResult:
        """Generate to the end without streaming."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result

    def _pass(self, new_ids: torch.Tensor, position: int) -> torch.Tensor:
        """One forward pass; if the server lost the session, the whole history once more."""
        try:
            return self.runner.forward(new_ids, position)
        except RemoteError as err:
            if err.code != "missing_state":
                raise
        self._replays += 1
        steps, (batch, prompt) = self.runner.steps, self.prompt.shape
        steps.close()
        steps.open(batch, prompt + self.max_new)
        history = torch.cat([self.prompt, *(t[:, None] for t in self._made)], dim=1)
        return self.runner.forward(history, 0)[:, -1:]
