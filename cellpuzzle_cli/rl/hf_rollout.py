"""A verl rollout backend that generates with transformers, for `rl --device cpu`.

verl 0.9.1 rolls out through servers: each replica launches a Ray actor that answers
token-in/token-out `generate` calls (with log-probs) from verl's agent loop, and a worker-side
adapter inside each training rank pushes the trainer's weights to that server after every
update. vLLM and SGLang implement both halves for GPUs; this module implements them with
`model.generate` on CPU, so verl's own trainer, agent loop, reward loop and weight sync all run
unchanged. It is registered as rollout `hf` by `cellpuzzle_cli.rl.verl_cpu`.

Only the hybrid mode (rollout colocated with the trainer, verl's default) is supported; one
server per replica, one request at a time. It is meant for tiny models and smoke runs.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from typing import Any

import ray
import torch
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import HFModelConfig, RolloutConfig
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutMode, RolloutReplica, TokenOutput

SERVER_PREFIX = "cellpuzzle_hf_server_"


def server_name(replica_rank: int, suffix: str = "") -> str:
    """The Ray actor name shared by a replica's server and its ranks' adapters."""
    return f"{SERVER_PREFIX}{replica_rank}{suffix}"


def _model_folder(model_config: Any) -> str:
    """Local folder of the model, from verl's HFModelConfig or the raw `model` config section."""
    if not isinstance(model_config, HFModelConfig):
        model_config = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
    return str(model_config.local_path)


def generation_kwargs(sampling_params: dict[str, Any], default_max_tokens: int) -> dict[str, Any]:
    """verl's (vLLM-style) sampling parameters as transformers `generate` arguments.

    Temperature 0 means greedy; top_k -1 means no top-k (transformers: 0).
    """
    temperature = float(sampling_params.get("temperature", 1.0))
    max_tokens = sampling_params.get("max_tokens") or sampling_params.get("max_new_tokens")
    kwargs: dict[str, Any] = {"max_new_tokens": int(max_tokens or default_max_tokens)}
    if temperature <= 0:
        kwargs["do_sample"] = False
        return kwargs
    top_k = int(sampling_params.get("top_k", -1))
    kwargs.update(do_sample=True, temperature=temperature,
                  top_p=float(sampling_params.get("top_p", 1.0)), top_k=max(top_k, 0))
    repetition = float(sampling_params.get("repetition_penalty", 1.0))
    if repetition != 1.0:
        kwargs["repetition_penalty"] = repetition
    return kwargs


