"""P-tuning with prompts anywhere: virtual tokens at marked positions of the input, anchors kept real.

P-tuning (Liu et al. 2021) places its prompt tokens around the input segments, e.g. the template
``(3, 3, 3)`` over the segments ``x`` and ``[MASK]`` gives ``[P][P][P] x [P][P][P] [MASK] [P][P][P]``.
PEFT only prepends. Here the positions are marked in ``input_ids`` with a reserved placeholder id; the
k-th placeholder of every row receives the k-th output of the prompt encoder (run once per forward by
:func:`fastprompt.encoders.encode_prompt`), every other id is looked up in the model's word embeddings::

    template = PromptTemplate(spec=(3, 3, 3), placeholder_id=tokenizer.vocab_size)
    ids = template.build([[x_ids], [tokenizer.mask_token_id]])     # anchors stay real tokens
    model = PromptTemplateModel(get_peft_model(base, PromptEncoderConfig(..., num_virtual_tokens=9)), template)
    out = model(input_ids=..., attention_mask=..., labels=...)

Saving writes PEFT's own files (``adapter_config.json`` + ``adapter_model.safetensors`` with
``prompt_embeddings``) plus ``fastprompt_template.json``; loading goes through ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fastprompt.encoders import EncoderCache
from fastprompt.errors import UnsupportedModelError
from fastprompt.hf import compat
from fastprompt.methods import Output
from fastprompt.methods.peft_format import method_of

__all__ = ["PromptTemplate", "PromptTemplateModel", "scatter_prompts"]

TEMPLATE_FILE = "fastprompt_template.json"


@dataclass(frozen=True)
class PromptTemplate:
    """Where the virtual tokens go.

    Args:
        spec: ``(n_0, n_1, ..., n_k)``: n_0 virtual tokens, segment 1, n_1 virtual tokens, ..., segment k,
            n_k virtual tokens. P-tuning's ``(3, 3, 3)`` surrounds two segments.
        placeholder_id: the id that marks a virtual token in ``input_ids``. It is never looked up in the
            word embeddings, so an id past the vocabulary (e.g. ``len(tokenizer)``) is the safe choice.
    """

    spec: tuple[int, ...]
    placeholder_id: int

    def __post_init__(self) -> None:
        spec = tuple(self.spec)
        if len(spec) < 2 or any(not isinstance(n, int) or n < 0 for n in spec) or sum(spec) == 0:
            raise ValueError(
                f"spec must hold >= 2 non-negative ints (counts around >= 1 segment), not all 0; got {self.spec!r}"
            )
        if not isinstance(self.placeholder_id, int):
            raise ValueError(f"placeholder_id must be an int, got {type(self.placeholder_id).__name__}")
        object.__setattr__(self, "spec", spec)

    @property
    def num_virtual_tokens(self) -> int:
        return sum(self.spec)

    def build(self, segments: Sequence[Sequence[int]]) -> list[int]:
        """Token ids of one example: ``len(spec) - 1`` segments interleaved with placeholder runs."""
        if len(segments) != len(self.spec) - 1:
            raise ValueError(f"template {self.spec} takes {len(self.spec) - 1} segments, got {len(segments)}")
        ids = [self.placeholder_id] * self.spec[0]
        for segment, count in zip(segments, self.spec[1:], strict=True):
            if self.placeholder_id in segment:
                raise ValueError(f"a segment contains the placeholder id {self.placeholder_id}")
            ids += list(segment) + [self.placeholder_id] * count
        return ids

    def build_batch(
        self, examples: Sequence[Sequence[Sequence[int]]], pad_id: int, *, padding_side: str = "right"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids [B, T], attention_mask [B, T])`` for a list of examples, padded with ``pad_id``."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        rows = [self.build(example) for example in examples]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            span = slice(0, len(r)) if padding_side == "right" else slice(width - len(r), width)
            ids[b, span] = torch.tensor(r, dtype=torch.long)
            mask[b, span] = 1
        return ids, mask

    def to_dict(self) -> dict[str, Any]:
        return {"spec": list(self.spec), "placeholder_id": self.placeholder_id}


def scatter_prompts(
    input_ids: torch.Tensor, placeholder_id: int, prompts: torch.Tensor, word_embeddings: torch.nn.Module
) -> torch.Tensor:
    """``inputs_embeds`` [B, T, D]: the k-th placeholder of each row gets ``prompts[k]``, other ids their word
    embedding. input_ids [B, T] with exactly P placeholders per row; prompts [P, D].
    """
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must be an integer tensor [B, T], got {input_ids.dtype} {tuple(input_ids.shape)}")
    if prompts.dim() != 2:
        raise ValueError(f"prompts must be [P, D], got shape {tuple(prompts.shape)}")
    marked = input_ids == placeholder_id
    counts = marked.sum(dim=1)
    if input_ids.shape[0] and bool((counts != prompts.shape[0]).any()):
        raise ValueError(
            f"every row of input_ids must hold exactly {prompts.shape[0]} placeholders ({placeholder_id}), "
            f"got counts {counts.tolist()}"
        )
    embeds = word_embeddings(input_ids.masked_fill(marked, 0))
    rank = (marked.cumsum(dim=1) - 1).clamp(min=0)
    return torch.where(marked[..., None], prompts.to(embeds.dtype)[rank], embeds)


class PromptTemplateModel(torch.nn.Module):
    """A PEFT P-tuning (or prompt-tuning) model whose virtual tokens sit where the template puts them.

    ``forward`` takes the usual ``input_ids`` (with placeholders), ``attention_mask``, ``labels`` (aligned
    with input_ids; placeholder positions are ignored in the loss) and any other keyword of the base
    model, and calls the base model with ``inputs_embeds``. Works for causal and masked LMs.
    """

    def __init__(self, peft_model: torch.nn.Module, template: PromptTemplate, adapter_name: str | None = None):
        super().__init__()
        from peft import PeftModel

        if not isinstance(peft_model, PeftModel):
            raise UnsupportedModelError(f"peft_model must be a peft.PeftModel, got {type(peft_model).__name__}")
        name = adapter_name or peft_model.active_adapter
        config = compat.peft_active_config(peft_model, name)
        method = method_of(config, f"adapter {name!r}", "PromptTemplateModel")
        if method.output is not Output.EMBEDDINGS:
            raise UnsupportedModelError(
                f"prompts anywhere places virtual-token embeddings, but adapter {name!r} is {method.name}, whose "
                f"output is {method.output.value}"
            )
        method.check_config(config)
        if method.length(config) != template.num_virtual_tokens:
            raise ValueError(
                f"the template places {template.num_virtual_tokens} virtual tokens but the adapter has "
                f"num_virtual_tokens={method.length(config)}"
            )
        self.peft_model = peft_model
        self.template = template
        self.adapter_name = name
        self.method = method
        self.encoder_cache = EncoderCache()

    def prompt_embeddings(self) -> torch.Tensor:
        """The encoder output [P, D], computed once per forward (kept in :attr:`encoder_cache` in eval/no-grad mode)."""
        encoder = compat.peft_prompt_encoder(self.peft_model, self.adapter_name)
        return self.method.produce(encoder, compat.peft_active_config(self.peft_model, self.adapter_name),
                                   cache=self.encoder_cache)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        base = self.peft_model.get_base_model()
        inputs_embeds = scatter_prompts(
            input_ids, self.template.placeholder_id, self.prompt_embeddings(), base.get_input_embeddings()
        )
        if labels is not None:
            labels = labels.masked_fill(input_ids == self.template.placeholder_id, -100)
        return base(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """PEFT's adapter files (the encoder output as ``prompt_embeddings``) plus the template."""
        self.peft_model.save_pretrained(save_directory, **kwargs)
        with open(os.path.join(save_directory, TEMPLATE_FILE), "w") as f:
            json.dump(self.template.to_dict(), f)

    @classmethod
    def from_pretrained(cls, model: torch.nn.Module, directory: str, **kwargs: Any) -> PromptTemplateModel:
        """Load what :meth:`save_pretrained` wrote onto the base ``model`` (kwargs go to PeftModel.from_pretrained)."""
        from peft import PeftModel

        path = os.path.join(directory, TEMPLATE_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"{directory} has no {TEMPLATE_FILE}; was it saved by PromptTemplateModel?")
        with open(path) as f:
            spec = json.load(f)
        template = PromptTemplate(spec=tuple(spec["spec"]), placeholder_id=int(spec["placeholder_id"]))
        return cls(PeftModel.from_pretrained(model, directory, **kwargs), template)
