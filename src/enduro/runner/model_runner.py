"""Loads the model and KV cache and runs one scheduled step: forward, then sampling."""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from enduro import native
from enduro.config import EngineConfig
from enduro.core.scheduler import SchedulerOutput
from enduro.loading.loader import ModelFiles, open_model
from enduro.models import fused
from enduro.models.arch_config import ArchConfig
from enduro.models.native_layer import attach_native_decode
from enduro.models.quantization import quantize_model
from enduro.models.registry import build_model
from enduro.outputs import TokenLogprobs
from enduro.runner.input_batch import build_model_inputs, prompt_logprobs_spans
from enduro.runner.kv_cache import KVCache
from enduro.runner.sampler import RequestState, Sampler, token_logprobs

# Prompt-logprob rows are scored in slices so a long prompt never materialises
# [prompt_len, vocab] logits at once.
PROMPT_LOGPROBS_ROWS = 64

ProgressCallback = Callable[[str, int, int], None]


@dataclass
class ModelRunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return torch.bfloat16 if native_bf16 else torch.float32
    dtype = getattr(torch, name)
    assert isinstance(dtype, torch.dtype)
    return dtype


class ModelRunner:
    def __init__(self, config: EngineConfig, progress: ProgressCallback | None = None) -> None:
        self.config = config
        if config.model.threads is not None:
            torch.set_num_threads(config.model.threads)
        self.device = torch.device(config.model.device)
        # Compiled on first use: the engine's warm-up steps (engine/warmup.py) run every
        # stretch at the step sizes it will see, so no request waits for the C++ compiler.
        native.use_native(config.model.native_kernels)
        # Built (or found in the cache) now, not by the first request's decode step.
        library = native.load()
        self.native_kernels = library is not None
        fused.use_compiled(config.model.compile, library)
        self.dtype = resolve_dtype(config.model.dtype)
        started = time.monotonic()
        cache_dir = Path(config.model.cache_dir) if config.model.cache_dir else None
        self.files: ModelFiles = open_model(config.model.model, self.dtype, cache_dir, progress)
        self.arch = ArchConfig.from_hf_config(self.files.hf_config)
        self.model = build_model(self.arch, self.dtype)
        self.model.load_weights(self._weights_with_progress(progress))
        quantize_model(self.model, config.model.quantization)
        self.model.to(self.device)
        scheduler = config.scheduler
        max_logit_rows = max(scheduler.max_num_seqs, PROMPT_LOGPROBS_ROWS)
        self.packed_output_projection = self.model.pack_output_projection(max_logit_rows)
        # Decode steps run each layer in one native call where it can (after .to(): the
        # native layer holds its weights' addresses); those layers' weights stay plain, as the
        # native projections read them in place.
        self.num_native_layers = attach_native_decode(self.model, library)
        # Laid out for a decode batch, the step the engine runs most.
        self.num_packed_projections = self.model.pack_decoder_projections(scheduler.max_num_seqs)
        self.load_seconds = time.monotonic() - started
        started = time.monotonic()
        self.num_warm_up_matmuls = self.model.warm_up(scheduler.max_step_tokens, max_logit_rows)
        self.warm_up_seconds = time.monotonic() - started
        self.block_size = config.cache.block_size
        self.layout = config.cache.pool_layout(self._bytes_per_block())
        self.num_blocks = self.layout.max_num_blocks
        self.kv_cache = KVCache(
            self.arch.num_layers,
            self.layout.max_num_blocks,
            self.layout.segment_blocks,
            self.block_size,
            self.arch.num_kv_heads,
            self.arch.head_dim,
            self.dtype,
            self.device,
        )
        self.windows = set(self.arch.sliding_windows)
        self.sampler = Sampler(config.model.seed, self.device)
        self.states: dict[str, RequestState] = {}

    def _bytes_per_block(self) -> int:
        arch = self.arch
        return KVCache.bytes_per_block(
            arch.num_layers, self.block_size, arch.num_kv_heads, arch.head_dim, self.dtype
        )

    def _weights_with_progress(
        self, progress: ProgressCallback | None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        total = self.files.num_weights
        for done, item in enumerate(self.files.weights(), start=1):
            if progress is not None:
                progress("loading weights", done, total)
            yield item

    @property
    def max_model_len(self) -> int:
        limit = self.config.model.max_model_len
        model_limit = self.arch.max_position_embeddings
        return min(limit, model_limit) if limit is not None else model_limit

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> ModelRunnerOutput:
        # Finished ids first: a new request may reuse the id of one that just finished.
        for request_id in output.finished_request_ids:
            self.states.pop(request_id, None)
        for new in output.new_requests:
            self.states[new.request_id] = self.sampler.new_state(
                new.sampling_params, new.prompt_token_ids
            )
        result = ModelRunnerOutput()
        if output.is_empty:
            return result
        inputs = build_model_inputs(output, self.block_size, self.windows, self.device)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.attn, self.kv_cache.layers)
        result.prompt_logprobs = self._prompt_logprobs(output, hidden)
        if inputs.sample_request_ids:
            logits = self.model.compute_logits(hidden[inputs.sample_rows], keep_dtype=True)
            states = [self.states[rid] for rid in inputs.sample_request_ids]
            token_ids, logprobs = self.sampler.sample(logits, states)
            for rid, state, token, lp in zip(
                inputs.sample_request_ids, states, token_ids, logprobs, strict=True
            ):
                state.output_token_ids.append(token)
                result.sampled[rid] = token
                if lp is not None:
                    result.logprobs[rid] = lp
        return result

    def _prompt_logprobs(
        self, output: SchedulerOutput, hidden: torch.Tensor
    ) -> dict[str, list[TokenLogprobs]]:
        wanting = {
            entry.request_id: self.states[entry.request_id]
            for entry in output.scheduled
            if self.states[entry.request_id].params.prompt_logprobs is not None
        }
        if not wanting:
            return {}
        prompts = {rid: state.prompt_token_ids for rid, state in wanting.items()}
        done = {rid: state.num_prompt_logprobs_done for rid, state in wanting.items()}
        result: dict[str, list[TokenLogprobs]] = {}
        for span in prompt_logprobs_spans(output, prompts, done):
            state = wanting[span.request_id]
            num_top = state.params.prompt_logprobs or 0
            scored = result.setdefault(span.request_id, [])
            for start in range(0, len(span.rows), PROMPT_LOGPROBS_ROWS):
                rows = span.rows[start : start + PROMPT_LOGPROBS_ROWS]
                logprobs = torch.log_softmax(self.model.compute_logits(hidden[rows]), dim=-1)
                targets = span.target_token_ids[start : start + PROMPT_LOGPROBS_ROWS]
                scored.extend(
                    token_logprobs(row, target, num_top)
                    for row, target in zip(logprobs, targets, strict=True)
                )
            state.num_prompt_logprobs_done = span.first_position + len(span.rows)
        return result