class HFRolloutServer:
    """The generation server of one replica (a Ray actor): a causal LM on CPU.

    It starts from the model folder and is then overwritten by every weight sync, so what it
    samples is always the current policy, as with verl's vLLM servers.
    """

    def __init__(self, config: RolloutConfig, model_config: Any, replica_rank: int) -> None:
        from transformers import AutoModelForCausalLM

        self.config = config
        self.global_steps: int | None = None
        folder = _model_folder(model_config)
        trust = bool(getattr(model_config, "trust_remote_code", False))
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                          trust_remote_code=trust)
        self.model.eval()
        self.lock = asyncio.Lock()
        torch.manual_seed(int(config.seed) + replica_rank)

    async def ready(self) -> bool:
        return True

    def _generate(self, prompt_ids: list[int], sampling_params: dict[str, Any]) -> TokenOutput:
        from transformers import GenerationConfig

        gen = self.model.generation_config
        settings = GenerationConfig(eos_token_id=gen.eos_token_id, pad_token_id=gen.pad_token_id,
                                    **generation_kwargs(sampling_params, self.config.response_length))
        want_logprobs = sampling_params.get("logprobs") not in (None, False)
        inputs = torch.tensor([list(prompt_ids)], dtype=torch.long)
        with torch.no_grad():
            out = self.model.generate(inputs, attention_mask=torch.ones_like(inputs),
                                      generation_config=settings, return_dict_in_generate=True,
                                      output_scores=want_logprobs)
        tokens = out.sequences[0, inputs.shape[1]:].tolist()
        log_probs = None
        if want_logprobs:
            # `scores` are the processed logits (after temperature/top-k/top-p), as verl's
            # default `processed_logprobs` mode asks of vLLM
            log_probs = [float(torch.log_softmax(step[0].float(), dim=-1)[token])
                         for step, token in zip(out.scores, tokens)]
        return TokenOutput(token_ids=tokens, log_probs=log_probs, stop_reason="completed",
                           extra_fields={"global_steps": self.global_steps})

    async def generate(self, prompt_ids: list[int], sampling_params: dict[str, Any],
                       request_id: str, **_: Any) -> TokenOutput:
        """Token-in/token-out generation; requests run one at a time in a thread."""
        async with self.lock:
            return await asyncio.to_thread(self._generate, prompt_ids, dict(sampling_params))

    async def load_weights(self, state: dict[str, torch.Tensor], global_steps: int | None) -> int:
        """Copy the trainer's full weights in; returns the number of tensors copied."""
        # tied weights (lm_head = embed_tokens) come under both names; keep both reachable
        params = dict(self.model.named_parameters(remove_duplicate=False))
        params.update(self.model.named_buffers(remove_duplicate=False))
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise KeyError(f"weights the rollout model does not have: {unknown[:5]}")
        async with self.lock:
            with torch.no_grad():
                for name, tensor in state.items():
                    params[name].copy_(tensor.to(params[name].dtype))
            self.global_steps = global_steps
        return len(state)

    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    # verl's replica and checkpoint manager call these around weight syncs; a CPU model keeps
    # its weights and has no KV cache to free, so they have nothing to do.
    async def wake_up(self, tags: list[str] | None = None) -> None:
        return None

    async def sleep(self) -> None:
        return None

    async def clear_kv_cache(self) -> None:
        return None

    async def release_kv_cache(self) -> None:
        return None

    async def resume_kv_cache(self) -> None:
        return None

    async def wait_for_requests_to_drain(self) -> None:
        async with self.lock:
            return

    async def abort_all_requests(self, reject_request: bool = False, **_: Any) -> dict[str, Any]:
        return {"aborted_count": 0, "request_ids": []}

    async def abort_request(self, request_id: str, **_: Any) -> dict[str, Any]:
        return {"aborted": False, "request_id": request_id}

    async def resume_generation(self) -> None:
        return None

    async def start_profile(self, **_: Any) -> None:
        return None

    async def stop_profile(self) -> None:
        return None


class HFReplica(RolloutReplica):
    """One `hf` rollout replica: launches its HFRolloutServer actor."""

    async def launch_servers(self) -> None:
        if self.rollout_mode != RolloutMode.HYBRID:
            raise NotImplementedError("The hf rollout supports only verl's hybrid mode (rollout "
                                      "colocated with the trainer), not "
                                      f"{self.rollout_mode.value}.")
        name = server_name(self.replica_rank, self.name_suffix)
        server = ray.remote(HFRolloutServer).options(
            name=name, num_cpus=0, max_concurrency=self.max_concurrency,
        ).remote(config=self.config, model_config=self.model_config,
                 replica_rank=self.replica_rank)
        await server.ready.remote()
        self.servers = [server]
        self._server_handle = server
        self._server_address = f"hf://{name}"


class HFServerAdapter(BaseRollout):
    """The worker-side half: pushes each training rank's synced weights to its replica's server.

    Every rank must read the weight generator to the end (it gathers FSDP shards collectively);
    only the first rank of each replica sends the result.
    """

    def __init__(self, config: RolloutConfig, model_config: HFModelConfig, device_mesh: Any,
                 replica_rank: int = -1) -> None:
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", "0"))
        per_replica = (self.config.tensor_model_parallel_size * self.config.data_parallel_size
                       * self.config.pipeline_model_parallel_size)
        self.replica_rank = rank // per_replica if replica_rank == -1 else replica_rank
        self.sends = rank % per_replica == 0
        self.server: Any = None

    def _server(self) -> Any:
        if self.server is None:  # the server is launched after the training engine
            self.server = ray.get_actor(server_name(self.replica_rank))
        return self.server

    async def resume(self, tags: list[str]) -> None:
        return None

    async def release(self) -> None:
        return None

    async def update_weights(self, weights: Iterable[Any], wire_format: str = "named_tensors",
                             **kwargs: Any) -> None:
        if wire_format != "named_tensors":
            raise NotImplementedError(f"The hf rollout receives full named tensors, not {wire_format}.")
        if kwargs.get("peft_config") is not None:
            raise NotImplementedError("The hf rollout does not take LoRA adapters; set "
                                      "actor_rollout_ref.model.lora.merge=true.")
        state = {}
        for name, tensor in weights:
            if self.sends:
                state[name] = tensor.detach().to("cpu", copy=True)
        if self.sends:
            await self._server().load_weights.remote(state, kwargs.get("global_steps"))
