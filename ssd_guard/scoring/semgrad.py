"""SemGrad and HybridGrad (Li et al., arXiv 2605.04638): sampling-free, gradient-based
uncertainty of a generated answer, from one forward + one backward pass of the base model
over ``prompt + answer``.

For an answer ``y_1 .. y_T`` after a prompt, with next-token distributions ``p_t`` (fp32)
and their entropies ``H_t`` (nats, detached), the loss is the entropy-weighted negative
log-likelihood of the answer tokens, averaged over the answer tokens as the authors'
release does (``NLLLoss(reduction="mean")`` over ``log p_t * H_t``)::

    L = -(1/T) * sum_t H_t * log p_t(y_t)

* **SemGrad** = mean ``|dL/dh|`` over the hidden dimension and over ``layers`` of the
  hidden state ``h`` at ONE prompt token (``position``, an offset from the end of the
  prompt: ``-1`` = the last prompt token, ``-4`` = the fourth from last, the authors'
  choice for Llama-3). ``layers`` index ``hidden_states`` (``0`` = the embeddings, ``l``
  = the output of decoder layer ``l``); by default the upper half of the layers with the
  last (normed) one excluded, ``range(L - L//2, L)`` for ``L`` decoder layers — what the
  release computes.
* **HybridGrad** = ``a * mean|dL/dW_head| + (1 - a) * SemGrad`` with
  ``a = exp(-mean_t H_t)``.

``dL/dW_head`` of one example is computed in closed form, ``sum_t g_t (x) x_t`` with
``g_t = (H_t / T) (p_t - onehot(y_t))`` (times the derivative of the final logit soft-cap
where the model has one) and ``x_t`` the input of the output projection. For a model whose
output projection is tied to the input embedding (SmolLM2, Gemma 3) this is the gradient
w.r.t. the output projection's use of the matrix only (autograd on the shared tensor would
add the embedding rows' gradient); no parameter gradient is ever accumulated.

The gradients w.r.t. hidden states come from ``torch.autograd.grad`` of the batch loss
(the sum of the per-example losses: examples do not interact, so each row's gradient is
exactly its own example's). Prompt and answer are tokenised apart (the answer as
``" " + answer.strip()``, as the model generated it after ``"Answer:"``) and concatenated,
so the boundary is exact; batches are right-padded (positions follow the tokens). An
empty answer scores NaN.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from ssd_guard.errors import ArtifactError, ArtifactMismatchError
from ssd_guard.models import model_fingerprint
from ssd_guard.scoring.token_stats import answer_token_ids

__all__ = [
    "ALL_OUTPUTS",
    "CONFIG_FORMAT",
    "GRADIENT_SIGNALS",
    "GradientScorer",
    "HybridGradScorer",
    "SemGradScorer",
    "default_layers",
]

#: The ``format`` field of a gradient scorer config file.
CONFIG_FORMAT = "ssd-guard/gradient-scorer-config"
CONFIG_VERSION = 1

#: The signals of one pass, in the order :meth:`GradientScorer.score_pairs_all` gives them.
GRADIENT_SIGNALS: tuple[str, ...] = ("semgrad", "hybridgrad")
#: Everything :meth:`GradientScorer.score_pairs_all` returns.
ALL_OUTPUTS: tuple[str, ...] = (
    *GRADIENT_SIGNALS,
    "lm_head_grad",
    "alpha",
    "tok_lp_mean",
    "tok_lp_min",
    "tok_entropy_mean",
)

#: Elements of one vocabulary chunk of the closed-form ``dL/dW_head`` (memory bound).
_HEAD_CHUNK_ELEMENTS = 1 << 22

_S = TypeVar("_S", bound="GradientScorer")


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def default_layers(num_layers: int) -> list[int]:
    """The upper half of the layers, the last excluded: ``range(L - L//2, L)``."""
    return list(range(num_layers - num_layers // 2, num_layers))


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class GradientScorer:
    """One pass gives both signals; :class:`SemGradScorer` / :class:`HybridGradScorer`
    differ only in the signal :meth:`score_pairs` returns (a :class:`PairScorer`)."""

    default_name: ClassVar[str] = "SemGrad"
    default_signal: ClassVar[str] = "semgrad"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        position: int = -1,
        layers: Sequence[int] | None = None,
        format_prompt: Callable[[str], str] | None = None,
        batch_size: int = 8,
        name: str | None = None,
        signal: str | None = None,
        model_id: str | None = None,
        max_answer_tokens: int = 32,
        calibration: dict[str, list[float]] | None = None,
        sps: dict[str, Any] | None = None,
    ) -> None:
        if position >= 0:
            raise ValueError(f"position is an offset from the prompt end (< 0), got {position}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        cfg = _text_config(model.config)
        self.num_layers = int(cfg.num_hidden_layers)
        self.position = int(position)
        self.layers = (
            [int(x) for x in layers] if layers is not None else default_layers(self.num_layers)
        )
        if not self.layers:
            raise ValueError("layers is empty")
        bad = [x for x in self.layers if not 0 <= x <= self.num_layers]
        if bad:
            raise ValueError(f"layers {bad} outside 0..{self.num_layers} (0 = embeddings)")
        self.format_prompt = format_prompt
        self.batch_size = int(batch_size)
        self.name = name if name is not None else self.default_name
        self.signal = signal if signal is not None else self.default_signal
        if self.signal not in GRADIENT_SIGNALS:
            raise ValueError(f"signal must be one of {GRADIENT_SIGNALS}, got {self.signal!r}")
        self.model_id = model_id if model_id is not None else str(getattr(cfg, "_name_or_path", ""))
        self.max_answer_tokens = int(max_answer_tokens)
        self.fingerprint = model_fingerprint(model)
        self.calibration: dict[str, list[float]] = dict(calibration or {})
        self.sps = sps
        cap = getattr(cfg, "final_logit_softcapping", None)
        self.softcap: float | None = float(cap) if cap else None

    # -- scoring ---------------------------------------------------------------------------

    def score_pairs(
        self, prompts: Sequence[str], answers: Sequence[str], *, formatted: bool = False
    ) -> list[float]:
        """This scorer's signal per ``(prompt, answer)`` (higher = riskier; NaN for an
        empty answer)."""
        out = self.score_pairs_all(prompts, answers, formatted=formatted)[self.signal]
        return [float(x) for x in out]

    def score_pairs_all(
        self,
        prompts: Sequence[str],
        answers: Sequence[str],
        *,
        formatted: bool = False,
        positions: Sequence[int] = (),
    ) -> dict[str, np.ndarray]:
        """Every output of one pass, arrays ``[N]`` (float64) keyed :data:`ALL_OUTPUTS`:
        ``semgrad``, ``hybridgrad``, ``lm_head_grad`` (mean ``|dL/dW_head|``), ``alpha``
        (``exp(-tok_entropy_mean)``) and the answer's token statistics ``tok_lp_mean``,
        ``tok_lp_min``, ``tok_entropy_mean``. NaN rows for empty answers.

        ``positions`` (offsets < 0) add ``semgrad@<position>``: SemGrad at other anchor
        tokens, free from the same backward pass (position studies)."""
        extra = [int(x) for x in positions]
        if any(x >= 0 for x in extra):
            raise ValueError(f"positions are offsets from the prompt end (< 0), got {extra}")
        keys = [*ALL_OUTPUTS, *(f"semgrad@{x}" for x in extra)]
        rows = self._rows(prompts, answers, formatted)
        out = {k: np.full(len(prompts), np.nan) for k in keys}
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            res, _ = self._batch([(p, a) for _, p, a in chunk], extra_positions=extra)
            for r, (i, _, _) in enumerate(chunk):
                for k in keys:
                    out[k][i] = res[k][r]
        return out

    def hidden_gradients(
        self, prompts: Sequence[str], answers: Sequence[str], *, formatted: bool = False
    ) -> np.ndarray:
        """``dL/dh`` at the anchor token, ``[N, len(layers), hidden]`` (NaN rows for empty
        answers): what SemGrad averages the absolute value of."""
        rows = self._rows(prompts, answers, formatted)
        d = int(_text_config(self.model.config).hidden_size)
        out = np.full((len(prompts), len(self.layers), d), np.nan)
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            _, grads = self._batch([(p, a) for _, p, a in chunk], keep_grads=True)
            assert grads is not None
            for r, (i, _, _) in enumerate(chunk):
                out[i] = grads[r]
        return out

    def _rows(
        self, prompts: Sequence[str], answers: Sequence[str], formatted: bool
    ) -> list[tuple[int, list[int], list[int]]]:
        if isinstance(prompts, str) or isinstance(answers, str):
            raise TypeError("prompts and answers must be sequences of strings")
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        fmt = self.format_prompt if (self.format_prompt is not None and not formatted) else None
        rows: list[tuple[int, list[int], list[int]]] = []
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
            if not a.strip():
                continue
            text = fmt(p) if fmt is not None else p
            p_ids = [int(t) for t in self.tokenizer(text)["input_ids"]]
            a_ids = answer_token_ids(self.tokenizer, a, self.max_answer_tokens)
            if p_ids and a_ids:
                rows.append((i, p_ids, a_ids))
        return rows

    def _batch(
        self,
        rows: Sequence[tuple[list[int], list[int]]],
        *,
        keep_grads: bool = False,
        extra_positions: Sequence[int] = (),
    ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        model = self.model
        param = next(model.parameters())
        device = param.device
        # The loss in fp32 (fp64 when the model is fp64: finite-difference tests).
        ldt = torch.float64 if param.dtype == torch.float64 else torch.float32
        pad = self.tokenizer.pad_token_id
        pad = int(pad if pad is not None else 0)
        b = len(rows)
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((b, width), pad, dtype=torch.long)
        attn = torch.zeros((b, width), dtype=torch.long)
        row_idx: list[int] = []
        pos_idx: list[int] = []
        targets: list[int] = []
        n_answer: list[float] = []
        offsets = [self.position, *extra_positions]
        anchor = torch.empty((b, len(offsets)), dtype=torch.long)
        for r, (p_ids, a_ids) in enumerate(rows):
            seq = p_ids + a_ids
            ids[r, : len(seq)] = torch.tensor(seq)
            attn[r, : len(seq)] = 1
            lp = len(p_ids)
            anchor[r] = torch.tensor([max(0, lp + o) for o in offsets])
            for t, tok in enumerate(a_ids):
                row_idx.append(r)
                pos_idx.append(lp - 1 + t)  # the position whose logits predict answer token t
                targets.append(tok)
                n_answer.append(float(len(a_ids)))
        ids, attn, anchor = ids.to(device), attn.to(device), anchor.to(device)
        ri = torch.tensor(row_idx, device=device)
        pi = torch.tensor(pos_idx, device=device)
        tgt = torch.tensor(targets, device=device)
        den = torch.tensor(n_answer, device=device, dtype=ldt)
        head = model.get_output_embeddings()
        with torch.enable_grad():
            emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            out = model.base_model(
                inputs_embeds=emb,
                attention_mask=attn,
                output_hidden_states=True,
                use_cache=False,
            )
            hidden = out.hidden_states
            x = out.last_hidden_state[ri, pi].to(ldt)  # [R, d]: the output projection's input
            bias = head.bias.to(ldt) if getattr(head, "bias", None) is not None else None
            logits = torch.nn.functional.linear(x, head.weight.detach().to(ldt), bias)
            if self.softcap is not None:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            logp = torch.log_softmax(logits, dim=-1)
            with torch.no_grad():
                prob = logp.exp()
                ent = -(prob * logp).sum(-1)  # [R]
                w = ent / den
            tok_lp = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
            loss = -(w * tok_lp).sum()
            grads = torch.autograd.grad(loss, [hidden[layer] for layer in self.layers])
        with torch.no_grad():
            # SemGrad: mean |dL/dh| at the anchor token over the hidden dim and the layers.
            ar = torch.arange(b, device=device)[:, None]
            # [B, n_offsets, K, d]
            at_anchor = torch.stack([g[ar, anchor].to(ldt) for g in grads], dim=2)
            all_sem = at_anchor.abs().mean(-1).mean(-1)  # [B, n_offsets]
            semgrad = all_sem[:, 0]
            # Closed-form dL/dW_head per example: sum_t g_t (x) x_t.
            g = prob
            g[torch.arange(g.shape[0], device=device), tgt] -= 1.0
            g = g * w.unsqueeze(-1)
            if self.softcap is not None:
                g = g * (1.0 - (logits.detach() / self.softcap) ** 2)
            xd = x.detach()
            zeros = torch.zeros(b, device=device, dtype=ldt)
            lp_sum = zeros.clone().index_add_(0, ri, tok_lp.detach())
            ent_sum = zeros.clone().index_add_(0, ri, ent)
            counts = zeros.clone().index_add_(0, ri, torch.ones_like(ent))
            lp_min = torch.full((b,), math.inf, device=device, dtype=ldt).scatter_reduce(
                0, ri, tok_lp.detach(), reduce="amin"
            )
            head_grad = torch.stack([_mean_abs_outer(g[ri == r], xd[ri == r]) for r in range(b)])
            ent_mean = ent_sum / counts
            alpha = torch.exp(-ent_mean)
            hybrid = alpha * head_grad + (1.0 - alpha) * semgrad
            res = {
                "semgrad": semgrad,
                "hybridgrad": hybrid,
                "lm_head_grad": head_grad,
                "alpha": alpha,
                "tok_lp_mean": lp_sum / counts,
                "tok_lp_min": lp_min,
                "tok_entropy_mean": ent_mean,
            }
            for j, o in enumerate(extra_positions):
                res[f"semgrad@{o}"] = all_sem[:, j + 1]
            arrays = {k: v.double().cpu().numpy() for k, v in res.items()}
            kept = at_anchor[:, 0].double().cpu().numpy() if keep_grads else None
            return arrays, kept

    # -- calibration and config ------------------------------------------------------------

    def calibrate(
        self, prompts: Sequence[str], answers: Sequence[str], *, formatted: bool = False
    ) -> dict[str, np.ndarray]:
        """Score validation pairs and store their sorted (finite) values per signal as
        :attr:`calibration`; returns every output of the pass."""
        res = self.score_pairs_all(prompts, answers, formatted=formatted)
        for k in GRADIENT_SIGNALS:
            v = res[k][np.isfinite(res[k])]
            self.calibration[k] = sorted(float(x) for x in v)
        return res

    def config(self) -> dict[str, Any]:
        """The JSON-able gradient scorer config."""
        return {
            "format": CONFIG_FORMAT,
            "version": CONFIG_VERSION,
            "model_id": self.model_id,
            "fingerprint": self.fingerprint,
            "num_layers": self.num_layers,
            "position": self.position,
            "layers": list(self.layers),
            "max_answer_tokens": self.max_answer_tokens,
            "sps": self.sps,
            "calibration": {k: list(v) for k, v in self.calibration.items()},
        }

    def save_config(self, path: str | Path) -> Path:
        """Write :meth:`config` as JSON (atomically) and return the path."""
        p = Path(path)
        _atomic_write(p, json.dumps(self.config(), indent=1) + "\n")
        return p

    @classmethod
    def from_config(
        cls: type[_S],
        path: str | Path,
        model: Any,
        tokenizer: Any,
        *,
        format_prompt: Callable[[str], str] | None = None,
        batch_size: int = 8,
        name: str | None = None,
        signal: str | None = None,
    ) -> _S:
        """A scorer for ``model`` from a saved config; refuses (``ArtifactMismatchError``)
        a config written for a model with another weight fingerprint."""
        p = Path(path)
        try:
            cfg = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"cannot read gradient scorer config {p}: {exc}") from exc
        if not isinstance(cfg, dict) or cfg.get("format") != CONFIG_FORMAT:
            raise ArtifactError(f"{p} is not a gradient scorer config (format {CONFIG_FORMAT!r})")
        if int(cfg.get("version", -1)) > CONFIG_VERSION:
            raise ArtifactError(f"{p}: config version {cfg.get('version')} is newer than this code")
        fp = model_fingerprint(model)
        if cfg.get("fingerprint") != fp:
            raise ArtifactMismatchError(
                f"gradient scorer config {p} was made for base model {cfg.get('model_id')!r} "
                f"(fingerprint {cfg.get('fingerprint')}), but the model given has fingerprint "
                f"{fp}; recompute the config for this model"
            )
        calibration = {str(k): [float(x) for x in v] for k, v in cfg["calibration"].items()}
        return cls(
            model,
            tokenizer,
            position=int(cfg["position"]),
            layers=[int(x) for x in cfg["layers"]],
            format_prompt=format_prompt,
            batch_size=batch_size,
            name=name,
            signal=signal,
            model_id=str(cfg.get("model_id") or ""),
            max_answer_tokens=int(cfg.get("max_answer_tokens", 32)),
            calibration=calibration,
            sps=cfg.get("sps"),
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model_id={self.model_id!r}, position={self.position}, "
            f"layers={self.layers}, signal={self.signal!r})"
        )


def _mean_abs_outer(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``mean |g.T @ x|`` for ``g [T, V]``, ``x [T, d]`` without materialising ``[V, d]``."""
    v, d = g.shape[1], x.shape[1]
    step = max(1, _HEAD_CHUNK_ELEMENTS // max(d, 1))
    total = torch.zeros((), dtype=torch.float64, device=g.device)
    for s in range(0, v, step):
        total += (g[:, s : s + step].T @ x).abs().sum(dtype=torch.float64)
    return (total / (v * d)).to(g.dtype)


class SemGradScorer(GradientScorer):
    """:class:`GradientScorer` whose :meth:`score_pairs` gives SemGrad."""

    default_name = "SemGrad"
    default_signal = "semgrad"


class HybridGradScorer(GradientScorer):
    """:class:`GradientScorer` whose :meth:`score_pairs` gives HybridGrad."""

    default_name = "HybridGrad"
    default_signal = "hybridgrad"
