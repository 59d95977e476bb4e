"""Soft prompts: class prompts whose context words are learnable vectors (CoOp family).

A prompt for class ``c`` is the token sequence (CoOp, Zhou et al., IJCV'22, eq. 2)::

    t_c = [SOS] [v_1 .. v_M] [class tokens of c] [u_1 .. u_N] [.] [EOS]

where ``v`` ("before") and ``u`` ("after") are word-embedding vectors that train, and
every other position is the frozen token embedding of its word.  The sequence runs
through the frozen text tower (:func:`cliplab.models.backbone.encode_token_embeddings`)
to a text feature ``g(t_c)`` (D,).  CoOp uses ``before`` only; MoCoOp one prompt per
template with both.

Context initialised from words (``before="a photo of a"``) reproduces the hand-written
prompt exactly: before training the features equal ``encode_text("a photo of a {c}.")``.
Given a count instead (``before=16``), the vectors start from N(0, 0.02²) (CoOp's generic
context).  ``class_specific=True`` gives every class its own context (CoOp's CSC).

Needs an open_clip ``CLIP`` with the built-in text tower and a BPE tokenizer whose words
tokenize independently (CLIP's); a text tower from Hugging Face is refused.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UsageError
from ..models.backbone import encode_token_embeddings

__all__ = ["SoftPrompts", "split_template", "check_prompt_backbone"]

_PLACEHOLDER = "X"


def split_template(template: str) -> tuple[str, str]:
    """``"a {} on a plain background."`` -> ``("a", "on a plain background")``.

    The words left and right of ``{}``; the final period is dropped (it stays a fixed
    token of every prompt).
    """
    if template.count("{}") != 1:
        raise UsageError(f"a prompt template needs exactly one '{{}}' for the class name: {template!r}")
    before, after = template.split("{}")
    after = after.strip()
    if after.endswith("."):
        after = after[:-1]
    return before.strip(), after.strip()


def check_prompt_backbone(backbone) -> None:
    """Raise :class:`UsageError` unless the backbone's text tower takes token embeddings."""
    from open_clip.model import CLIP

    m = backbone.model
    if not isinstance(m, CLIP) or getattr(m, "attn_mask", None) is None or m.text_pool_type != "argmax":
        raise UsageError(f"prompt learning needs an open_clip CLIP with its built-in causal text tower "
                         f"and argmax (EOT) pooling; {backbone.name} has {type(m).__name__}"
                         + ("" if not isinstance(m, CLIP) else f" with pooling {m.text_pool_type!r}"))


class SoftPrompts(nn.Module):
    """Learnable context vectors around fixed class names; ``forward(model)`` -> (C, D).

    Parameters
    ----------
    backbone : Backbone
        Its tokenizer and token embedding build the fixed parts; it is not stored.
    classnames : list of str
    before, after : str or int
        Words to initialise the context left / right of the class name from, or a number
        of randomly initialised vectors (0 or ``""``: none).
    class_specific : bool, default False
        One context per class (C, M, W) instead of one shared (M, W).
    init_std : float, default 0.02
        Standard deviation of the random initialisation.
    generator : torch.Generator, optional
        For the random initialisation.

    Attributes
    ----------
    before, after : Parameter or None
        (M, W) / (N, W), or (C, M, W) / (C, N, W) when class-specific.
    """

    def __init__(self, backbone, classnames, *, before: str | int = "a photo of a", after: str | int = 0,
                 class_specific: bool = False, init_std: float = 0.02, generator=None):
        super().__init__()
        check_prompt_backbone(backbone)
        classnames = [str(c) for c in classnames]
        if not classnames:
            raise UsageError("prompt learning needs at least one class name")
        self.classnames, self.class_specific = classnames, bool(class_specific)
        self.spec = {"before": before, "after": after}
        b_words, n_b = self._words(backbone, before, "before")
        a_words, n_a = self._words(backbone, after, "after")
        texts = [" ".join(w for w in (b_words, c, a_words) if w) + "." for c in classnames]
        tokens = backbone.tokenize(texts)                                     # (C, T)
        lengths = tokens.argmax(dim=-1) - 1                                   # content tokens incl. "."
        n_cls = backbone.tokenize(classnames).argmax(dim=-1) - 1              # (C,)
        bad = (lengths != n_b + n_cls + n_a + 1).nonzero().flatten().tolist()
        if bad:
            c = classnames[bad[0]]
            raise UsageError(f"the prompt of class {c!r} ({texts[bad[0]]!r}) does not fit the context of "
                             f"{backbone.context_length} tokens or does not tokenize word by word")
        L = int(lengths.max()) + 2
        tokens = tokens[:, :L]
        model = backbone.model
        with torch.no_grad():
            emb = model.token_embedding(tokens.to(model.token_embedding.weight.device)).float()  # (C, L, W)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("embeddings", emb, persistent=False)
        C, W = len(classnames), emb.shape[-1]
        rows_a = torch.arange(C).repeat_interleave(n_a)                        # (C*N,)
        cols_a = ((1 + n_b + n_cls)[:, None] + torch.arange(n_a)).reshape(-1)  # (C*N,)
        self.register_buffer("rows_after", rows_a, persistent=False)
        self.register_buffer("cols_after", cols_a, persistent=False)
        self.n_before, self.n_after = n_b, n_a
        self.before = self._init(emb[:, 1:1 + n_b], before, C, W, init_std, generator)
        first = emb[torch.arange(C)[:, None], (1 + n_b + n_cls)[:, None] + torch.arange(n_a)]  # (C, N, W)
        self.after = self._init(first, after, C, W, init_std, generator)

    @staticmethod
    def _words(backbone, spec, name) -> tuple[str, int]:
        """(words, number of tokens) of a context spec."""
        if isinstance(spec, bool) or not isinstance(spec, (str, int)):
            raise UsageError(f"{name} must be context words or a number of vectors, got {spec!r}")
        if isinstance(spec, int):
            if spec < 0:
                raise UsageError(f"{name} must be >= 0 vectors, got {spec}")
            words = " ".join([_PLACEHOLDER] * spec)
        else:
            words = spec.strip()
        return words, (int(backbone.tokenize([words]).argmax(dim=-1)[0]) - 1 if words else 0)

    def _init(self, from_words, spec, C, W, std, generator):
        n = from_words.shape[1]
        if n == 0:
            return None
        if isinstance(spec, str):
            init = from_words if self.class_specific else from_words[0]       # word embeddings
        else:
            shape = (C, n, W) if self.class_specific else (n, W)
            init = torch.randn(shape, generator=generator) * std
        return nn.Parameter(init.clone().float())

    def prompt_embeddings(self) -> torch.Tensor:
        """The prompts as token embeddings (C, L, W), context vectors in place."""
        C = len(self.classnames)
        x = self.embeddings.clone()
        if self.before is not None:
            x[:, 1:1 + self.n_before] = self.before.expand(C, -1, -1) if self.before.ndim == 2 else self.before
        if self.after is not None:
            after = self.after.expand(C, -1, -1) if self.after.ndim == 2 else self.after
            x[self.rows_after, self.cols_after] = after.reshape(-1, after.shape[-1])
        return x

    def forward(self, model) -> torch.Tensor:
        """Text features g(t_c) of every class (C, D), not normalised."""
        return encode_token_embeddings(model, self.prompt_embeddings(), self.tokens)
