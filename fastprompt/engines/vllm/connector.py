"""vLLM KV connector that writes named prefixes into vLLM's own paged cache.

A request that names a prefix of length P starts with P placeholder token ids and carries
``kv_transfer_params={"fastprompt_prefix": name}`` (and the prefix's ``cache_salt``). The scheduler-side connector
claims those P positions as computed elsewhere; vLLM allocates their cache slots and numbers the request's real
tokens from P, as the methods define. The worker-side connector then writes the prefix's K/V into those slots
before the forward, through each attention layer's own cache-write (the block interior is laid out per backend and
instruction set, so plain indexing would be wrong). vLLM's attention, scheduler and prefix cache do the rest: with
the per-prefix salt, a prefix's placeholder-only blocks are reused by its later requests, so its K/V is written
about once, and no two prefixes ever share a block.

The connector is named in ``KVTransferConfig(kv_connector="FastpromptPrefixConnector",
kv_connector_module_path="fastprompt.engines.vllm.connector", kv_role="kv_both",
kv_connector_extra_config={"fastprompt_prefix_dir": DIR})``; :class:`fastprompt.engines.vllm.PromptAdapters`
builds that and the directory.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.model_executor.layers.attention.attention import Attention
from vllm.model_executor.models.utils import extract_layer_index

from fastprompt.engines.vllm.store import read_index
from fastprompt.prefix import ExportedPrefix

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

__all__ = ["DIR_KEY", "PARAM_KEY", "FastpromptPrefixConnector"]

DIR_KEY = "fastprompt_prefix_dir"
PARAM_KEY = "fastprompt_prefix"


@dataclass(frozen=True)
class PrefixLoad:
    """Write prefix positions ``start .. stop - 1`` of ``name`` into a request whose blocks are ``block_ids``."""

    name: str
    start: int
    stop: int
    block_ids: tuple[int, ...]


@dataclass
class PrefixLoads(KVConnectorMetadata):
    """What the workers write before this step's forward."""

    loads: list[PrefixLoad] = field(default_factory=list)


def prefix_name(request: Request) -> str | None:
    """The prefix a request names, or ``None`` for a plain request."""
    params = request.kv_transfer_params
    return None if not params else params.get(PARAM_KEY)


def kv_head_range(num_kv_heads: int, tp_size: int, tp_rank: int) -> slice:
    """The key/value heads a tensor-parallel worker holds: a contiguous ``num_kv_heads / tp_size`` of them, or, with
    more workers than heads, the one head its group of ``tp_size / num_kv_heads`` workers replicates (vLLM's
    split of the K/V projection)."""
    if num_kv_heads >= tp_size:
        per_rank = num_kv_heads // tp_size
        return slice(tp_rank * per_rank, (tp_rank + 1) * per_rank)
    head = tp_rank // (tp_size // num_kv_heads)
    return slice(head, head + 1)


class FastpromptPrefixConnector(KVConnectorBase_V1):
    """Claims a request's leading placeholder positions and fills them with its named prefix's K/V."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        directory = self._kv_transfer_config.get_from_extra_config(DIR_KEY, None)
        if directory is None:
            raise ValueError(f"FastpromptPrefixConnector needs kv_connector_extra_config[{DIR_KEY!r}]")
        self._entries = read_index(directory)
        self._block_size = vllm_config.cache_config.block_size
        self._pending: list[PrefixLoad] = []
        # Scheduler side: prefix positions handed to the workers to write, by prefix (what vLLM's prefix cache saved
        # shows as the difference from P per request).
        self.written: Counter[str] = Counter()
        # Worker side: each prefix as [L, 2, P, Hkv_worker, D] in the cache's dtype, read once here, so a step's
        # write is slicing plus the backend's own cache-write.
        self._kv: dict[str, torch.Tensor] = {}
        if role == KVConnectorRole.WORKER:
            self._kv = self._load_prefixes(vllm_config)

    def _load_prefixes(self, vllm_config: VllmConfig) -> dict[str, torch.Tensor]:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        model_config = vllm_config.model_config
        cache_dtype = vllm_config.cache_config.cache_dtype
        if cache_dtype != "auto":
            raise ValueError(
                f"fastprompt prefixes need an unquantised KV cache (kv_cache_dtype 'auto'), got {cache_dtype!r}"
            )
        heads = kv_head_range(
            model_config.get_total_num_kv_heads(),
            get_tensor_model_parallel_world_size(),
            get_tensor_model_parallel_rank(),
        )
        prefixes = {}
        for name, entry in self._entries.items():
            exported = ExportedPrefix.load(entry.file)
            try:
                exported.check_fits(model_config.hf_config)
            except ValueError as exc:
                raise ValueError(f"prefix {name!r} ({entry.file}): {exc}") from None
            kv = exported.kv[:, :, heads].permute(0, 1, 3, 2, 4)  # [L, 2, P, Hkv_worker, D]
            prefixes[name] = kv.to(device=vllm_config.device_config.device, dtype=model_config.dtype).contiguous()
        return prefixes

    # Scheduler side

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        """The placeholder positions not yet in the cache (vLLM's prefix cache may hold the first blocks)."""
        name = prefix_name(request)
        if name is None:
            return 0, False
        entry = self._entries.get(name)
        if entry is None:
            raise KeyError(f"request {request.request_id} names prefix {name!r}, which this engine was not started "
                           f"with (it has {sorted(self._entries)})")
        if request.num_prompt_tokens <= entry.length:
            raise ValueError(f"request {request.request_id} has {request.num_prompt_tokens} prompt tokens, no real "
                             f"token after the {entry.length} placeholders of prefix {name!r}")
        return max(entry.length - num_computed_tokens, 0), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if num_external_tokens == 0:
            return
        name = prefix_name(request)
        stop = self._entries[name].length
        # ``blocks`` are all of the request's blocks (new or resumed after preemption), so no later lookup is needed.
        self._pending.append(PrefixLoad(name, stop - num_external_tokens, stop, tuple(blocks.get_block_ids()[0])))
        self.written[name] += num_external_tokens

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = PrefixLoads(self._pending)
        self._pending = []
        return meta

    # Worker side

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Write this step's prefix positions into every attention layer's cache, one backend write per layer."""
        meta = self._get_connector_metadata()
        if not isinstance(meta, PrefixLoads) or not meta.loads:
            return
        slots = []
        for load in meta.loads:
            positions = torch.arange(load.start, load.stop)
            blocks = torch.tensor(load.block_ids)[positions // self._block_size]
            slots.append(blocks * self._block_size + positions % self._block_size)
        slot_mapping = torch.cat(slots)
        for layer_name, layer in forward_context.no_compile_layers.items():
            if not isinstance(layer, Attention) or layer.kv_sharing_target_layer_name is not None:
                continue
            index = extract_layer_index(layer_name)
            kv = torch.cat([self._kv[load.name][index, :, load.start : load.stop] for load in meta.loads], dim=1)
            layer.impl.do_kv_cache_update(layer, kv[0], kv[1], layer.kv_cache, slot_mapping.to(kv.device))

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Nothing to wait for: :meth:`start_load_kv` writes synchronously."""

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        """Nothing is saved: prefixes only flow into the cache."""

    def wait_for_save(self) -> None:
        """Nothing is saved."""
